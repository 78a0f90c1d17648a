"""OPT and GPT-2: multi-head attention with biases, LayerNorm, learned positions; GPT-2's Conv1D.

Both refuse hidden channels (LayerNorm); OPT-350m (LayerNorm after the residual add) also
refuses whole layers. Everything else must prune exactly, save, load and generate.
"""

from __future__ import annotations

import json

import pytest
import torch
from family_checks import TOKENS, TOL, check_prune_save_load, check_pruned_equals_masked, randomized
from helpers import blank_record, prune_and_mask
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel, OPTConfig, OPTForCausalLM

from llmp import LlmpError, PruneConfig, prune, save_pruned
from llmp.io import REPORT
from llmp.structure import Kind, adapter_for

KINDS = [Kind.QUERY_HEADS, Kind.KV_GROUPS, Kind.MLP, Kind.LAYERS]
COMMON = dict(vocab_size=128, max_position_embeddings=64, **TOKENS)

# name → (model class, config): 4 heads of 16 over hidden 64, 96 MLP channels, 4 layers.
FAMILIES = {
    # OPT-125m … 66b: LayerNorm before attention and MLP, learned positions (offset 2), biases.
    "opt": (OPTForCausalLM, lambda: OPTConfig(hidden_size=64, ffn_dim=96, word_embed_proj_dim=64)),
    # OPT-350m: LayerNorm after each residual add, 32-wide embeddings with project_in/project_out.
    "opt-350m": (
        OPTForCausalLM,
        lambda: OPTConfig(hidden_size=64, ffn_dim=96, word_embed_proj_dim=32, do_layer_norm_before=False),
    ),
    "gpt2": (GPT2LMHeadModel, lambda: GPT2Config(n_embd=64, n_inner=96)),
    # Attention of layer i scaled by 1/(i + 1), computed in float32 (as in Stanford CRFM's GPT-2 runs).
    "gpt2-inverse-layer": (
        GPT2LMHeadModel,
        lambda: GPT2Config(n_embd=64, n_inner=96, scale_attn_by_inverse_layer_idx=True, reorder_and_upcast_attn=True),
    ),
}
REFUSED = {("opt-350m", Kind.LAYERS): "do_layer_norm_before=false"}


def family_model(name: str) -> torch.nn.Module:
    model_cls, make_config = FAMILIES[name]
    config = make_config()
    config.update({"num_hidden_layers": 4, "num_attention_heads": 4, **COMMON})
    torch.manual_seed(0)
    return randomized(model_cls(config))


def assert_same_left_padded(a, b, inputs):
    """Learned positions come from the attention mask: left padding must not tell the two apart."""
    mask = torch.ones_like(inputs)
    mask[0, :5] = 0
    with torch.no_grad():
        torch.testing.assert_close(a(inputs, attention_mask=mask).logits, b(inputs, attention_mask=mask).logits, **TOL)


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_pruned_equals_masked(name, kind, calib, inputs):
    model = family_model(name)
    if (name, kind) in REFUSED:
        with pytest.raises(LlmpError, match=REFUSED[name, kind]):
            adapter_for(model).discover(model, (kind,))
        return
    plan = check_pruned_equals_masked(model, kind, calib, inputs)
    pruned, masked, _ = prune_and_mask(model, (kind,), plan=plan)
    assert_same_left_padded(pruned, masked, inputs)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_hidden_channels_are_refused(name, calib):
    model = family_model(name)
    family = name.split("-")[0]
    with pytest.raises(LlmpError, match=f"not supported for {family}: its LayerNorm"):
        adapter_for(model).discover(model, (Kind.HIDDEN,))
    with pytest.raises(LlmpError, match="`scope` channel"):
        prune(model, PruneConfig(ratio=0.1, scope="channel"), calib)


def test_gpt2_conv1d_columns_follow_their_heads(inputs):
    """Drop head 1 and MLP channels 0, 5 of layer 1: Conv1D weights lose columns, c_proj rows."""
    model = family_model("gpt2")
    plan = {"layers.1.kv_groups": [1], "layers.1.mlp": [0, 5]}
    pruned, masked, _ = prune_and_mask(model, (Kind.KV_GROUPS, Kind.MLP), plan=plan)
    old, new = model.transformer.h[1], pruned.transformer.h[1]
    keep = [c for c in range(64) if not 16 <= c < 32]
    q, k, v = old.attn.c_attn.weight.split(64, dim=1)
    torch.testing.assert_close(new.attn.c_attn.weight, torch.cat([q[:, keep], k[:, keep], v[:, keep]], dim=1))
    torch.testing.assert_close(new.attn.c_proj.weight, old.attn.c_proj.weight[keep])
    assert (new.attn.c_attn.nx, new.attn.c_attn.nf, new.attn.split_size, new.attn.num_heads) == (64, 144, 48, 3)
    assert new.mlp.c_fc.weight.shape == (64, 94) and new.mlp.c_proj.weight.shape == (94, 64)
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)


def test_gpt2_removed_layers_keep_their_inverse_layer_scaling(inputs):
    """Layers 1 and 3 move to 0 and 1: their attention must stay scaled by 1/2 and 1/4."""
    model = family_model("gpt2-inverse-layer")
    pruned, masked, _ = prune_and_mask(model, (Kind.LAYERS,), plan={"layers": [0, 2]})
    attn = [block.attn for block in pruned.transformer.h]
    assert [a.layer_idx for a in attn] == [0, 1] and pruned.config.n_layer == 2
    assert [a.scaling for a in attn] == [16**-0.5, 16**-0.5 / 2]  # the query columns carry the rest
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("opt", PruneConfig(ratio=0.2, attention="kv")),
        ("opt", PruneConfig(ratio=0.25, scope="layer")),
        ("opt-350m", PruneConfig(ratio=0.2, attention="query", steps=2, criterion="taylor2")),
        ("gpt2", PruneConfig(ratio=0.2, attention="kv")),
        ("gpt2-inverse-layer", PruneConfig(ratio=0.25, scope="layer")),
        ("gpt2-inverse-layer", PruneConfig(ratio=0.2, attention="query", steps=2)),
    ],
    ids=lambda x: x if isinstance(x, str) else f"{x.scope}-{x.attention}-{x.steps}",
)
def test_prune_save_load(name, config, calib, inputs, tmp_path):
    report = check_prune_save_load(family_model(name), config, calib, inputs, tmp_path)
    assert report.family == name.split("-")[0]


@pytest.mark.parametrize("name", ["opt", "gpt2"])
def test_uniform_mlp_loads_with_plain_transformers(name, calib, inputs, tmp_path):
    """Their configs derive head_dim from hidden / heads: only MLP-only pruning is a plain checkpoint."""
    model = family_model(name)
    prune(model, PruneConfig(ratio=0.15, layout="uniform"), calib)
    out = save_pruned(model, tmp_path / "uniform", record=blank_record())
    assert json.loads((out / REPORT).read_text())["loads_with_plain_transformers"] is True
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(inputs).logits, model(inputs).logits, rtol=0, atol=1e-6)

    heads = family_model(name)
    prune(heads, PruneConfig(ratio=0.15, attention="kv", mlp=False, layout="uniform"), calib)
    out = save_pruned(heads, tmp_path / "heads", record=blank_record())
    assert json.loads((out / REPORT).read_text())["loads_with_plain_transformers"] is False
