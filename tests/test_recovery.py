"""Recovery in Lightning: instruction data, the StructuredPruning callback, RecoveryModule, `llmp fit`.

Every fit here trains the tiny model folder (``tiny_dir``) for a few steps on the shipped Alpaca
subset, on one CPU process; the multi-process runs are in test_distributed.py.
"""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from helpers import logits, recipe

from llmp import load_pruned
from llmp.callbacks import StructuredPruning
from llmp.checkpoints import read_entry
from llmp.data.instruct import alpaca_prompt
from llmp.data.recovery import InstructionData
from llmp.errors import LlmpError
from llmp.fit import launcher_args
from llmp.fit import main as fit_main
from llmp.pruning import PruneConfig, count_parameters
from llmp.recovery import LoraSettings, RecoveryModule, export_checkpoint


def data(tiny_dir, **kwargs) -> InstructionData:
    settings = dict(path="alpaca-1k", tokenizer=str(tiny_dir), max_samples=24, val_size=4, cutoff_len=192, batch_size=2)
    return InstructionData(**{**settings, **kwargs})


def trainer(**kwargs) -> L.Trainer:
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**settings, **kwargs})


# -- data -----------------------------------------------------------------------------------------
def test_labels_cover_the_response_only(tiny_dir):
    dm = data(tiny_dir, cutoff_len=256)
    dm.setup()
    record = {"instruction": "Name a colour.", "input": "", "output": "Blue is a colour."}
    example = dm.encode(record)
    prompt_len = len(dm.tokenizer(alpaca_prompt(record["instruction"]))["input_ids"])
    assert example["labels"][:prompt_len] == [-100] * prompt_len
    assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
    assert example["input_ids"][-1] == dm.tokenizer.eos_token_id
    everything = data(tiny_dir, cutoff_len=256, train_on_inputs=True)
    everything.setup()
    assert everything.encode(record)["labels"] == example["input_ids"]


def test_split_cutoff_and_padding(tiny_dir):
    dm = data(tiny_dir, cutoff_len=160)
    dm.setup()
    assert 0 < len(dm.val_set) <= 4 and 0 < len(dm.train_set) <= 20  # long prompts dropped
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[1] <= 160
    padded = batch["attention_mask"] == 0
    assert (batch["labels"][padded] == -100).all()
    assert (batch["input_ids"][padded] == dm.tokenizer.pad_token_id).all()
    again = data(tiny_dir, cutoff_len=160)
    again.setup()
    assert torch.equal(next(iter(again.train_dataloader()))["input_ids"], batch["input_ids"])  # seeded


def test_local_jsonl(tiny_dir, tmp_path):
    path = tmp_path / "mine.jsonl"
    rows = [
        {"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))} for i in range(2, 12)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = data(tiny_dir, path=str(path), val_size=2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (8, 2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(cutoff_len=4), "`cutoff_len` must be >= 8"),
        (dict(val_size=1.5), "`val_size` must be a fraction"),
        (dict(batch_size=0), "`batch_size` and `eval_batch_size` must be >= 1"),
        (dict(max_samples=1), "`max_samples` must be >= 2"),
    ],
)
def test_bad_data_settings(tiny_dir, kwargs, message):
    with pytest.raises(LlmpError, match=message):
        data(tiny_dir, **kwargs)


def test_data_errors_at_setup(tiny_dir, tmp_path):
    with pytest.raises(LlmpError, match="leaves no training data"):
        data(tiny_dir, val_size=24).setup()
    with pytest.raises(LlmpError, match="no train example keeps a response token within `cutoff_len` 8"):
        data(tiny_dir, cutoff_len=8).setup()
    with pytest.raises(LlmpError, match="needs a tokenizer"):
        data(tiny_dir, tokenizer=None).setup()
    with pytest.raises(LlmpError, match="missing.json"):
        data(tiny_dir, path=str(tmp_path / "missing.json")).setup()


# -- callback and module settings ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(config=dict(ratio=0.0)), "`ratio` must be between 0 and 1"),  # PruneConfig refuses it when built
        (dict(config=dict(ratio=1.0)), "`ratio` must be between 0 and 1"),
        (dict(schedule="steep:3"), "'linear:N' or 'cubic:N'"),
        (dict(schedule="linear:0"), "'linear:N' or 'cubic:N'"),
        (dict(schedule={0: 0.2, 1: 0.1}), "ratios must grow"),
        (dict(schedule={-1: 0.2}), "epochs >= 0"),
        (dict(num_samples=0), "`num_samples` must be >= 1"),
        (dict(seq_len=1), "`seq_len` must be >= 2"),
    ],
)
def test_bad_callback_settings(kwargs, message):
    with pytest.raises(LlmpError, match=message):
        StructuredPruning(**{k: PruneConfig(**v) if k == "config" else v for k, v in kwargs.items()})


def test_schedules():
    assert StructuredPruning(PruneConfig(ratio=0.3)).targets == {0: 0.3}
    assert StructuredPruning(PruneConfig(ratio=0.3), schedule="linear:3").targets == {0: 0.1, 1: 0.2, 2: 0.3}
    cubic = StructuredPruning(PruneConfig(ratio=0.3), schedule="cubic:3").targets
    assert cubic[0] > 0.1 and cubic[2] == 0.3  # removes more early
    assert StructuredPruning(PruneConfig(ratio=0.3), schedule={"0": 0.1, "2": 0.3}).targets == {0: 0.1, 2: 0.3}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="adapters"), "`mode` must be lora or full"),
        (dict(learning_rate=0), "`learning_rate` must be > 0"),
        (dict(lora=LoraSettings(r=0)), "`lora.r` must be >= 1; got 0"),
        (dict(lora=LoraSettings(dropout=1.0)), r"`lora.dropout` must be in \[0, 1\)"),
        (dict(weight_decay=-1), "`weight_decay` must be >= 0; got -1"),
        (dict(dtype="int8"), "`dtype` must be float32"),
    ],
)
def test_bad_module_settings(kwargs, message):
    with pytest.raises(LlmpError, match=message):
        RecoveryModule(**kwargs)


@pytest.mark.parametrize("strategy", ["zero2", "zero3", "fsdp"])
def test_iterative_pruning_refuses_sharded_strategies(strategy):
    from lightning.pytorch.strategies import FSDPStrategy

    if strategy.startswith("zero"):
        pytest.importorskip("deepspeed")
        from llmp.strategies import DeepSpeedStrategy

        chosen = DeepSpeedStrategy(stage=int(strategy[-1]))
    else:
        chosen = FSDPStrategy()
    callback = StructuredPruning(PruneConfig(ratio=0.3), schedule="linear:2")

    class Trainer:
        strategy = chosen

    with pytest.raises(LlmpError, match="cannot change mid-fit. Run the schedule as successive fits"):
        callback._check_strategy(Trainer())
    StructuredPruning(PruneConfig(ratio=0.3))._check_strategy(Trainer())  # one-shot: fine


def test_launcher_settings_reach_the_trainer():
    env = {"LT_ACCELERATOR": "cpu", "LT_DEVICES": "2", "LT_STRATEGY": "deepspeed_stage_3", "LT_PRECISION": ""}
    assert launcher_args(env) == [
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=llmp_deepspeed_stage_3",
    ]
    assert launcher_args({"LT_STRATEGY": "ddp"}) == ["--trainer.strategy=ddp"]
    assert launcher_args({}) == []


# -- fits -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_one_shot_fit_exports_a_loadable_model(tiny_dir, tmp_path, mode):
    module = RecoveryModule(str(tiny_dir), mode=mode, learning_rate=1e-3, warmup_steps=1)
    callback = StructuredPruning(PruneConfig(ratio=0.3, attention="kv", layers="0:4"), num_samples=2, seq_len=16)
    trainer(callbacks=[callback]).fit(module, datamodule=data(tiny_dir))
    assert callback.done == [0]
    assert 0.25 < module.record.achieved_ratio < 0.35  # LoRA weights not counted
    if mode == "lora":
        assert any("lora_" in n for n, _ in module.model.named_parameters())
    out = module.export(tmp_path / "out", {"mode": mode})
    assert not any("lora_" in n for n, _ in module.model.named_parameters())  # merged
    loaded = load_pruned(out)
    ids = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(logits(loaded, ids), logits(module.model, ids), rtol=0, atol=1e-5)
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["recovery"] == {"mode": mode} and len(report["steps"]) == 1
    assert report["params_after"] == count_parameters(loaded)


def test_bf16_and_gradient_checkpointing(tiny_dir):
    """bf16 weights and adapters, also for the adapters re-created after pruning between epochs."""
    module = RecoveryModule(str(tiny_dir), dtype="bfloat16", gradient_checkpointing=True, warmup_steps=1)
    callback = StructuredPruning(PruneConfig(ratio=0.2, criterion="l1"), schedule={0: 0.1, 1: 0.2})
    fit = trainer(callbacks=[callback], precision="bf16-true", limit_val_batches=0, max_epochs=2)
    fit.fit(module, datamodule=data(tiny_dir))
    assert module.base_model.is_gradient_checkpointing and module.trainer.global_step == 4
    assert len(module.record.steps) == 2 and any("lora_" in n for n, _ in module.model.named_parameters())
    assert {p.dtype for p in module.model.parameters()} == {torch.bfloat16}


class Metrics(L.pytorch.loggers.Logger):
    """Collects what is logged (for the pruning metrics)."""

    name, version = "metrics", 0

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict] = []

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append(dict(metrics))

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass


@pytest.mark.parametrize("allocation", ["uniform", "search"])
def test_scheduled_fit_prunes_between_epochs(tiny_dir, allocation):
    module = RecoveryModule(str(tiny_dir), learning_rate=1e-3, warmup_steps=1)
    config = PruneConfig(ratio=0.3, layers="0:4", allocation=allocation, search_generations=2)
    callback = StructuredPruning(config, schedule={0: 0.1, 1: 0.3}, num_samples=2, seq_len=16)
    logger = Metrics()
    fit = trainer(callbacks=[callback], max_epochs=2, logger=logger)
    fit.fit(module, datamodule=data(tiny_dir))
    assert callback.done == [0, 1] and len(module.record.steps) == 2
    assert [s.allocation.rule for s in module.record.steps] == [allocation] * 2  # searched at each step
    assert [s.allocation.generations for s in module.record.steps] == [2 if allocation == "search" else None] * 2
    steps = [m for m in logger.logged if "pruning/ratio" in m]
    assert [round(m["pruning/ratio"], 1) for m in steps] == [0.1, 0.3]
    assert steps[1]["pruning/params_before"] == steps[0]["pruning/params"] > steps[1]["pruning/params"]
    achieved = [1 - s.params_after / s.params_before for s in module.record.steps]
    assert achieved[0] < achieved[1]  # each step removes a share of the model it pruned
    assert 0.25 < module.record.achieved_ratio < 0.35
    assert module.is_lora_wrapped  # new adapters on the smaller model
    trained = {id(p) for p in module.model.parameters() if p.requires_grad}
    assert {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]} == trained


@pytest.mark.parametrize("stop", [0, 1])
def test_resume_in_the_middle_of_a_schedule(tiny_dir, tmp_path, stop):
    """A fit stopped after epoch 0 (one of two pruning steps done) or after epoch 1 (both done, the
    optimizer rebuilt once) resumes to the same final model: shapes, weights, learning rate."""
    epochs = {"trainer.max_epochs": 3}
    whole = tmp_path / "whole"
    run = recipe(tiny_dir, tmp_path, output=whole, **epochs, **{"trainer.enable_checkpointing": "false"})
    assert fit_main(run) == 0
    ckpts = tmp_path / "ckpts"
    checkpoint = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}
    checkpoint["init_args"] = {"dirpath": str(ckpts), "save_last": True}
    checkpoint = ["--trainer.callbacks+", json.dumps(checkpoint)]
    until = json.dumps({"class_path": "helpers.StopAfterEpoch", "init_args": {"epoch": stop}})
    assert fit_main([*recipe(tiny_dir, tmp_path, **epochs), *checkpoint, "--trainer.callbacks+", until]) == 0
    saved = read_entry(ckpts / "last.ckpt").record
    history = saved.steps
    assert saved.layer_shapes == history[-1].layer_shapes and len(saved.layer_shapes) == 4
    assert len(history) == stop + 1
    assert 0.07 < 1 - history[0].params_after / history[0].params_before < 0.13
    assert history[0].epoch == 0 and set(history[0].timings) == {"scoring_s", "planning_s", "surgery_s"}
    resumed = tmp_path / "resumed"
    # By path, and by `last` (the newest last*.ckpt of the ModelCheckpoint folder), as a requeued job would.
    ckpt_path = ckpts / "last.ckpt" if stop == 0 else "last"
    assert fit_main([*recipe(tiny_dir, tmp_path, output=resumed, ckpt_path=ckpt_path, **epochs), *checkpoint]) == 0
    a, b = load_pruned(whole), load_pruned(resumed)
    assert [tuple(p.shape) for p in a.parameters()] == [tuple(p.shape) for p in b.parameters()]
    ids = torch.randint(0, 200, (2, 12))
    torch.testing.assert_close(logits(a, ids), logits(b, ids), rtol=1e-4, atol=1e-4)
    reports = [json.loads((out / "pruning_report.json").read_text())["recovery"] for out in (whole, resumed)]
    assert reports[0]["epochs"] == reports[1]["epochs"] == 3
    assert reports[0]["optimizer_steps"] == reports[1]["optimizer_steps"] == 6
    report = json.loads((resumed / "pruning_report.json").read_text())
    assert report["settings"]["ratio"] == 0.3 and report["schedule"] == {"0": 0.1, "1": 0.3}
    assert [s["target_ratio"] for s in report["steps"]] == [0.1, 0.3]  # steps done before the stop included
    assert report["timings"]["scoring_s"] == pytest.approx(sum(s["timings"]["scoring_s"] for s in report["steps"]))


def test_python_fit_with_ckpt_path_rebuilds_the_checkpoint(tiny_dir, tmp_path, caplog):
    """`trainer.fit(..., ckpt_path=...)` names the checkpoint only after setup: the model pruned
    afresh there is rebuilt to the checkpoint's two steps, ready to train (gradient checkpointing)."""

    def run(max_epochs: int, ckpt_path=None) -> tuple[RecoveryModule, L.Trainer]:
        module = RecoveryModule(str(tiny_dir), learning_rate=1e-3, warmup_steps=1, gradient_checkpointing=True)
        callback = StructuredPruning(
            PruneConfig(ratio=0.3, layers="0:4"), schedule={0: 0.1, 1: 0.3}, num_samples=2, seq_len=16
        )
        fit = trainer(callbacks=[callback], max_epochs=max_epochs)
        fit.fit(module, datamodule=data(tiny_dir), ckpt_path=ckpt_path)
        return module, fit

    first, fit = run(2)
    fit.save_checkpoint(tmp_path / "two-steps.ckpt")
    with caplog.at_level("WARNING", logger="llmp.recovery"):
        resumed, fit = run(3, tmp_path / "two-steps.ckpt")
    assert "rebuilding its shapes" in caplog.text
    assert resumed.record.steps == first.record.steps and fit.global_step == 6
    shapes = [[tuple(p.shape) for p in m.base_model.parameters()] for m in (first, resumed)]
    assert shapes[0] == shapes[1]
    assert resumed.base_model.is_gradient_checkpointing and resumed.is_lora_wrapped


def test_checkpoint_exports_and_errors(tiny_dir, tmp_path):
    module = RecoveryModule(str(tiny_dir), learning_rate=1e-3, warmup_steps=1)
    callback = StructuredPruning(PruneConfig(ratio=0.2), num_samples=2, seq_len=16)
    fit = trainer(callbacks=[callback])
    fit.fit(module, datamodule=data(tiny_dir))
    fit.save_checkpoint(tmp_path / "run.ckpt")
    out = export_checkpoint(tmp_path / "run.ckpt", tmp_path / "out")
    exported = json.loads((out / "pruning_report.json").read_text())
    assert exported["settings"]["ratio"] == 0.2 and exported["calibration"]["num_samples"] == 2
    ids = torch.randint(0, 200, (2, 12))
    module.merge_adapters()
    torch.testing.assert_close(logits(load_pruned(out), ids), logits(module.model, ids), rtol=0, atol=1e-5)
    (tmp_path / "bad.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(LlmpError, match="cannot read checkpoint .*bad.ckpt.*corrupt"):
        read_entry(tmp_path / "bad.ckpt")
    with pytest.raises(LlmpError, match="does not exist"):
        read_entry(tmp_path / "none.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    with pytest.raises(LlmpError, match="not written by a llmp RecoveryModule"):
        export_checkpoint(tmp_path / "foreign.ckpt", tmp_path / "out2")


def test_fit_cli_errors(tiny_dir, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert fit_main(recipe(tiny_dir, tmp_path, output=tmp_path / "taken")) == 2
    assert "not empty" in capsys.readouterr().err
    assert fit_main(recipe(tiny_dir, tmp_path, ckpt_path=tmp_path / "none.ckpt")) == 2
    assert "`--ckpt_path` " in capsys.readouterr().err
    assert fit_main(recipe(tiny_dir, tmp_path, ckpt_path="hpc")) == 2
    assert "`--ckpt_path hpc`: " in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fit_prunes_with_activation_criteria_between_epochs(tiny_dir, tmp_path, mode):
    """flap + bias compensation, layer by layer, at fit start and between epochs: no gradients
    needed, calibration from the datamodule; the biases (trained in full mode, frozen under LoRA)
    export with the model."""
    module = RecoveryModule(str(tiny_dir), mode=mode, learning_rate=1e-3, warmup_steps=1)
    config = PruneConfig(ratio=0.3, layers="0:4", criterion="flap", compensate="bias", layerwise=True)
    callback = StructuredPruning(config, schedule={0: 0.1, 1: 0.3}, num_samples=2, seq_len=16)
    fit = trainer(callbacks=[callback], max_epochs=2)
    fit.fit(module, datamodule=data(tiny_dir))
    assert callback.done == [0, 1] and module.record.steps[0].biases  # the second step reuses them
    assert 0.25 < module.record.achieved_ratio < 0.35
    out = module.export(tmp_path / "out")
    model = load_pruned(out)
    assert model.model.layers[1].mlp.down_proj.bias is not None
    assert count_parameters(model) == module.record.params_after
    ids = torch.randint(0, 200, (1, 8))
    torch.testing.assert_close(logits(model, ids), logits(module.model, ids), rtol=0, atol=1e-5)  # merged by export


def test_ckpt_path_names_resolve_before_fit(tmp_path):
    """`last` and `hpc` resolve as Lightning resolves them, before `fit` (no private Lightning API)."""
    import os
    import time

    from lightning.pytorch.callbacks import ModelCheckpoint

    from llmp.fit import _checkpoint_path

    ckpts = tmp_path / "ckpts"
    trainer = L.Trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(dirpath=ckpts)], logger=False)
    assert _checkpoint_path(trainer, "last") is None  # nothing yet: the fit starts afresh
    ckpts.mkdir()
    for i, name in enumerate(("last.ckpt", "last-v1.ckpt", "epoch=0.ckpt")):
        (ckpts / name).write_bytes(b"x")
        os.utime(ckpts / name, (time.time() + i, time.time() + i))
    assert _checkpoint_path(trainer, "last") == str(ckpts / "last-v1.ckpt")  # the newest last*, not epoch=0
    with pytest.raises(LlmpError, match="no hpc_ckpt_N.ckpt"):
        _checkpoint_path(trainer, "hpc")
    for n in (2, 10):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_bytes(b"x")
    assert _checkpoint_path(trainer, "hpc") == str(tmp_path / "hpc_ckpt_10.ckpt")
    with pytest.raises(LlmpError, match="does not exist"):
        _checkpoint_path(trainer, str(tmp_path / "missing.ckpt"))
