"""Mixture-of-experts models (``llmp.structure.adapters.moe``): whole experts removed physically
compute what the original computes with those experts' router logits at −∞, for every supported
family (top-k renormalised or not, a shared expert, dense layers between MoE ones); the output
loads in plain transformers and in llmp with identical logits."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import MOE_FAMILIES, blank_record, logits, prune_and_mask, tiny_moe
from transformers import AutoModelForCausalLM

from llmp import LlmpError, load_pruned, surgery
from llmp.io import save_pruned
from llmp.structure import Kind, adapter_for

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def expert_plan(model, per_layer: int, seed: int = 0) -> dict[str, list[int]]:
    """``per_layer`` random experts of every MoE layer (a different set in each)."""
    g = torch.Generator().manual_seed(seed)
    structure = adapter_for(model).discover(model, (Kind.EXPERTS,))
    return {grp.name: sorted(torch.randperm(grp.size, generator=g)[:per_layer].tolist()) for grp in structure.groups}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_removed_experts_compute_what_masked_router_logits_compute(family):
    model = tiny_moe(family)
    kinds = (Kind.EXPERTS,) if family == "olmoe" else (Kind.EXPERTS, Kind.QUERY_HEADS)
    plan = expert_plan(model, 3)
    if family != "olmoe":
        plan["layers.1.query_heads"] = [1, 3]  # one query head of each KV group
    pruned, masked, _ = prune_and_mask(model, kinds, plan=plan)
    torch.testing.assert_close(logits(pruned, IDS), logits(masked, IDS), rtol=0, atol=1e-5)
    assert not torch.allclose(logits(model, IDS), logits(masked, IDS), atol=1e-3)  # the removal matters
    moe_layers = [s for s in adapter_for(pruned).layer_shapes(pruned) if "experts" in s]
    assert moe_layers and {s["experts"] for s in moe_layers} == {5}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_masked_reference_masking_nothing_is_the_model(family):
    """The reference's router (softmax, top-k, renormalisation) is the family's own."""
    model = tiny_moe(family)
    masked = copy.deepcopy(model)
    adapter = adapter_for(masked)
    structure = adapter.discover(masked, (Kind.EXPERTS,))
    surgery.mask(masked, structure, {g.name: [] for g in structure.groups}, adapter)  # nothing planned: untouched
    for group in structure.groups:
        adapter.mask_experts(masked, group, [])
    torch.testing.assert_close(logits(masked, IDS), logits(model, IDS), rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_a_pruned_moe_loads_in_plain_transformers_and_in_llmp(family, tmp_path):
    pruned, _, _ = prune_and_mask(tiny_moe(family), (Kind.EXPERTS,), plan=expert_plan(tiny_moe(family), 3))
    expected = logits(pruned, IDS)
    save_pruned(pruned, tmp_path / "out", record=blank_record())
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    assert plain.config.num_experts_per_tok == 2
    torch.testing.assert_close(logits(plain, IDS), expected, rtol=0, atol=0)
    torch.testing.assert_close(logits(load_pruned(tmp_path / "out"), IDS), expected, rtol=0, atol=0)


def test_top_k_never_exceeds_the_experts_kept(tmp_path):
    model = tiny_moe("qwen3_moe", num_experts_per_tok=4)
    pruned, masked, _ = prune_and_mask(model, (Kind.EXPERTS,), plan=expert_plan(model, 6))
    assert pruned.config.num_experts_per_tok == 2 and pruned.config.num_experts == 2
    assert all(adapter_for(pruned).layers(pruned)[i].mlp.gate.top_k == 2 for i in range(3))
    torch.testing.assert_close(logits(pruned, IDS), logits(masked, IDS), rtol=0, atol=1e-5)
    save_pruned(pruned, tmp_path / "out", record=blank_record())
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(logits(plain, IDS), logits(pruned, IDS), rtol=0, atol=0)


def test_removing_a_layer_keeps_the_dense_layers_dense(tmp_path):
    """Qwen-MoE says which layers are dense by index (``mlp_only_layers``): the indices move with the layers."""
    model = tiny_moe("qwen3_moe-dense", layers=4)
    pruned, masked, _ = prune_and_mask(model, (Kind.LAYERS,), plan={"layers": [0]})
    assert pruned.config.mlp_only_layers == [0] and pruned.config.num_hidden_layers == 3
    torch.testing.assert_close(logits(pruned, IDS), logits(masked, IDS), rtol=0, atol=1e-5)
    save_pruned(pruned, tmp_path / "out", record=blank_record())
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(logits(plain, IDS), logits(pruned, IDS), rtol=0, atol=0)


def test_olmoe_heads_are_refused_with_the_reason():
    model = tiny_moe("olmoe")
    with pytest.raises(LlmpError, match="q_norm and k_norm normalise over all heads"):
        adapter_for(model).discover(model, (Kind.QUERY_HEADS,))
