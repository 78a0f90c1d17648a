"""Faults: a fit killed with `kill -9` resumes to the same model; no file llmp reads can run code."""

import json
import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import logits, recipe

from llmp import load_pruned
from llmp.checkpoints import read_entry
from llmp.errors import LlmpError
from llmp.fit import main as fit_main
from llmp.recovery import export_checkpoint

TESTS = Path(__file__).resolve().parent


def _checkpointing(ckpts: Path) -> list[str]:
    callback = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
    callback["init_args"] = {"dirpath": str(ckpts), "save_last": True}
    return ["--trainer.callbacks+", json.dumps(callback)]


@pytest.mark.parametrize("where", ["HangAtEpoch", "HangWritingCheckpoint"])
def test_fit_killed_mid_schedule_resumes_to_the_same_model(tiny_dir, tmp_path, where):
    """kill -9 at the start of epoch 1 (pruning step 1 of 2 done, epoch 0's checkpoint written), or
    halfway through writing epoch 1's checkpoint, then `--ckpt_path last`: the shapes, parameter
    count and weights of an uninterrupted fit."""
    epochs = {"trainer.max_epochs": 3}
    whole = tmp_path / "whole"
    assert (
        fit_main(recipe(tiny_dir, tmp_path, output=whole, **epochs, **{"trainer.enable_checkpointing": "false"})) == 0
    )
    ckpts = tmp_path / "ckpts"
    hang = ["--trainer.callbacks+", json.dumps({"class_path": f"helpers.{where}", "init_args": {"epoch": 1}})]
    command = [sys.executable, "-m", "llmp.cli", "fit", *recipe(tiny_dir, tmp_path, **epochs), *_checkpointing(ckpts)]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, *hang], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in iter(proc.stdout.readline, ""):
        lines.append(line)
        if line.strip() == "HANGING":
            break
    proc.kill()
    proc.wait()
    assert lines and lines[-1].strip() == "HANGING", "".join(lines[-40:])
    assert len(read_entry(ckpts / "last.ckpt").record.steps) == 1  # killed between the two steps

    resumed = tmp_path / "resumed"
    assert (
        fit_main([*recipe(tiny_dir, tmp_path, output=resumed, ckpt_path="last", **epochs), *_checkpointing(ckpts)]) == 0
    )
    a, b = load_pruned(whole), load_pruned(resumed)
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
    ids = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(logits(a, ids), logits(b, ids), rtol=1e-4, atol=1e-4)


def test_sigterm_during_fit_says_what_was_kept(tiny_dir, tmp_path):
    """SIGTERM mid-fit: exit 130 with an llmp line naming the checkpoint to resume from, no output folder."""
    ckpts, out = tmp_path / "ckpts", tmp_path / "out"
    pause = ["--trainer.callbacks+", json.dumps({"class_path": "helpers.PauseAtEpoch", "init_args": {"epoch": 1}})]
    command = [
        sys.executable,
        "-m",
        "llmp.cli",
        "fit",
        *recipe(tiny_dir, tmp_path, output=out, **{"trainer.max_epochs": 3}),
    ]
    env = {**os.environ, "PYTHONPATH": str(TESTS), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*command, *_checkpointing(ckpts), *pause], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    assert any(line.strip() == "PAUSED" for line in iter(proc.stdout.readline, ""))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "training stopped (SIGTERM or Ctrl-C); resume with `--ckpt_path last`" in err
    assert f"interrupted: written completely: {ckpts / 'last.ckpt'}" in err and not out.exists()


class _RunsCode:
    """Unpickling this calls ``os.system``: what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_loads_inside_weights_only_loads_run_no_code_even_when_asked_to(tmp_path, monkeypatch):
    """DeepSpeed's consolidation calls `torch.load(..., weights_only=False)`: inside
    `weights_only_loads` that load still refuses code, and the environment is as before after."""
    from llmp.checkpoints import weights_only_loads

    marker, crafted = tmp_path / "pwned", tmp_path / "crafted.pt"
    torch.save({"x": _RunsCode(marker)}, crafted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # a user's setting: set aside, then restored
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(crafted, weights_only=False)
    assert not marker.exists()
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1" and "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_crafted_checkpoint_runs_no_code(tmp_path, capsys, tiny_dir):
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.ckpt"
    torch.save({"state_dict": {}, "llmp": {"history": [], "x": _RunsCode(marker)}}, crafted)
    with pytest.raises(LlmpError, match="cannot read checkpoint .*crafted.ckpt"):
        read_entry(crafted)
    with pytest.raises(LlmpError, match="cannot read checkpoint .*crafted.ckpt"):
        export_checkpoint(crafted, tmp_path / "out")
    assert fit_main(recipe(tiny_dir, tmp_path, ckpt_path=crafted)) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()
    with open(tmp_path / "plain.pkl", "wb") as f:  # the same object unpickled plainly does run: the test can fail
        pickle.dump(_RunsCode(marker), f)
    with open(tmp_path / "plain.pkl", "rb") as f:
        pickle.load(f)
    assert marker.exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"eval.data": "wikitext-2.txt"}, "`eval.data` file wikitext-2.txt does not exist"),
        ({"eval.max_tokens": -5}, "`eval.max_tokens` must be a positive number"),
        ({"trainer.max_epochs": 1}, r"`schedule` prunes at epoch\(s\) \[1\], but the fit ends after"),
    ],
)
def test_fit_refuses_what_would_fail_after_training(tiny_dir, tmp_path, capsys, overrides, message):
    import re

    assert fit_main(recipe(tiny_dir, tmp_path, output=tmp_path / "out", **overrides)) == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "lightning_logs").exists()


def test_schedule_must_end_at_the_config_ratio():
    from llmp import PruneConfig
    from llmp.callbacks import StructuredPruning

    with pytest.raises(LlmpError, match=r"`schedule` ends at ratio 0.2 but `config.ratio` is 0.3"):
        StructuredPruning(PruneConfig(ratio=0.3), schedule={0: 0.1, 1: 0.2})


def test_remote_code_never_runs_unless_asked(tmp_path, capsys, monkeypatch):
    """A folder whose config.json names its own Python (`auto_map`) is refused, and its code does not run."""
    folder = tmp_path / "custom"
    folder.mkdir()
    marker = tmp_path / "ran"
    (folder / "configuration_evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('x')\n"
        "from transformers import PretrainedConfig\nclass EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n"
    )
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(b"")
    monkeypatch.delenv("LLMP_TRUST_REMOTE_CODE", raising=False)
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # a prompt would read from here
    code, _, err = _run(capsys, "eval", "ppl", "--model", folder, "--data", "wikitext2")
    assert code == 2 and "needs its own Python code" in err and "--trust-remote-code" in err
    assert not marker.exists()


def _run(capsys, *argv):
    from helpers import run_cli

    return run_cli(capsys, *argv)
