"""Every recipe parses, and so does every launch command its header comment shows.

`llmp fit ... --print_config` parses and type-checks a configuration without instantiating
anything (no model download, no GPU needed); the printed result is then built into the
settings objects, whose own checks (ratios, ranges, LoRA settings) run too.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from llmp.callbacks import StructuredPruning
from llmp.data.recovery import RecoveryData
from llmp.distill import DistillSettings
from llmp.fit import LAUNCHER_ENV
from llmp.fit import main as fit_main
from llmp.pruning import PruneConfig
from llmp.recovery import LoraSettings, RecoveryModule

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))
FABRIC_OPTIONS = {"--accelerator": "LT_ACCELERATOR", "--devices": "LT_DEVICES", "--strategy": "LT_STRATEGY"}


def header_commands(path: Path) -> list[str]:
    """The shell commands shown in a file's leading comment (``#   command``, ``\\`` continues)."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").rstrip())
    text = "\n".join(lines).replace("\\\n", " ")
    return [c.strip() for c in re.findall(r"^\s+((?:llmp fit|fabric run|srun|sbatch) .*)$", text, re.M)]


def printed_config(args: list[str], capsys, monkeypatch, env: dict[str, str] | None = None) -> dict:
    monkeypatch.chdir(ROOT)  # the commands name recipes/... from the project root
    for var in LAUNCHER_ENV:
        monkeypatch.delenv(var, raising=False)
    for var, value in (env or {}).items():
        monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as done:
        fit_main([*args, "--print_config"])
    assert done.value.code in (0, None), capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def fit_args(command: str) -> tuple[list[str], dict[str, str]]:
    """`llmp fit ARGS` or `fabric run OPTIONS recipes/launch.py ARGS` → (ARGS, launcher environment)."""
    words = shlex.split(command)
    if words[:2] == ["llmp", "fit"]:
        return words[2:], {}
    assert words[:2] == ["fabric", "run"] and "recipes/launch.py" in words, command
    launcher = words.index("recipes/launch.py")
    env = {}
    for i in range(2, launcher, 2):
        env[FABRIC_OPTIONS[words[i]]] = words[i + 1]
    return words[launcher + 1 :], env


def build(config: dict) -> None:
    """The settings objects of a printed configuration (their own validation runs)."""
    model = dict(config["model"])
    distill = DistillSettings(**model["distill"]) if model.get("distill") else None
    RecoveryModule(**{**model, "lora": LoraSettings(**model["lora"]), "distill": distill})
    RecoveryData(**config["data"])
    callbacks = [c for c in config["trainer"]["callbacks"] or [] if c["class_path"].endswith("StructuredPruning")]
    assert len(callbacks) == 1
    init = dict(callbacks[0]["init_args"])
    StructuredPruning(**{**init, "config": PruneConfig(**init["config"])})


OVERLAYS = ("strategies", "recovery")


@pytest.mark.parametrize("recipe", [p for p in RECIPES if not set(OVERLAYS) & set(p.parts)], ids=lambda p: p.stem)
def test_recipe_parses_and_shows_how_to_launch(recipe, capsys, monkeypatch):
    assert recipe.read_text().startswith("# ")
    commands = header_commands(recipe)
    assert any(f"--config recipes/{recipe.name}" in c for c in commands), "the header shows no launch command"
    build(printed_config(["--config", str(recipe)], capsys, monkeypatch))
    for command in commands:
        args, env = fit_args(command)
        config = printed_config(args, capsys, monkeypatch, env)
        build(config)
        if env.get("LT_STRATEGY"):
            assert config["trainer"]["strategy"] == env["LT_STRATEGY"]


@pytest.mark.parametrize("overlay", [p for p in RECIPES if "strategies" in p.parts], ids=lambda p: p.stem)
def test_strategy_overlays(overlay, capsys, monkeypatch):
    commands = header_commands(overlay)
    assert commands and all(overlay.name in c or "fabric run" in c for c in commands)
    for command in commands:
        if command.startswith("llmp fit"):
            args, _ = fit_args(command)
            config = printed_config(args, capsys, monkeypatch)
            assert config["trainer"]["strategy"] == yaml.safe_load(overlay.read_text())["trainer"]["strategy"]


@pytest.mark.parametrize("overlay", [p for p in RECIPES if "recovery" in p.parts], ids=lambda p: p.stem)
def test_recovery_overlays(overlay, capsys, monkeypatch):
    """Each distillation overlay's commands parse on top of the paper recipes and build."""
    commands = header_commands(overlay)
    assert len(commands) >= 2 and all(overlay.name in c for c in commands)
    for command in commands:
        args, _ = fit_args(command)
        config = printed_config(args, capsys, monkeypatch)
        assert config["model"]["distill"]["loss"] == "forward_kl"
        build(config)


def test_paper_setting():
    """recipes/llama-7b.yaml is the paper's LLaMA-7B setup (LLM-Pruner Sec. 4 and its repository)."""
    config = yaml.safe_load((ROOT / "recipes" / "llama-7b.yaml").read_text())
    pruning = config["trainer"]["callbacks"][0]["init_args"]
    assert (
        pruning["config"].items() >= {"ratio": 0.2, "scope": "block", "layers": "4:30", "criterion": "taylor"}.items()
    )
    assert config["model"]["lora"].items() >= {"r": 8, "alpha": 16, "dropout": 0.05}.items()
    assert config["model"]["learning_rate"] == 1e-4 and config["trainer"]["max_epochs"] == 2
    assert config["data"]["batch_size"] * config["trainer"]["accumulate_grad_batches"] == 64
    assert config["data"].items() >= {"path": "yahma/alpaca-cleaned", "cutoff_len": 256, "val_size": 2000}.items()


def test_slurm_script():
    script = ROOT / "recipes" / "slurm.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "srun python recipes/launch.py" in text and "#SBATCH --ntasks-per-node=8" in text
    for config in re.findall(r"recipes/\S+\.yaml", text):
        assert (ROOT / config).is_file(), config
