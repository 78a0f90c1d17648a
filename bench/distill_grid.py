"""Benchmark: recovery losses × data × modes at the same wall-clock budget, on one pruned model.

    python bench/distill_grid.py --pruned DIR --budget-s 240 \\
        --runs ce:alpaca-1k:lora,kd:c4-train:lora,... --eval wikitext2,PTB_FILE --out OUT

``DIR`` is a folder written by ``llmp prune``; the teacher of the distillation runs is the model
it was pruned from. A run is ``loss:data:mode[:seed]``:

* ``loss``: ``ce`` (language-model loss), ``kd`` (forward KL from the teacher), ``mix`` (half each);
* ``data``: a RecoveryData source (``alpaca-1k``: Alpaca records, response-only labels;
  ``c4-train``: packed general text, every token a label);
* ``mode``: ``lora`` (the quickstart's r 8 on all linear layers, lr 1e-3) or ``full`` (lr 1e-4).

Equal wall-clock: each run takes ``floor(budget / step_s)`` optimizer steps, ``step_s`` being
the median step time of that loss, data and mode, measured first (on a quiet machine: the
calibration is the only timed part) over ``--calibrate`` steps after one warm-up step, in a
throwaway fit of the same settings, and kept in ``OUT/step_times.json`` (a ``mix`` uses ``kd``'s
time). The runs themselves take a fixed number of steps, so their timings do not matter. Then the
recovered model is exported and measured: perplexity on each ``--eval`` text (first 16,384
tokens, 128-token windows, no BOS: the project's protocol) and the greedy chat answer to "What
is the capital of France?". Each run's row is appended to ``OUT/grid.jsonl`` (a run already
there is skipped, so an interrupted grid resumes); the table is printed as JSON lines.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from llmp.data import RecoveryData, read_text
from llmp.distill import DistillSettings, original_of
from llmp.eval import perplexity
from llmp.models import load_model
from llmp.recovery import RecoveryModule

LOSSES = {"ce": None, "kd": DistillSettings(), "mix": DistillSettings(weight=0.5)}
LEARNING_RATES = {"lora": 1e-3, "full": 1e-4}
PROMPT = "What is the capital of France?"


def france(model, tokenizer) -> str:
    """The greedy chat answer of ``llmp generate --chat --max-new-tokens 24``."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True)


def measure(model, tokenizer, texts: dict[str, str]) -> dict:
    row = {name: round(perplexity(model, tokenizer, text, 128, 16384).ppl, 2) for name, text in texts.items()}
    row["france"] = france(model, tokenizer)
    row["paris"] = "paris" in row["france"].lower()
    return row


class Timer(L.Callback):
    """Seconds from each training step's start to the next's."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(time.perf_counter())


def fit(args, loss: str, data: str, mode: str, seed: int, steps: int, callbacks=()) -> RecoveryModule:
    L.seed_everything(seed, verbose=False)
    module = RecoveryModule(
        args.pruned, mode=mode, learning_rate=LEARNING_RATES[mode], warmup_steps=5, seed=seed, distill=LOSSES[loss]
    )
    datamodule = RecoveryData(data, cutoff_len=256, val_size=40, batch_size=4, seed=42 + seed, tokenizer=args.pruned)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=list(callbacks),
    )
    trainer.fit(module, datamodule=datamodule)
    module.teacher = None
    return module


def step_time(args, key: str) -> float:
    """Median step seconds of ``loss/data/mode`` after one warm-up step."""
    timer = Timer()
    fit(args, *key.split("/"), seed=0, steps=args.calibrate + 1, callbacks=[timer])
    times = [b - a for a, b in zip(timer.stamps, timer.stamps[1:], strict=False)][1:]
    return round(statistics.median(times), 3)


def run(args, spec: str, step_times: dict, texts: dict) -> dict:
    loss, data, mode, *rest = spec.split(":")
    seed = int(rest[0]) if rest else 0
    step_s = step_times[f"{'kd' if loss == 'mix' else loss}/{data}/{mode}"]
    steps = max(1, math.floor(args.budget_s / step_s))
    start = time.perf_counter()
    module = fit(args, loss, data, mode, seed, steps)
    fit_s = time.perf_counter() - start
    folder = Path(args.out) / spec.replace(":", "-")
    module.export(folder, {"grid": spec, "steps": steps}, overwrite=True)
    model, tokenizer = load_model(str(folder))
    row = {"run": spec, "loss": loss, "data": data, "mode": mode, "seed": seed, "steps": steps, "step_s": step_s}
    row.update(fit_s=round(fit_s, 1), threads=torch.get_num_threads(), **measure(model, tokenizer, texts))
    return row


def table(rows: list[dict], texts: list[str]) -> str:
    """The rows as a Markdown table (baselines first, then the runs by their first text's perplexity)."""
    head = ["run", "steps", "step s", *texts, "France answer"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    runs = sorted((r for r in rows if "steps" in r), key=lambda r: r[texts[0]])
    for r in [r for r in rows if "steps" not in r] + runs:
        answer = r["france"].strip().replace("\n", " ").replace("|", "/")[:60]
        cells = [r["run"], str(r.get("steps", "")), str(r.get("step_s", "")), *(f"{r[t]:.2f}" for t in texts)]
        lines.append("| " + " | ".join([*cells, ("**Paris** " if r["paris"] else "") + answer]) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruned", required=True, help="a folder written by `llmp prune`")
    parser.add_argument("--runs", required=True, help="comma-separated loss:data:mode[:seed]")
    parser.add_argument("--budget-s", type=float, default=240.0, help="training seconds per run")
    parser.add_argument("--calibrate", type=int, default=3, help="timed steps per loss/data/mode")
    parser.add_argument("--eval", default="wikitext2", help="comma-separated perplexity texts")
    parser.add_argument("--baselines", action="store_true", help="also measure the dense and the pruned model")
    parser.add_argument("--out", required=True)
    parser.add_argument("--table", action="store_true", help="print OUT/grid.jsonl as a Markdown table and stop")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "grid.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    if args.table:
        print(table(rows, [Path(name).stem for name in args.eval.split(",")]))
        return
    done = {r["run"] for r in rows}
    times_file = out / "step_times.json"
    step_times = json.loads(times_file.read_text()) if times_file.exists() else {}
    for spec in args.runs.split(","):
        loss, data, mode, *_ = spec.split(":")
        key = f"{'kd' if loss == 'mix' else loss}/{data}/{mode}"
        if key not in step_times:
            step_times[key] = step_time(args, key)
            times_file.write_text(json.dumps(step_times, indent=1))
            print(json.dumps({"calibrated": key, "step_s": step_times[key], "threads": torch.get_num_threads()}))
    texts = {Path(name).stem: read_text(name) for name in args.eval.split(",")}
    jobs = [s for s in args.runs.split(",") if s not in done]
    if args.baselines:
        for name, spec in (("dense", original_of(args.pruned)), ("pruned", args.pruned)):
            if name not in done:
                model, tokenizer = load_model(spec)
                row = {"run": name, **measure(model, tokenizer, texts)}
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    for spec in jobs:
        row = run(args, spec, step_times, texts)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
