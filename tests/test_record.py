"""The record of a pruning run (``llmp.record``): one schema for reports, checkpoints and replay."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import logits, tiny_model

from llmp import LlmpError, PruneConfig, prune
from llmp.checkpoints import CheckpointEntry
from llmp.pruning import RunInput, replay
from llmp.record import SCHEMA, Calibration, PruningRecord, Step, read_record, write_record
from llmp.report import write_report
from llmp.structure import adapter_for

OLD = Path(__file__).parent / "golden" / "v0"  # written by llmp before the record existed (commit 58ba6ef)


@pytest.mark.parametrize("name", ["pruned", "fit"])
def test_folders_from_before_the_record_read_and_render_the_same(name, tmp_path, one_thread):
    folder = shutil.copytree(OLD / name, tmp_path / name)
    before = (folder / "report.md").read_text()
    record = read_record(folder)
    assert record.schema == SCHEMA and record.steps and isinstance(record.steps[0], Step)
    assert record.achieved_ratio == json.loads((folder / "pruning_report.json").read_text())["achieved_ratio"]
    assert write_report(folder)[0].read_text() == before


def test_a_checkpoint_entry_from_before_the_record_reads_as_one():
    saved = json.loads((OLD / "ckpt_llmp_entry.json").read_text())
    entry = CheckpointEntry.from_json(saved)
    record = entry.record
    assert entry.lora.dropout == saved["lora_settings"]["dropout"] and entry.mode == "lora" and entry.distill is None
    assert [s.plan for s in record.steps] == [s["plan"] for s in saved["history"]]
    assert record.settings == saved["pruning_settings"]["settings"] and record.schedule == {"0": 0.1, "1": 0.3}
    assert record.calibration.num_samples == 2
    assert entry.pruned_epochs() == sorted(s["epoch"] for s in saved["history"])
    with pytest.raises(LlmpError, match="not written by a llmp RecoveryModule"):
        CheckpointEntry.from_json({"model": "x"})
    again = CheckpointEntry.from_json(entry.to_json())
    assert again == entry
    damaged = {**entry.to_json(), "mode": "half", "lora": {"r": "eight"}}
    with pytest.raises(LlmpError, match=r"`mode`: .*half.*`lora.r`"):
        CheckpointEntry.from_json(damaged)


def test_json_round_trip_and_replay(calib, inputs):
    model = tiny_model("llama-gqa")
    original = copy.deepcopy(model)
    record = prune(model, PruneConfig(ratio=0.3, attention="kv", layers="0:4", steps=2, criterion="taylor"), calib)
    data = json.loads(json.dumps(record.to_json()))
    assert data["schema"] == SCHEMA and data["achieved_ratio"] == record.achieved_ratio
    again = PruningRecord.from_json(data)
    assert again == record
    replay(original, again.steps)  # the steps as read back repeat the same removals (no compensation: same values)
    torch.testing.assert_close(logits(original, inputs), logits(model, inputs), rtol=0, atol=0)


def test_write_and_read(tmp_path):
    record = PruningRecord("llama", 100, 80, [{"heads": 4, "kv_heads": 2, "mlp": 8}], model="m")
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record


def _break(path: str, value):
    def change(data):
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            _break("steps.0.plan", {"layers.1.mlp": ["x"]}),
            r"`steps\[0\]\.plan\.layers\.1\.mlp\[0\]`: input should be a valid integer",
        ),
        (_break("params_after", "many"), r"`params_after`: input should be a valid integer"),
        (_break("family", KeyError), r"`family`: field required"),
        (_break("typo", 1), r"`typo`: unexpected"),
        (_break("steps.0.kinds", "mlp"), r"`steps\[0\]\.kinds`: input should be a valid list"),
        (_break("perplexity", {"dense": "low"}), r"`perplexity\.dense`: input should be a valid number"),
        (_break("schema", SCHEMA + 1), "newer than this llmp reads"),
        (_break("recovery", {"mode": "lora", "steps": 3}), r"`recovery\.steps`: unexpected"),
    ],
)
def test_a_malformed_record_names_the_bad_key(tmp_path, change, message):
    data = json.loads((OLD / "pruned" / "pruning_report.json").read_text())
    change(data)
    (tmp_path / "pruning_report.json").write_text(json.dumps(data))
    with pytest.raises(LlmpError, match=message):
        read_record(tmp_path)


def test_not_an_object(tmp_path):
    (tmp_path / "pruning_report.json").write_text("[1, 2]")
    with pytest.raises(LlmpError, match="holds a list, not a pruning report object"):
        read_record(tmp_path)


@pytest.mark.parametrize("layerwise", [False, True])
def test_the_driver_records_what_it_was_given(layerwise):
    """The record is made whole by the driver that pruned: the input's name, calibration and load
    time, the dense shapes and the run's time (no caller patches fields in afterwards)."""
    model, calib = tiny_model("llama-gqa"), torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    dense = copy.deepcopy(model)
    config = PruneConfig(ratio=0.2, criterion="flap" if layerwise else "taylor", layerwise=layerwise)
    given = RunInput("tiny", Calibration("c4", 4, 16), load_s=1.5)
    record = prune(model, config, calib, given=given)
    assert (record.model, record.calibration) == ("tiny", given.calibration)
    assert record.dense_layer_shapes == adapter_for(dense).layer_shapes(dense) != record.layer_shapes
    assert record.timings["load_s"] == 1.5 and record.timings["prune_s"] > 0
