"""Multi-process recovery for real: `fabric run` with 2 CPU processes (gloo), DDP and DeepSpeed ZeRO.

Each test launches ``recipes/launch.py`` the way the recipes document it, trains the tiny model
folder for a few steps, and checks the one job that results: both ranks pruned the same
structures, and the saved folder (for ZeRO: consolidated from the sharded checkpoint) loads.
The CUDA variants skip without a GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import recipe_file

from llmp import load_pruned

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[1]


def tiny_recipe(
    tiny_dir: Path, tmp_path: Path, mode: str, schedule: dict | None = None, pruning: dict | None = None, **sections
) -> Path:
    settings = {
        "trainer": {"enable_checkpointing": False},
        "output": tmp_path / "out",
        "eval": {"max_tokens": 1024},
        **sections,
    }
    return recipe_file(
        tiny_dir, tmp_path, mode, schedule, single_device=False, pruning=pruning, **settings
    )  # fabric run


def fabric_run(
    strategy: str, config: Path, accelerator: str = "cpu", extra_args=(), extra_env=None, timeout: int = 900, ok=True
) -> str:
    command = [
        *(str(Path(sys.executable).with_name("fabric")), "run"),  # the command the recipes show
        *(f"--accelerator={accelerator}", "--devices=2", f"--strategy={strategy}"),
        *(str(ROOT / "recipes" / "launch.py"), "--config", str(config), *extra_args),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=config.parent)
    output = done.stdout + done.stderr
    assert (done.returncode == 0) == ok, output[-6000:]
    return output


def plans_by_rank(output: str) -> dict[int, list[str]]:
    plans: dict[int, list[str]] = {}
    for rank, plan in re.findall(r"rank (\d) pruned at epoch \d+: .* plan ([0-9a-f]{12})", output):
        plans.setdefault(int(rank), []).append(plan)
    return plans


def check_output(tmp_path: Path, world_size: int, steps: int) -> dict:
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["recovery"]["world_size"] == world_size and len(report["steps"]) == steps
    ppl = report["perplexity"]
    assert ppl["data"] == "wikitext2"  # the data name, as `llmp prune`
    assert ppl["dense"] > 1 and ppl["recovered"] > 1
    # It trained: 2 epochs x 2 batches per rank, and the weights moved (recovered != pruned).
    assert report["recovery"]["optimizer_steps"] == 4
    if steps == 1:
        assert abs(ppl["recovered"] - ppl["pruned"]) > 1e-3 * ppl["pruned"] > 0
    else:  # later steps refit a model trained in between: no untrained pruned model to measure
        assert ppl.get("pruned") is None
    model = load_pruned(tmp_path / "out")
    assert 0.25 < report["achieved_ratio"] < 0.35
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 200, (1, 8))).logits).all()
    return report


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_ddp_two_processes_prune_identically(tiny_dir, tmp_path, mode):
    """An iterative schedule under DDP: every rank removes the same structures at every step, and
    training goes on in the new DDP wrapper (full mode: the kept parameters are the old wrapper's)."""
    output = fabric_run("ddp", tiny_recipe(tiny_dir, tmp_path, mode, schedule={0: 0.1, 1: 0.3}))
    plans = plans_by_rank(output)
    assert set(plans) == {0, 1} and len(plans[0]) == 2 and plans[0] == plans[1]
    assert "fabric run settings mapped onto the Trainer" in output
    check_output(tmp_path, world_size=2, steps=2)


def test_ddp_layerwise_flap_prunes_identically(tiny_dir, tmp_path):
    """flap + bias, layer by layer, under DDP: rank 0's plan of every layer is broadcast, so both
    ranks remove the same structures and train the same compensated model."""
    settings = {"criterion": "flap", "compensate": "bias", "layerwise": True}
    output = fabric_run("ddp", tiny_recipe(tiny_dir, tmp_path, "full", schedule={0: 0.1, 1: 0.3}, pruning=settings))
    plans = plans_by_rank(output)
    assert set(plans) == {0, 1} and len(plans[0]) == 2 and plans[0] == plans[1]
    report = check_output(tmp_path, world_size=2, steps=2)
    assert report["settings"]["criterion"] == "flap" and report["steps"][0]["biases"]


@pytest.mark.parametrize(
    ("strategy", "mode"),
    [("ddp", "lora"), ("ddp", "full"), ("deepspeed_stage_2", "full"), ("deepspeed_stage_3", "lora")],
    ids=lambda v: str(v),
)
def test_a_moe_prunes_experts_identically_and_distils_on_two_processes(tmp_path, strategy, mode):
    """A MoE under DDP and ZeRO: both ranks remove the same experts at fit start, train (LoRA on the
    fused experts, or everything with the routers) with distillation from the unpruned model, and
    the folder (for ZeRO: consolidated) loads in plain transformers."""
    from helpers import make_tiny_moe_folder
    from transformers import AutoModelForCausalLM

    moe = make_tiny_moe_folder(tmp_path / "moe")
    pruning = {"experts": 0.5, "ratio": 0.0, "attention": "none", "layers": None}
    config = tiny_recipe(moe, tmp_path, mode, pruning=pruning, model={"distill": {"weight": 0.5}})
    if strategy != "ddp":
        pytest.importorskip("deepspeed")
    output = fabric_run(strategy, config)
    plans = plans_by_rank(output)
    assert set(plans) == {0, 1} and plans[0] == plans[1]
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["recovery"]["world_size"] == 2 and report["recovery"]["optimizer_steps"] == 4
    assert [s["kinds"] for s in report["steps"]] == [["experts"]]
    ppl = report["perplexity"]
    assert abs(ppl["recovered"] - ppl["pruned"]) > 1e-3 * ppl["pruned"] > 0  # it trained
    plain, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not any(info.values()) and plain.config.num_experts == 4


@pytest.mark.parametrize(("stage", "mode"), [(2, "lora"), (2, "full"), (3, "lora"), (3, "full")], ids=lambda v: str(v))
def test_deepspeed_zero_on_cpu(tiny_dir, tmp_path, stage, mode):
    """ZeRO-2/3 on 2 CPU processes: trained, checkpoint sharded, consolidated to fp32, exported."""
    pytest.importorskip("deepspeed")
    output = fabric_run(f"deepspeed_stage_{stage}", tiny_recipe(tiny_dir, tmp_path, mode))
    plans = plans_by_rank(output)
    assert set(plans) == {0, 1} and plans[0] == plans[1]
    shards = list((tmp_path / "out.zero-checkpoint").rglob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer shard per rank
    report = check_output(tmp_path, world_size=2, steps=1)
    assert report["recovery"]["strategy"] == "DeepSpeedStrategy" and report["recovery"]["mode"] == mode


def test_a_zero_checkpoint_without_room_beside_the_output_goes_where_there_is(tiny_dir, tmp_path, small_fs):
    """The output's file system holds the model but not the ZeRO checkpoint (its optimizer states):
    the shards go to the fit's root folder (said in the log), and the output is written from them."""
    pytest.importorskip("deepspeed")
    small = small_fs(1600)  # the dense weights (742 KiB) fit; 2 ranks' fp32 states and Adam moments do not
    output = fabric_run("deepspeed_stage_2", tiny_recipe(tiny_dir, tmp_path, "full", output=small / "out"))
    assert "no room for the ZeRO checkpoint beside" in output, output[-3000:]
    (kept,) = tmp_path.glob("llmp-out-*.zero-checkpoint")
    assert len(list(kept.rglob("*optim_states.pt"))) == 2 and not (small / "out.zero-checkpoint").exists()
    assert load_pruned(small / "out").num_parameters() > 0


def test_a_zero_export_into_a_full_disk_names_the_kept_checkpoint(tiny_dir, tmp_path, small_fs):
    """The output's disk fills while the fit trains: the shards go to the fit's root folder, the
    export fails with one line naming them, and they export from there once there is room."""
    pytest.importorskip("deepspeed")
    from llmp.recovery import export_checkpoint

    small = small_fs(1600)
    fill = json.dumps({"class_path": "helpers.FillDisk", "init_args": {"folder": str(small)}})
    config = tiny_recipe(tiny_dir, tmp_path, "full", output=small / "out")
    env = {"PYTHONPATH": str(ROOT / "tests")}
    output = fabric_run("deepspeed_stage_2", config, extra_args=["--trainer.callbacks+", fill], extra_env=env, ok=False)
    (kept,) = tmp_path.glob("llmp-out-*.zero-checkpoint")
    assert f"the trained model is kept in the ZeRO checkpoint {kept}" in output, output[-3000:]
    assert "Traceback" not in output.split("the trained model is kept")[0][-2000:]
    assert not (small / "out").exists()
    saved = export_checkpoint(kept, tmp_path / "saved")
    assert load_pruned(saved).num_parameters() < load_pruned(tiny_dir).num_parameters()


@pytest.mark.parametrize(
    ("strategy", "mode"), [("ddp", "full"), ("deepspeed_stage_2", "lora"), ("deepspeed_stage_3", "full")]
)
def test_distillation_under_every_strategy(tiny_dir, tmp_path, strategy, mode):
    """KD from the dense model on 2 CPU processes: each rank holds the whole teacher (outside the
    DDP wrapper or the ZeRO engine, so never partitioned, trained or saved) and both train."""
    if strategy.startswith("deepspeed"):
        pytest.importorskip("deepspeed")
    distill = {"weight": 0.5, "dtype": "bfloat16"}
    config = tiny_recipe(tiny_dir, tmp_path, mode, model={"distill": distill})
    output = fabric_run(strategy, config)
    held = re.findall(r"rank (\d) holds the teacher .* whole, in torch.bfloat16", output)
    assert sorted(held) == ["0", "1"], output[-3000:]
    report = check_output(tmp_path, world_size=2, steps=1)
    assert report["recovery"]["distill"]["weight"] == 0.5
    if strategy.startswith("deepspeed"):
        states = [
            torch.load(f, weights_only=False) for f in (tmp_path / "out.zero-checkpoint").rglob("*model_states.pt")
        ]
        names = {n for state in states for n in (state.get("module") or {})} | {
            n for state in states for group in state.get("param_shapes") or [] for n in group
        }
        assert names and not any("teacher" in n for n in names)


def test_deepspeed_resume_rebuilds_the_pruned_shapes(tiny_dir, tmp_path):
    """A ZeRO-2 fit stopped after epoch 0 resumes from its sharded checkpoint folder."""
    pytest.importorskip("deepspeed")
    stop = [
        {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(tmp_path / "ckpts")},
        },
        {"class_path": "helpers.StopAfterEpoch"},
    ]
    first = tiny_recipe(tiny_dir, tmp_path, "lora", callbacks=stop, name="first.yaml", trainer={}, output=None)
    config = tiny_recipe(tiny_dir, tmp_path, "lora")
    env = {"PYTHONPATH": str(Path(__file__).parent)}  # StopAfterEpoch lives in helpers
    fabric_run("deepspeed_stage_2", first, extra_env=env)
    (stopped,) = (tmp_path / "ckpts").glob("*.ckpt")
    assert stopped.is_dir()  # ZeRO: a folder of shards
    fabric_run("deepspeed_stage_2", config, extra_args=["--ckpt_path", str(stopped)])
    report = check_output(tmp_path, world_size=2, steps=1)
    assert report["recovery"]["epochs"] == 2


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_cuda(tiny_dir, tmp_path, stage):
    """The stock Lightning DeepSpeed path on GPUs, bf16."""
    pytest.importorskip("deepspeed")
    config = tiny_recipe(tiny_dir, tmp_path, "lora", trainer={"enable_checkpointing": False, "precision": "bf16-mixed"})
    fabric_run(f"deepspeed_stage_{stage}", config, accelerator="cuda")
    check_output(tmp_path, world_size=2, steps=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("stage", [2, 3])
def test_distillation_under_stock_deepspeed_on_cuda(tiny_dir, tmp_path, stage):
    """KD under Lightning's own DeepSpeed strategy on one GPU, bf16: the teacher follows the
    student onto the GPU (bf16, whole) and training runs."""
    pytest.importorskip("deepspeed")
    settings = {"accelerator": "cuda", "devices": 1, "strategy": f"deepspeed_stage_{stage}", "precision": "bf16-mixed"}
    config = recipe_file(
        tiny_dir,
        tmp_path,
        "lora",
        model={"distill": {"weight": 0.5, "dtype": "bfloat16"}},
        trainer={**settings, "enable_checkpointing": False},
        output=tmp_path / "out",
        eval={"max_tokens": 1024},
    )
    command = [str(Path(sys.executable).with_name("llmp")), "fit", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert re.search(r"rank 0 holds the teacher .* whole, in torch.bfloat16", output), output[-3000:]
    report = json.loads((tmp_path / "out" / "pruning_report.json").read_text())
    assert report["recovery"]["distill"]["weight"] == 0.5 and report["recovery"]["strategy"] == "DeepSpeedStrategy"
