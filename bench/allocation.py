"""Benchmark: allocations against each other at several ratios, one model loaded per run.

    python bench/allocation.py --ratios 0.2,0.35,0.5 --allocations uniform,sensitivity,search \
        [--attention query] [--search-seconds 600] [--eval wikitext2 --eval pride.txt]

For each ratio × allocation: prune a fresh copy with the defaults otherwise (flap + lstsq, layer by
layer, c4 calibration 32 x 128), then the perplexity on each evaluation text (first
``--eval-tokens`` tokens, 128-token windows) and the KL to the dense model on 8 c4 samples that
neither calibration nor the search saw. Prints one JSON object per run, as it finishes.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

from llmp import PruneConfig, load_model, prune
from llmp.allocation.evolution import DenseKL
from llmp.data import calibration_samples, read_text
from llmp.eval import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratios", default="0.2,0.35,0.5")
    parser.add_argument("--allocations", default="uniform,sensitivity,search")
    parser.add_argument("--attention", default="none", help="as `llmp prune --attention`")
    parser.add_argument("--layers", default=None, help="as `llmp prune --layers`")
    parser.add_argument("--search-seconds", type=float, default=600.0)
    parser.add_argument("--calibration", default="c4")
    parser.add_argument("--num-samples", type=int, default=32, help="calibration samples (the search judges on half)")
    parser.add_argument("--ridge", type=float, default=1.0, help="as `llmp prune --ridge`")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample")
    parser.add_argument("--eval", action="append", default=None, help="perplexity text (repeat; default wikitext2)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    args = parser.parse_args()
    texts = {Path(t).name: read_text(t) for t in (args.eval or ["wikitext2"])}
    dense, tokenizer = load_model(args.model, torch.float32)
    calibration = calibration_samples(args.calibration, tokenizer, args.num_samples, args.seq_len, 0)
    unseen = calibration_samples(args.calibration, tokenizer, 8, 128, 99)  # another draw: neither saw it
    judge = DenseKL(dense, unseen, 64)
    dense_ppl = {
        name: round(perplexity(dense, tokenizer, text, 128, args.eval_tokens).ppl, 2) for name, text in texts.items()
    }
    print(json.dumps({"model": args.model, "dense_ppl": dense_ppl, "threads": torch.get_num_threads()}), flush=True)
    for ratio in map(float, args.ratios.split(",")):
        for allocation in args.allocations.split(","):
            model, _ = load_model(args.model, torch.float32)
            config = PruneConfig(
                ratio=ratio,
                attention=args.attention,
                layers=args.layers,
                allocation=allocation,
                search_seconds=args.search_seconds,
                ridge=args.ridge,
            )
            start = time.perf_counter()
            record = prune(model, config, calibration)
            seconds = time.perf_counter() - start
            judge.model = model
            chosen = record.steps[0].allocation
            result = {
                "ratio": ratio,
                "allocation": allocation,
                "attention": args.attention,
                "calibration": [args.num_samples, args.seq_len],
                "ridge": args.ridge,
                "achieved_ratio": record.achieved_ratio,
                "prune_s": round(seconds, 1),
                "ppl": {
                    n: round(perplexity(model, tokenizer, t, 128, args.eval_tokens).ppl, 2) for n, t in texts.items()
                },
                "kl_unseen": round(judge(len(unseen)), 4),
                "search_kl": chosen and chosen.fitness and [chosen.seed_fitness, chosen.fitness[-1]],
                "generations": chosen and chosen.generations,
                "kept_mlp": [s["mlp"] for s in record.layer_shapes],
                "kept_heads": [s["heads"] for s in record.layer_shapes],
                "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # so far
                "threads": torch.get_num_threads(),
            }
            print(json.dumps(result), flush=True)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
