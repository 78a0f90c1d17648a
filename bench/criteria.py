"""Benchmark: criteria × compensation on one model, same structures and budget, perplexity on texts.

    python bench/criteria.py --model smollm2-135m --runs taylor:none,flap:bias,flap:lstsq:1.0

Each run is ``criterion:compensate[:ridge][:layerwise]`` (ridge: the lstsq λ as a fraction of the
mean input variance, default ``PruneConfig.ridge``; layerwise: ``PruneConfig.layerwise``,
each layer scored on the pruned model's activations); gradient criteria get ``--taylor-samples``
calibration windows (llmp's default 16), activation criteria ``--samples`` (one forward, so more
is cheap). Prints one JSON line per run (and one for the dense model): perplexity per text with
the protocol, removed fraction, pruning seconds, threads.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch

from llmp import PruneConfig, load_model, prune
from llmp.data import calibration_samples, read_text
from llmp.eval import perplexity
from llmp.importance import ACTIVATION


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--runs", default="taylor:none,taylor:bias,flap:none,flap:bias,flap:lstsq,wanda:bias")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--attention", default="none")
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--samples", type=int, default=64, help="calibration windows of the activation criteria")
    parser.add_argument("--taylor-samples", type=int, default=16, help="calibration windows of the gradient criteria")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval", default="wikitext2", help="comma-separated texts (built-in names or files)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    texts = {Path(name).stem: read_text(name) for name in args.eval.split(",")}

    dense, tokenizer = load_model(args.model, "float32")
    ppl = {name: perplexity(dense, tokenizer, text, 128, args.eval_tokens) for name, text in texts.items()}
    print(json.dumps({"run": "dense", **{k: round(v.ppl, 2) for k, v in ppl.items()}}), flush=True)
    protocol = next(iter(ppl.values())).protocol
    for run in args.runs.split(","):
        criterion, compensate, *more = run.split(":")
        layerwise = "layerwise" in more
        ridge = [float(m) for m in more if m != "layerwise"]
        n = args.samples if criterion in ACTIVATION else args.taylor_samples
        calib = calibration_samples(args.calibration, tokenizer, n, args.seq_len, 0)
        model = copy.deepcopy(dense)
        config = PruneConfig(
            ratio=args.ratio, attention=args.attention, criterion=criterion, compensate=compensate, layerwise=layerwise
        )
        config = dataclasses.replace(config, ridge=ridge[0]) if ridge else config
        t0 = time.perf_counter()
        record = prune(model, config, calib)
        seconds = time.perf_counter() - t0
        result = {k: round(perplexity(model, tokenizer, t, 128, args.eval_tokens).ppl, 2) for k, t in texts.items()}
        print(
            json.dumps(
                {
                    "run": run,
                    **result,
                    "removed": round(record.achieved_ratio, 4),
                    "prune_s": round(seconds, 2),
                    "calibration": f"{args.calibration}: {n} x {args.seq_len}",
                    "ridge": config.ridge if compensate == "lstsq" else None,
                    "threads": torch.get_num_threads(),
                    "protocol": protocol,
                }
            ),
            flush=True,
        )
        del model


if __name__ == "__main__":
    main()
