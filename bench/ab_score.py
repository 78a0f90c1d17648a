"""Benchmark: two settings of llmp's scoring, alternating in one process (an A/B that a shared
machine's drift between processes and sittings does not swamp).

    python bench/ab_score.py --model smollm2-135m --attention kv --layers 4:26 \\
        --ratio 0.192932048 --a loss_chunk_bytes=16777216 --b loss_chunk_bytes=67108864 --rounds 4

The model is loaded once; each round runs ``importance.score`` (the groups ``llmp prune`` would
score with these options) under settings A and B, in turns (A B, then B A, ...). A setting is
``NAME=value``, a field of :class:`llmp.importance.ScoringSettings` with a Python literal value.
Prints one JSON object: each setting's seconds, system seconds and minor page faults per run,
their means, and the largest relative difference of B's scores from A's. The first run pays the
process's first touch of its memory: compare means without it too (``mean_after_first_s``).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import resource
import statistics
import time

import torch

from llmp import LlmpError, PruneConfig, importance, load_model
from llmp.cli import add_dtype_arg, add_prune_args
from llmp.data import calibration_samples
from llmp.memory import return_freed_memory
from llmp.pruning import layer_ranges
from llmp.structure import adapter_for


def parse_setting(text: str) -> tuple[str, object]:
    """``NAME=value`` → (NAME, value); a clear error for anything else."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"a setting is NAME=value (e.g. loss_chunk_bytes=1024); got {text!r}")
    try:
        parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError) as err:
        raise ValueError(f"the value of {text!r} is not a Python literal") from err
    return name, parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default="c4", help="calibration text (built-in c4, or a file)")
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--a", action="append", default=[], metavar="NAME=VALUE", help="setting A (repeatable)")
    parser.add_argument("--b", action="append", default=[], metavar="NAME=VALUE", help="setting B (repeatable)")
    parser.add_argument("--rounds", type=int, default=4, help="runs of each setting")
    add_dtype_arg(parser)
    add_prune_args(parser)
    args = parser.parse_args()
    try:
        config = PruneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig)})
        sides = {
            side: config.scoring.replace(**dict(parse_setting(s) for s in getattr(args, side))) for side in ("a", "b")
        }
    except (ValueError, LlmpError) as err:
        parser.error(str(err))
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1; got {args.rounds}")
    return_freed_memory()  # as `llmp prune` does

    model, tokenizer = load_model(args.model, args.dtype)
    config = config.resolved(model)
    calib = calibration_samples(args.calibration, tokenizer, args.num_samples, args.seq_len, config.seed)
    adapter = adapter_for(model)
    structure = adapter.discover(model, config.kinds)
    ranges = layer_ranges(config, len(adapter.layers(model)))
    structure.groups = [g for g in structure.groups if g.layer is None or g.layer in ranges[g.kind]]

    runs: dict[str, list[dict]] = {"a": [], "b": []}
    first_scores: dict[str, dict[str, torch.Tensor]] = {}
    for i in range(args.rounds):
        for side in ("a", "b") if i % 2 == 0 else ("b", "a"):
            before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            scores = importance.score(
                model, structure, calib, config.criterion, config.reduction, config.batch_size, config.seed, sides[side]
            )
            seconds, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            first_scores.setdefault(side, scores)
            runs[side].append(
                {
                    "s": round(seconds, 3),
                    "system_s": round(after.ru_stime - before.ru_stime, 3),
                    "minor_faults": after.ru_minflt - before.ru_minflt,
                }
            )
    a, b = first_scores["a"], first_scores["b"]
    difference = max(float((b[k] - a[k]).abs().max() / a[k].abs().max().clamp_min(1e-30)) for k in a)
    result = {
        "model": args.model,
        "threads": torch.get_num_threads(),
        "criterion": config.criterion,
        "calibration": f"{args.calibration}: {args.num_samples} x {args.seq_len} tokens",
        "order": "a b, b a, ... (first run: a)",
        "score_relative_difference": difference,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
    }
    for side in ("a", "b"):
        times = [r["s"] for r in runs[side]]
        rest = times[1:] if side == "a" else times  # a's first run is the process's first
        result[side] = {
            "settings": getattr(args, side),
            "runs": runs[side],
            "mean_s": round(statistics.mean(times), 3),
            "mean_after_first_s": round(statistics.mean(rest), 3) if rest else None,
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
