"""Benchmark: pruning schedules at equal training steps, with the StructuredPruning callback.

    python bench/schedule.py --config recipes/smollm2-135m-half.yaml [--config OVERLAY.yaml] \
        --schedules none,cubic:2,cubic:4 --epochs 4 --steps 20 --out OUT

Each variant runs ``llmp fit`` in this process on the recipe with ``trainer.max_epochs`` EPOCHS,
``trainer.limit_train_batches`` STEPS and the callback's ``schedule`` set (``none``: one-shot at
fit start; ``cubic:N``: N steps at the starts of epochs 0..N-1), so every variant takes the same
optimizer steps on the same batches. A clock callback keeps (seconds since fit start, optimizer
step, val_ppl) at every validation. Prints one JSON object per variant, as it finishes: the curve,
the recipe's evaluation (dense/pruned/recovered perplexity), the greedy chat answer to "What is
the capital of France?", and the thread count. ``--steps 0`` keeps the recipe's own training (one
variant: the recipe's recovery curve).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
import yaml
from distill_grid import france  # the same greedy chat answer as the recovery grid's

from llmp.fit import main as fit
from llmp.models import load_model
from llmp.record import read_record


class Clock(L.Callback):
    """(seconds since fit start, optimizer step, val_ppl) at the end of every validation, one JSON
    line each into ``path`` (the recipe names the callback: the instance is not this script's)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_fit_start(self, trainer, pl_module) -> None:
        self.start = time.perf_counter()
        self.path.write_text("")

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        ppl = trainer.callback_metrics.get("val_ppl")
        point = {"s": round(time.perf_counter() - self.start, 1), "step": trainer.global_step}
        with self.path.open("a") as file:
            file.write(json.dumps({**point, "val_ppl": ppl and round(float(ppl), 2)}) + "\n")


def run(recipe: dict, schedule: str, epochs: int, steps: int, output: Path) -> dict:
    config = json.loads(json.dumps(recipe))  # a deep copy
    trainer = config["trainer"]
    if steps:
        trainer.update(max_epochs=epochs, limit_train_batches=steps)
        trainer.pop("val_check_interval", None)  # validate at each epoch's end
    (pruning,) = [c for c in trainer["callbacks"] if c["class_path"].endswith("StructuredPruning")]
    pruning["init_args"]["schedule"] = None if schedule == "none" else schedule
    curve = output.with_name(f"{output.name}.curve.jsonl")
    output.parent.mkdir(parents=True, exist_ok=True)
    trainer["callbacks"].append({"class_path": "schedule.Clock", "init_args": {"path": str(curve)}})
    config.update(output=str(output), overwrite=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as file:
        yaml.safe_dump(config, file)
    start = time.perf_counter()
    fit(["--config", file.name])
    record = read_record(output)
    return {
        "schedule": schedule,
        "epochs": trainer["max_epochs"],
        "steps_per_epoch": trainer["limit_train_batches"],
        "optimizer_steps": record.recovery.optimizer_steps,
        "fit_s": record.recovery.fit_s,
        "run_s": round(time.perf_counter() - start, 1),
        "achieved_ratio": record.achieved_ratio,
        "curve": [json.loads(line) for line in curve.read_text().splitlines()],
        "perplexity": {k: v for k, v in vars(record.perplexity).items() if k != "protocol"},
        "france": france(*load_model(str(output))),
        "threads": torch.get_num_threads(),
    }


def merge(into: dict, overlay: dict) -> None:
    """``overlay``'s keys over ``into``'s, mappings merged key by key (as ``llmp fit`` reads several ``--config``)."""
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            merge(into[key], value)
        else:
            into[key] = value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="recipe, then overlays merged over it (repeat)")
    parser.add_argument("--schedules", default="none,cubic:2,cubic:4")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="training steps per epoch (0: the recipe's)")
    parser.add_argument("--out", required=True, help="folder for the variants' models")
    args = parser.parse_args()
    recipe: dict = {}
    for path in args.config or ["recipes/smollm2-135m-half.yaml"]:
        merge(recipe, yaml.safe_load(Path(path).read_text()))
    for schedule in args.schedules.split(","):
        output = Path(args.out) / schedule.replace(":", "-")
        print(json.dumps(run(recipe, schedule, args.epochs, args.steps, output)), flush=True)


if __name__ == "__main__":
    main()
