"""Gemma, Gemma 2, Gemma 3 (text): head_dim apart from hidden, MQA, q/k norms, (1+w) RMSNorm,
√hidden embedding normaliser, soft-capping and sliding-window layers."""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import TOKENS, TOL, check_prune_save_load, check_pruned_equals_masked, randomized
from helpers import blank_record, prune_and_mask
from transformers import AutoModelForCausalLM, Gemma2Config, Gemma3TextConfig, GemmaConfig

from llmp import LlmpError, PruneConfig, prune, save_pruned
from llmp.io import REPORT
from llmp.structure import Kind, adapter_for

KINDS = [Kind.QUERY_HEADS, Kind.KV_GROUPS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS]
LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

# name → (config class, extra): head_dim × heads ≠ hidden everywhere, as in Gemma 7B (16 × 256 vs 3072).
TINY = {
    # Gemma 2B-style MQA: 4 query heads share one KV head.
    "gemma": (GemmaConfig, dict(num_attention_heads=4, num_key_value_heads=1, head_dim=32)),
    "gemma2": (
        Gemma2Config,
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=LAYER_TYPES,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
    ),
    "gemma3": (
        Gemma3TextConfig,
        dict(
            hidden_size=96,  # Gemma 2/3 configs insist on hidden_size % heads == 0 (unused by the model)
            num_attention_heads=6,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=8,
            layer_types=LAYER_TYPES,
            tie_word_embeddings=False,
        ),
    ),
}


def tiny_gemma(name: str, layers: int = 4):
    config_cls, extra = TINY[name]
    config = config_cls(
        **{"hidden_size": 64, **extra},
        intermediate_size=96,
        num_hidden_layers=layers,
        vocab_size=128,
        max_position_embeddings=64,
        **TOKENS,
    )
    torch.manual_seed(0)
    return randomized(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_pruned_equals_masked(name, kind, calib, inputs):
    model = tiny_gemma(name)
    if name == "gemma" and kind is Kind.KV_GROUPS:
        _, _, plan = prune_and_mask(model, (kind,), calib=calib)
        assert not plan  # one KV head (MQA): removing a KV group would remove every head
        return
    check_pruned_equals_masked(model, kind, calib, inputs)


@pytest.mark.parametrize("name", sorted(TINY))
def test_hidden_pruning_keeps_a_plain_config(name, inputs):
    """After hidden pruning the normaliser is √new, eps unchanged: what plain Gemma builds from the config."""
    model = tiny_gemma(name)
    old, heads, eps = model.config.hidden_size, model.config.num_attention_heads, model.config.rms_norm_eps
    plan = {"hidden": list(range(0, 8 * heads, 2))}  # 4·heads channels: new width still a multiple of heads
    pruned, masked, _ = prune_and_mask(model, (Kind.HIDDEN,), plan=plan)
    new = old - 4 * heads
    assert pruned.config.hidden_size == new and pruned.config.rms_norm_eps == eps
    assert float(pruned.model.embed_tokens.embed_scale) == pytest.approx(new**0.5)
    if name == "gemma3":  # q/k norms work over head_dim, which hidden pruning leaves alone
        assert pruned.model.layers[0].self_attn.q_norm.weight.shape == (16,)
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)


def test_removed_layers_keep_their_attention_type(calib, inputs):
    model = tiny_gemma("gemma3")
    plan = {"layers": [0, 3]}  # keep a full (1) and a sliding (2) layer, renumbered 0 and 1
    pruned, masked, _ = prune_and_mask(model, (Kind.LAYERS,), plan=plan)
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in pruned.model.layers] == [None, 8]
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)


@pytest.mark.parametrize("name", sorted(TINY))
@pytest.mark.parametrize(
    "config",
    [
        PruneConfig(ratio=0.2, attention="query", layers="1:3"),
        PruneConfig(ratio=0.15, scope="channel"),
        PruneConfig(ratio=0.2, scope="layer"),
        PruneConfig(ratio=0.25, attention="query", steps=2, criterion="taylor2"),
        PruneConfig(ratio=0.2, attention="kv"),
    ],
    ids=["query+mlp", "hidden", "layers", "iterative", "kv+mlp"],
)
def test_prune_save_load(name, config, calib, inputs, tmp_path):
    if name == "gemma" and config.attention == "kv":  # MQA: one KV head per layer
        with pytest.raises(LlmpError, match="single key/value head"):
            prune(tiny_gemma(name), config, calib)
        return
    report = check_prune_save_load(tiny_gemma(name), config, calib, inputs, tmp_path)
    assert report.family == "gemma"


@pytest.mark.parametrize("name", ["gemma", "gemma3"])
def test_uniform_layout_loads_with_plain_transformers(name, calib, inputs, tmp_path):
    """Query heads, MLP and hidden channels pruned alike everywhere: a plain Gemma checkpoint."""
    model = tiny_gemma(name)
    prune(model, PruneConfig(ratio=0.25, attention="query", layout="uniform"), calib)
    heads = model.config.num_attention_heads  # Gemma 2/3 configs want hidden_size % heads == 0
    prune(model, PruneConfig(ratio=0.1, scope="channel", round_to=heads), calib)
    assert len({tuple(s.values()) for s in adapter_for(model).layer_shapes(model)}) == 1
    out = save_pruned(model, tmp_path / "uniform", record=blank_record())
    assert json.loads((out / REPORT).read_text())["loads_with_plain_transformers"] is True
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert plain.config.hidden_size < TINY[name][1].get("hidden_size", 64)
    torch.testing.assert_close(plain(inputs).logits, model(inputs).logits, rtol=0, atol=1e-6)


def test_multimodal_gemma3_is_refused_not_broken():
    """Gemma 3 4B+ checkpoints are image-text models (`gemma3`, config nested in `text_config`):
    no adapter yet, and automatic discovery's check refuses them before a weight changes."""
    from transformers import Gemma3Config

    from llmp.structure.auto import AutoAdapter

    text = dict(TINY["gemma3"][1], intermediate_size=96, num_hidden_layers=len(LAYER_TYPES), vocab_size=300)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28)
    config = Gemma3Config(
        text_config=text,
        vision_config={**vision, "patch_size": 14},
        mm_tokens_per_image=4,
        image_token_index=299,
        boi_token_index=297,
        eoi_token_index=298,
    )
    model = AutoModelForCausalLM.from_config(config)
    assert isinstance(adapter_for(model), AutoAdapter)
    before = {n: p.clone() for n, p in model.named_parameters()}
    with pytest.raises(LlmpError, match=r"`gemma3` \(Gemma3ForConditionalGeneration\).*check failed.*docs/adapters.md"):
        prune(model, PruneConfig(ratio=0.2, criterion="l1"))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
