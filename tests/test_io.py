"""Save → load gives the same model; the folder is complete, atomic and pickle-free."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model
from helpers import blank_record
from transformers import AutoModelForCausalLM

from llmp import LlmpError, PruneConfig, load_pruned, prune, save_pruned
from llmp.io import REPORT


@pytest.mark.parametrize(
    "config",
    [
        PruneConfig(ratio=0.2, attention="query", layers="1:3"),
        PruneConfig(ratio=0.15, scope="channel"),
        PruneConfig(ratio=0.2, scope="layer"),
        PruneConfig(ratio=0.2, attention="kv", mlp=True, steps=2, criterion="taylor2"),
    ],
    ids=["heads+mlp", "hidden", "layers", "iterative"],
)
def test_save_load_identical_logits(config, calib, inputs, tmp_path):
    model = tiny_model("llama-gqa")
    report = prune(model, config, calib)
    assert report.params_after < report.params_before
    out = save_pruned(model, tmp_path / "pruned", record=report)
    assert not list(out.glob("*.bin")) and list(out.glob("*.safetensors"))
    loaded = load_pruned(out)
    torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
    assert json.loads((out / REPORT).read_text())["achieved_ratio"] == report.achieved_ratio
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_uniform_layout_loads_with_plain_transformers(calib, inputs, tmp_path):
    model = tiny_model("llama-gqa")
    prune(model, PruneConfig(ratio=0.2, attention="query", layout="uniform"), calib)
    shapes = {(layer.self_attn.q_proj.out_features, layer.mlp.gate_proj.out_features) for layer in model.model.layers}
    assert len(shapes) == 1
    out = save_pruned(model, tmp_path / "uniform", record=blank_record())
    assert json.loads((out / REPORT).read_text())["loads_with_plain_transformers"] is True
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(plain(inputs).logits, model(inputs).logits, rtol=0, atol=1e-6)


def test_zero_ratio_changes_nothing(calib, inputs):
    model = tiny_model("llama-mha")
    before = model(inputs).logits
    report = prune(model, PruneConfig(ratio=0.0, attention="query"), calib)
    assert report.params_after == report.params_before
    torch.testing.assert_close(model(inputs).logits, before, rtol=0, atol=0)


def test_existing_output_is_kept_unless_overwrite(tmp_path):
    model = tiny_model("llama-mha")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(LlmpError, match="not empty"):
        save_pruned(model, tmp_path / "out")
    with pytest.raises(LlmpError, match="was not written by llmp"):
        save_pruned(model, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries, no lock left


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    out = save_pruned(tiny_model("llama-mha"), tmp_path / "m")
    weights = next(out.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(LlmpError, match="cannot read the model"):
        load_pruned(out)
    with pytest.raises(LlmpError, match="config.json is missing"):
        load_pruned(tmp_path)
