"""Benchmark: training step time of RecoveryModule's losses under a Lightning Trainer, and of a bare loop.

    python bench/recover.py [--model smollm2-135m] [--mode lora|full] [--data alpaca-1k]
        [--variants bare,ce,kd] [--batch-size 4] [--steps 10] [--device cuda --strategy ddp]

Every variant trains the same model (loaded and LoRA-wrapped by RecoveryModule.setup), on the
same batches (``--data`` through RecoveryData: Alpaca records with their template and cutoff, or
packed general text), with AdamW and the same LR schedule, in the same precision:

* ``bare``: a plain PyTorch loop on ``model(**batch).loss`` (forward, backward, optimizer and
  scheduler step, zero_grad), no Lightning;
* ``ce``: RecoveryModule's language-model loss (the head on the labelled positions only);
* ``kd``, ``mix`` (weight 0.5), ``kd-top64``, ``kd-bf16`` (teacher in bfloat16), ``kd-all``
  (every non-padding token): distillation from the dense model (a copy of it, as loaded).

Each run skips ``--warmup`` steps, then times ``--steps``; the variants are interleaved
``--rounds`` times and the median step time of each is reported. Prints one JSON object;
``X_over_ce`` is a variant's median step time over ``ce``'s, ``lightning_over_bare`` is ce's
tokens/s over bare's. ``peak_rss_gb_after_X`` is the process's peak RSS once X first ran.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

import lightning as L
import torch

from llmp.data import RecoveryData
from llmp.distill import DistillSettings
from llmp.recovery import RecoveryModule

VARIANTS = {
    "ce": None,
    "kd": DistillSettings(),
    "mix": DistillSettings(weight=0.5),
    "kd-top64": DistillSettings(top_k=64),
    "kd-bf16": DistillSettings(dtype="bfloat16"),
    "kd-all": DistillSettings(tokens="all"),
}


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


def module(args, distill: DistillSettings | None = None) -> RecoveryModule:
    dtype = "bfloat16" if args.precision == "bf16-true" else "float32"
    return RecoveryModule(args.model, mode=args.mode, learning_rate=1e-4, warmup_steps=2, dtype=dtype, distill=distill)


def sync(args) -> None:
    if args.device == "cuda":
        torch.cuda.synchronize()  # a step's kernels are done before its time is read


def bare(args, batches: list[dict]) -> list[float]:
    m = module(args)
    m.setup("fit")
    model = m.model.to(args.device)
    batches = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 3))
    times = []
    for i, batch in enumerate(batches):
        sync(args)
        start = time.perf_counter()
        loss = model(**{k: v for k, v in batch.items() if k != "example"}).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        sync(args)
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return times


def lightning(args, batches: list[dict], distill: DistillSettings | None) -> list[float]:
    timer = Timer(args.warmup)
    trainer = L.Trainer(
        accelerator=args.device,
        devices=1,
        strategy=args.strategy,
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
    trainer.fit(module(args, distill), train_dataloaders=loader)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", choices=["lora", "full"], default="lora")
    parser.add_argument("--precision", choices=["32-true", "bf16-true"], default="32-true")
    parser.add_argument("--data", default="alpaca-1k", help="RecoveryData source (alpaca-1k, c4-train, a file)")
    parser.add_argument("--variants", default="bare,ce,kd", help=f"comma-separated: bare, {', '.join(VARIANTS)}")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--strategy", default="auto", help="Lightning's (ddp: one DDP process, as the GPU check runs it)"
    )
    args = parser.parse_args()

    variants = args.variants.split(",")
    unknown = set(variants) - {"bare", *VARIANTS}
    if unknown:
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from bare, {', '.join(VARIANTS)}")
    L.seed_everything(0, verbose=False)
    data = RecoveryData(args.data, tokenizer=args.model, cutoff_len=args.cutoff_len, batch_size=args.batch_size)
    data.setup("fit")
    loader = iter(data.train_dataloader())
    batches = [next(loader) for _ in range(args.warmup + args.steps)]
    tokens = [int(b["attention_mask"].sum()) for b in batches[args.warmup :]]
    results = {name: [] for name in variants}
    out = {
        "model": args.model,
        "mode": args.mode,
        "precision": args.precision,
        "data": args.data,
        "batch_size": args.batch_size,
        "cutoff_len": args.cutoff_len,
        "mean_tokens_per_step": round(statistics.mean(tokens), 1),
        "mean_labelled_tokens_per_step": round(
            statistics.mean(int((b["labels"][:, 1:] != -100).sum()) for b in batches[args.warmup :]), 1
        ),
        "timed_steps_per_run": args.steps,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
    }
    for _ in range(args.rounds):
        for name in variants:
            results[name] += bare(args, batches) if name == "bare" else lightning(args, batches, VARIANTS[name])
            out.setdefault(
                f"peak_rss_gb_after_{name}", round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            )
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    out["device"], out["strategy"] = args.device, args.strategy
    if args.device == "cuda":
        out["cuda_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    for name, times in results.items():
        out[f"{name}_step_s_median"] = round(statistics.median(times), 4)
        out[f"{name}_tokens_per_s"] = round(sum(tokens) * args.rounds / sum(times), 1)
    if "ce" in results:
        for name in results:
            if name not in ("ce", "bare"):
                out[f"{name}_over_ce"] = round(out[f"{name}_step_s_median"] / out["ce_step_s_median"], 3)
        if "bare" in results:
            out["lightning_over_bare"] = round(out["ce_tokens_per_s"] / out["bare_tokens_per_s"], 3)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
