"""The Llama adapter's families at their real shapes, scaled down: Vicuna (LLaMA-7B), TinyLlama,
Llama-3 and 3.1, Qwen2 and Mistral.

Head counts and ratios are the real ones (TinyLlama's 32 query heads over 4 KV heads, Llama-3's
4:1 grouping); widths are small. Random norm weights and biases (Qwen2's q/k/v) make a slice that
misses one show in the logits.
"""

from __future__ import annotations

import pytest
import torch
from family_checks import TOKENS, TOL, check_generates, check_prune_save_load, check_pruned_equals_masked, randomized
from helpers import prune_and_mask
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from llmp import PruneConfig, load_pruned, save_pruned
from llmp.structure import Kind, adapter_for

KINDS = [Kind.QUERY_HEADS, Kind.KV_GROUPS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS]
LLAMA3_ROPE = dict(rope_theta=500000.0)
LLAMA31_SCALING = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
)

# name → (config class, fields, (query heads, KV heads) per layer). MLP widths keep the real
# intermediate/hidden ratio: 11008/4096 · 64 = 172, 5632/2048 · 128 = 352, 14336/4096 · 64 = 224.
SHAPES = {
    # Vicuna-7B v1.5 = LLaMA-2-7B: 32 heads of 128 (MHA), untied embeddings.
    "vicuna": (LlamaConfig, dict(hidden_size=64, num_attention_heads=8, intermediate_size=172), (8, 8)),
    # TinyLlama-1.1B: 32 query heads over 4 KV heads of 64, 22 layers, hidden 2048.
    "tinyllama": (
        LlamaConfig,
        dict(hidden_size=128, num_attention_heads=32, num_key_value_heads=4, intermediate_size=352),
        (32, 4),
    ),
    # Llama-3-8B: 32 query heads over 8 KV heads (4:1), rope θ 500k.
    "llama3": (
        LlamaConfig,
        dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=224, **LLAMA3_ROPE),
        (8, 2),
    ),
    # Llama-3.1-8B: as Llama-3, plus the "llama3" rope scaling of its config.json.
    "llama3.1": (
        LlamaConfig,
        dict(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=224,
            rope_scaling={**LLAMA31_SCALING, **LLAMA3_ROPE},
        ),
        (8, 2),
    ),
    # Qwen2: q/k/v biases, tied embeddings, sliding-window attention above max_window_layers.
    "qwen2": (
        Qwen2Config,
        dict(
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=96,
            tie_word_embeddings=True,
            use_sliding_window=True,
            sliding_window=8,
            max_window_layers=2,
        ),
        (4, 2),
    ),
    # Mistral-7B: 32 query heads over 8 KV heads, sliding window in every layer.
    "mistral": (
        MistralConfig,
        dict(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, intermediate_size=224, sliding_window=8),
        (8, 2),
    ),
}


def llama_like(name: str, layers: int = 4) -> torch.nn.Module:
    config_cls, fields, _ = SHAPES[name]
    fields = {"tie_word_embeddings": False, **fields}
    config = config_cls(num_hidden_layers=layers, vocab_size=128, max_position_embeddings=64, **TOKENS, **fields)
    torch.manual_seed(0)
    return randomized(AutoModelForCausalLM.from_config(config))


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shape_is_discovered(name):
    """The groups have the family's head layout: KV groups, and query heads blocked by KV group."""
    model = llama_like(name)
    n_q, n_kv = SHAPES[name][2]
    adapter = adapter_for(model)
    assert adapter.family == "llama"
    kv = adapter.discover(model, (Kind.KV_GROUPS,))["layers.1.kv_groups"]
    assert kv.size == n_kv
    if n_q > n_kv:
        query = adapter.discover(model, (Kind.QUERY_HEADS,))["layers.1.query_heads"]
        assert (query.size, query.blocks) == (n_q, n_kv)
    assert adapter.layer_shapes(model)[0] == {"heads": n_q, "kv_heads": n_kv, "mlp": model.config.intermediate_size}


@pytest.mark.parametrize("name", sorted(SHAPES))
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_pruned_equals_masked(name, kind, calib, inputs):
    check_pruned_equals_masked(llama_like(name), kind, calib, inputs)


@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("vicuna", PruneConfig(ratio=0.2, attention="kv")),
        ("vicuna", PruneConfig(ratio=0.15, scope="channel")),
        ("tinyllama", PruneConfig(ratio=0.2, attention="query")),
        ("tinyllama", PruneConfig(ratio=0.25, scope="layer")),
        ("llama3", PruneConfig(ratio=0.2, attention="kv", steps=2, criterion="taylor2")),
        ("llama3.1", PruneConfig(ratio=0.2, attention="query", layers="1:3")),
        ("llama3.1", PruneConfig(ratio=0.15, scope="channel")),
        ("qwen2", PruneConfig(ratio=0.2, attention="query")),
        ("qwen2", PruneConfig(ratio=0.15, scope="channel")),
        ("qwen2", PruneConfig(ratio=0.25, scope="layer")),
        ("mistral", PruneConfig(ratio=0.2, attention="kv")),
        ("mistral", PruneConfig(ratio=0.25, scope="layer")),
        ("mistral", PruneConfig(ratio=0.15, scope="channel")),
    ],
    ids=lambda x: x if isinstance(x, str) else f"{x.scope}-{x.attention}-{x.steps}",
)
def test_prune_save_load(name, config, calib, inputs, tmp_path):
    report = check_prune_save_load(llama_like(name), config, calib, inputs, tmp_path)
    assert report.family == "llama"


def test_llama31_rope_scaling_survives_save_load(calib, inputs, tmp_path):
    """The loaded model recomputes its rotary frequencies with the llama3 scaling, not plain rope."""
    model = llama_like("llama3.1")
    original = model.model.rotary_emb.inv_freq.clone()
    plan = {f"layers.{i}.query_heads": [0, 4] for i in range(4)}
    pruned, masked, _ = prune_and_mask(model, (Kind.QUERY_HEADS,), plan=plan)
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)
    loaded = load_pruned(save_pruned(pruned, tmp_path / "llama31"))
    assert loaded.config.rope_parameters["rope_type"] == "llama3"
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, original, rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, pruned(inputs).logits, rtol=0, atol=0)


def test_qwen2_removed_layers_keep_their_window(inputs, tmp_path):
    """Layers 1 (full) and 3 (sliding) are kept as 0 and 1, in the model and in its saved config."""
    model = llama_like("qwen2")
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    pruned, masked, _ = prune_and_mask(model, (Kind.LAYERS,), plan={"layers": [0, 2]})
    assert pruned.config.layer_types == ["full_attention", "sliding_attention"]
    assert [layer.self_attn.sliding_window for layer in pruned.model.layers] == [None, 8]
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)
    loaded = load_pruned(save_pruned(pruned, tmp_path / "qwen2"))
    assert [layer.self_attn.sliding_window for layer in loaded.model.layers] == [None, 8]
    with torch.no_grad():
        torch.testing.assert_close(loaded(inputs).logits, pruned(inputs).logits, rtol=0, atol=0)
    check_generates(loaded, inputs)
