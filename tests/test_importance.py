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


@pytest.mark.parametrize("criterion", ["taylor", "taylor2"])
def test_checkpointing_does_not_change_scores(calib, criterion):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.KV_GROUPS, Kind.MLP))
    plain = importance.score(model, structure, calib, criterion, checkpointing=False)
    kept = importance.score(model, structure, calib, criterion, checkpointing=True)
    for name in plain:
        torch.testing.assert_close(plain[name], kept[name], rtol=1e-5, atol=1e-12)
    assert "forward" not in vars(model.model.layers[0])  # the layers' own forward again


def test_bf16_weights_are_scored_in_float32(calib):
    model = tiny_model("llama-gqa")
    structure = adapter_for(model).discover(model, (Kind.MLP,))
    half = tiny_model("llama-gqa").to(torch.bfloat16)
    exact = importance.score(model, structure, calib, "l2")
    rounded = importance.score(half, adapter_for(half).discover(half, (Kind.MLP,)), calib, "l2")
    assert all(s.dtype == torch.float64 for s in rounded.values())
    for name in exact:  # only the bf16 rounding of the weights themselves differs
        torch.testing.assert_close(exact[name], rounded[name], rtol=2e-2, atol=0)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())  # no float32 copy kept


def test_chunked_calibration_loss_is_the_model_loss(calib, monkeypatch):
    """The head runs on a few tokens at a time; the loss and every gradient are the model's own."""
    model = tiny_model("llama-gqa")
    monkeypatch.setattr(importance, "LOSS_CHUNK_BYTES", 0)  # 16-token chunks: several, one partial
    plain = model(input_ids=calib, labels=calib, use_cache=False).loss
    plain.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked = importance.calibration_loss(model, calib)
    chunked.backward()
    torch.testing.assert_close(chunked, plain)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-7)
    assert "forward" not in vars(model.lm_head)  # the head's own forward again
