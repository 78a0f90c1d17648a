"""Phi-3: fused qkv_proj (q|k|v) and gate_up_proj (gate|up), GQA, per-layer head counts."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from family_checks import TOKENS, TOL, check_generates, check_prune_save_load, check_pruned_equals_masked, randomized
from helpers import blank_record, prune_and_mask
from transformers import AutoModelForCausalLM, Phi3Config, Phi3ForCausalLM

from llmp import PruneConfig, prune, save_pruned
from llmp.io import REPORT
from llmp.structure import Kind, adapter_for
from llmp.structure.adapters.phi3 import LayerConfig

KINDS = [Kind.QUERY_HEADS, Kind.KV_GROUPS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS]


def tiny_phi3(layers: int = 4, **extra) -> Phi3ForCausalLM:
    """6 query heads over 2 KV heads (3 per group), head_dim 16, partial rotary like Phi-3.5-MoE's."""
    config = Phi3Config(
        **{
            "hidden_size": 64,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "intermediate_size": 96,
            "num_hidden_layers": layers,
            "vocab_size": 128,
            "max_position_embeddings": 64,
            "original_max_position_embeddings": 64,
            **TOKENS,
            **extra,
        }
    )
    torch.manual_seed(0)
    return randomized(Phi3ForCausalLM(config))


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.value)
def test_pruned_equals_masked(kind, calib, inputs):
    check_pruned_equals_masked(tiny_phi3(), kind, calib, inputs)


def test_tied_embeddings_and_sliding_window(calib, inputs):
    model = tiny_phi3(tie_word_embeddings=True, sliding_window=8)
    for kind in (Kind.HIDDEN, Kind.QUERY_HEADS):
        check_pruned_equals_masked(model, kind, calib, inputs)


def test_fused_rows_follow_their_parts(inputs):
    """Drop KV group 1 and MLP channels 0, 5: the q, k and v parts and the gate and up rows go together."""
    model = tiny_phi3()
    plan = {"layers.1.kv_groups": [1], "layers.1.mlp": [0, 5]}
    pruned, masked, _ = prune_and_mask(model, (Kind.KV_GROUPS, Kind.MLP), plan=plan)
    attn, mlp = pruned.model.layers[1].self_attn, pruned.model.layers[1].mlp
    # 3 query heads + 1 key + 1 value head of 16 rows; 2 × 94 gate|up rows
    assert attn.qkv_proj.weight.shape == (80, 64) and mlp.gate_up_proj.weight.shape == (188, 64)
    old = model.model.layers[1]
    q, k, v = old.self_attn.qkv_proj.weight.split([96, 32, 32])
    torch.testing.assert_close(attn.qkv_proj.weight, torch.cat([q[:48], k[:16], v[:16]]))
    gate, up = old.mlp.gate_up_proj.weight.chunk(2)
    keep = [c for c in range(96) if c not in (0, 5)]
    torch.testing.assert_close(mlp.gate_up_proj.weight, torch.cat([gate[keep], up[keep]]))
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)


def test_heterogeneous_heads_get_their_own_config_view(inputs):
    model = tiny_phi3()
    plan = {"layers.1.query_heads": [0, 3], "layers.2.query_heads": [1, 2, 4, 5]}
    pruned, masked, _ = prune_and_mask(model, (Kind.QUERY_HEADS,), plan=plan)
    configs = [layer.self_attn.config for layer in pruned.model.layers]
    assert configs[0] is pruned.config and configs[3] is pruned.config
    assert isinstance(configs[1], LayerConfig) and configs[1].num_attention_heads == 4
    assert configs[2].num_attention_heads == 2 and pruned.config.num_attention_heads == 6
    assert configs[1]._attn_implementation == pruned.config._attn_implementation  # read through
    torch.testing.assert_close(pruned(inputs).logits, masked(inputs).logits, **TOL)
    copied = copy.deepcopy(pruned)  # Lightning and the tests copy models
    assert copied.model.layers[1].self_attn.config._base is copied.config
    torch.testing.assert_close(copied(inputs).logits, masked(inputs).logits, **TOL)
    check_generates(copied, inputs)


@pytest.mark.parametrize(
    "config",
    [
        PruneConfig(ratio=0.2, attention="query", layers="1:3"),
        PruneConfig(ratio=0.2, attention="kv"),
        PruneConfig(ratio=0.15, scope="channel"),
        PruneConfig(ratio=0.2, scope="layer"),
        PruneConfig(ratio=0.25, attention="query", steps=2, criterion="taylor2"),
    ],
    ids=["query+mlp", "kv+mlp", "hidden", "layers", "iterative"],
)
def test_prune_save_load(config, calib, inputs, tmp_path):
    report = check_prune_save_load(tiny_phi3(), config, calib, inputs, tmp_path)
    assert report.family == "phi3"


def test_uniform_layout_loads_with_plain_transformers(calib, inputs, tmp_path):
    model = tiny_phi3()
    prune(model, PruneConfig(ratio=0.25, attention="query", layout="uniform"), calib)
    assert len({tuple(s.values()) for s in adapter_for(model).layer_shapes(model)}) == 1
    out = save_pruned(model, tmp_path / "uniform", record=blank_record())
    assert json.loads((out / REPORT).read_text())["loads_with_plain_transformers"] is True
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(plain(inputs).logits, model(inputs).logits, rtol=0, atol=1e-6)
