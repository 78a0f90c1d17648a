"""Benchmark: training throughput of RecoveryModule under a Lightning Trainer vs a bare PyTorch loop.

    python bench/recover.py [--model smollm2-135m] [--mode lora|full] [--batch-size 4] [--steps 10]

Both train the same model (loaded and LoRA-wrapped by RecoveryModule.setup), on the same
batches (the shipped Alpaca records, template and cutoff of InstructionData), with AdamW and the
same LR schedule, in the same precision. The bare loop is forward, backward, optimizer and
scheduler step, zero_grad. Each run skips ``--warmup`` steps, then times ``--steps``; the two
are interleaved (bare, Lightning, bare, Lightning, ...) ``--rounds`` times and the median step
time of each is reported. Prints one JSON object; ``ratio`` is Lightning's tokens/s over bare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import lightning as L
import torch

from llmp.data.instruct import InstructionData
from llmp.recovery import RecoveryModule


class Timer(L.Callback):
    """Wall time of every training step after the first ``warmup``, from one step's start to the
    next's: Lightning's whole loop (batch fetch, hooks, logging, optimizer, scheduler) counts."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.stamps = warmup, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.stamps.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module) -> None:
        self.stamps.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)][self.warmup :]


def module(args) -> RecoveryModule:
    dtype = "bfloat16" if args.precision == "bf16-true" else "float32"
    m = RecoveryModule(args.model, mode=args.mode, learning_rate=1e-4, warmup_steps=2, dtype=dtype)
    return m


def bare(args, batches: list[dict]) -> list[float]:
    m = module(args)
    m.setup("fit")
    model = m.model
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def lightning(args, batches: list[dict]) -> list[float]:
    timer = Timer(args.warmup)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision=args.precision,
        max_steps=len(batches),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)  # the same batches, as they are
    trainer.fit(module(args), train_dataloaders=loader)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--precision", choices=["32-true", "bf16-true"], default="32-true")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    L.seed_everything(0, verbose=False)
    data = InstructionData("alpaca-1k", tokenizer=args.model, cutoff_len=args.cutoff_len, batch_size=args.batch_size)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    tokens = [int(b["attention_mask"].sum()) for b in batches[args.warmup :]]
    results = {"bare": [], "lightning": []}
    for _ in range(args.rounds):
        results["bare"] += bare(args, batches)
        results["lightning"] += lightning(args, batches)
    out = {
        "model": args.model,
        "mode": args.mode,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "cutoff_len": args.cutoff_len,
        "mean_tokens_per_step": round(statistics.mean(tokens), 1),
        "timed_steps_per_run": args.steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for name, times in results.items():
        out[f"{name}_step_s_median"] = round(statistics.median(times), 4)
        out[f"{name}_tokens_per_s"] = round(sum(tokens) * args.rounds / sum(times), 1)
    out["ratio"] = round(out["lightning_tokens_per_s"] / out["bare_tokens_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
