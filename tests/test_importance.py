"""Importance scores match their definitions, however the calibration is batched."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from llmp import importance
from llmp.structure import Kind, adapter_for


def test_taylor_matches_its_definition(calib):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    scores = importance.score(model, structure, calib, "taylor")
    model.zero_grad()
    model(input_ids=calib, labels=calib).loss.backward()
    mlp = model.model.layers[2].mlp
    expected = sum(
        (w.weight * w.weight.grad).abs().sum(dim)
        for w, dim in ((mlp.gate_proj, 1), (mlp.up_proj, 1), (mlp.down_proj, 0))
    )
    torch.testing.assert_close(scores["layers.2.mlp"], expected.double(), rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("criterion", ["taylor", "vectorwise"])
def test_batching_does_not_change_scores(calib, criterion):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.QUERY_HEADS, Kind.MLP))
    one = importance.score(model, structure, calib, criterion, batch_size=len(calib))
    many = importance.score(model, structure, calib, criterion, batch_size=1)
    for name in one:
        torch.testing.assert_close(one[name], many[name], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())  # nothing left behind


def test_second_order_is_the_fisher_term(calib):
    model = tiny_model("llama-mha")
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    scores = importance.score(model, structure, calib, "taylor2")
    mlp = model.model.layers[0].mlp
    parts = ((mlp.gate_proj.weight, 1), (mlp.up_proj.weight, 1), (mlp.down_proj.weight, 0))
    fisher = [torch.zeros_like(w) for w, _ in parts]
    for sample in calib:
        model.zero_grad()
        model(input_ids=sample[None], labels=sample[None]).loss.backward()
        for f, (w, _) in zip(fisher, parts, strict=True):
            f += w.grad**2 / len(calib)
    expected = sum((w.detach() ** 2 * f).sum(dim) for f, (w, dim) in zip(fisher, parts, strict=True))
    torch.testing.assert_close(scores["layers.0.mlp"], expected.double(), rtol=1e-4, atol=1e-12)
