"""Benchmark: prune a model and measure time, peak memory and perplexity before/after.

    python bench/prune.py --model smollm2-135m --ratio 0.2 [--attention kv --layers 4:26 ...]

Prints one JSON object. Model loading is timed apart from pruning (calibration + scoring +
planning + surgery). Peak RSS is the process's high-water mark right after pruning (loading
included, perplexity excluded: it is measured afterwards).
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
from llmp.data import calibration_samples, read_text
from llmp.eval import perplexity

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--calibration", default=str(DATA / "calib" / "c4_en_train00000_first1000.jsonl"))
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval", default=str(DATA / "wikitext2" / "wiki.test.raw"))
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity (timing and memory only)")
    for name, kind in [
        ("attention", str),
        ("layers", str),
        ("attn-layers", str),
        ("mlp-layers", str),
        ("criterion", str),
        ("ranking", str),
        ("steps", int),
        ("round-to", int),
        ("scope", str),
        ("batch-size", int),
    ]:
        parser.add_argument(f"--{name}", type=kind)
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if v is not None and k in PruneConfig.__dataclass_fields__}
    config = PruneConfig(**overrides)

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    t1 = time.perf_counter()
    t2 = time.perf_counter()
    calib = calibration_samples(args.calibration, tokenizer, args.num_samples, args.seq_len, config.seed)
    t3 = time.perf_counter()
    report = prune(model, config, calib)
    t4 = time.perf_counter()
    rss_prune = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    # Perplexities after the pruning, so that the peak RSS above is the pruning's alone.
    text = None if args.no_ppl else read_text(args.eval)
    pruned = None if args.no_ppl else perplexity(model, tokenizer, text, 128, args.eval_tokens)
    del model
    dense = None if args.no_ppl else perplexity(load_model(args.model)[0], tokenizer, text, 128, args.eval_tokens)
    result = {
        "model": args.model,
        "settings": report["settings"],
        "threads": torch.get_num_threads(),
        "load_s": round(t1 - t0, 3),
        "calibration_data_s": round(t3 - t2, 3),
        **report["timings"],
        "prune_total_s": round(t4 - t2, 3),
        "peak_rss_gb_after_prune": round(rss_prune, 3),
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "achieved_ratio": report["achieved_ratio"],
        "ppl_dense": dense and round(dense.ppl, 2),
        "ppl_pruned": pruned and round(pruned.ppl, 2),
        "ppl_protocol": dense and f"{Path(args.eval).name}: {dense.protocol}",
        "calibration": f"{Path(args.calibration).name}: {args.num_samples} x {args.seq_len} tokens",
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
