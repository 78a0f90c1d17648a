"""Save → load gives the same model; the folder is complete, atomic and pickle-free."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import blank_record, tiny_model
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


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1])
def test_a_ratio_outside_zero_to_one_is_refused_when_the_config_is_made(ratio):
    """One range for every front door (CLI, Python, callback): a run that removes nothing is a mistake."""
    with pytest.raises(LlmpError, match=rf"`ratio` must be between 0 and 1, both excluded.*got {ratio}"):
        PruneConfig(ratio=ratio)


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


def test_bf16_checkpoint_stays_bf16(calib, inputs, tmp_path):
    source = tmp_path / "bf16"
    tiny_model("llama-gqa").to(torch.bfloat16).save_pretrained(source)
    model = load_pruned(source)  # dtype unset: as stored
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    record = prune(model, PruneConfig(ratio=0.2, attention="kv"), calib)
    out = save_pruned(model, tmp_path / "pruned", record=record)
    assert json.loads((out / REPORT).read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    assert size < 0.85 * sum(f.stat().st_size for f in source.glob("*.safetensors"))
    loaded = load_pruned(out)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    torch.testing.assert_close(loaded(inputs).logits, model(inputs).logits, rtol=0, atol=0)
    widened = load_pruned(out, torch.float32)
    assert {p.dtype for p in widened.parameters()} == {torch.float32}
    torch.testing.assert_close(
        widened.model.layers[0].mlp.up_proj.weight, model.model.layers[0].mlp.up_proj.weight.float()
    )


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda b: b[:4], "too short"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "header length"),
        (lambda b: b[: len(b) - 8], "offsets"),
    ],
    ids=["short", "header-length", "truncated"],
)
def test_damaged_safetensors_is_named(tmp_path, damage, message):
    from llmp.io import read_safetensors

    out = save_pruned(tiny_model("llama-mha"), tmp_path / "m")
    weights = next(out.glob("*.safetensors"))
    intact = read_safetensors(weights)
    assert intact.keys() and all(not t.is_shared() for t in intact.values())
    weights.write_bytes(damage(weights.read_bytes()))
    with pytest.raises(ValueError, match=message):
        read_safetensors(weights)
