"""Benchmark: prune a model and measure time, peak memory and perplexity before/after.

    python bench/prune.py --model smollm2-135m --ratio 0.2 [--attention kv --layers 4:26 ...]

Prints one JSON object. Model loading is timed apart from pruning (calibration + scoring +
planning + surgery). Peak RSS is the process's high-water mark after loading and right after
pruning (perplexity excluded: it is measured afterwards), next to the weights' bytes; on CUDA also
the peak of allocated GPU memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
import time
from pathlib import Path

import torch

from llmp import LlmpError, PruneConfig, load_model, prune
from llmp.cli import add_dtype_arg, add_prune_args
from llmp.data import calibration_samples, read_text
from llmp.eval import perplexity
from llmp.memory import return_freed_memory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--calibration", default="c4", help="calibration text (built-in c4, or a file)")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--eval", default="wikitext2", help="perplexity text (built-in wikitext2, or a file)")
    parser.add_argument("--eval-tokens", type=int, default=16384)
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity (timing and memory only)")
    parser.add_argument("--device", default="cpu", help="where the model runs (cuda: also the GPU's peak memory)")
    add_dtype_arg(parser)
    add_prune_args(parser)  # every option of `llmp prune`, with its help
    args = parser.parse_args()
    return_freed_memory()  # as `llmp prune` does
    try:
        config = PruneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig)})
    except LlmpError as err:
        parser.error(str(err))

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype)
    t1 = time.perf_counter()
    model.to(args.device)
    rss_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    model_dtypes = {p.dtype for p in model.parameters()}
    t2 = time.perf_counter()
    calib = calibration_samples(args.calibration, tokenizer, args.num_samples, args.seq_len, config.seed)
    t3 = time.perf_counter()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    record = prune(model, config, calib)
    t4 = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_SELF)
    rss_prune = after.ru_maxrss / 1024**2
    # Perplexities after the pruning, so that the peak RSS above is the pruning's alone.
    text = None if args.no_ppl else read_text(args.eval)
    pruned = None if args.no_ppl else perplexity(model, tokenizer, text, 128, args.eval_tokens)
    del model
    dense = None
    if not args.no_ppl:
        dense = perplexity(load_model(args.model, args.dtype)[0], tokenizer, text, 128, args.eval_tokens)
    result = {
        "model": args.model,
        "settings": record.settings,
        "threads": torch.get_num_threads(),
        "dtype": str(next(iter(model_dtypes))) if len(model_dtypes) == 1 else sorted(map(str, model_dtypes)),
        "load_s": round(t1 - t0, 3),
        "calibration_data_s": round(t3 - t2, 3),
        **record.timings,
        "prune_total_s": round(t4 - t2, 3),
        # The kernel's share of prune(): fresh pages (minor faults) are most of it.
        "prune_system_s": round(after.ru_stime - usage.ru_stime, 3),
        "prune_minor_faults": after.ru_minflt - usage.ru_minflt,
        "peak_rss_gb_after_load": round(rss_load, 3),
        "peak_rss_gb_after_prune": round(rss_prune, 3),
        "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3) if torch.cuda.is_available() else None,
        "weights_gb": round(weights / 1024**3, 3),
        "peak_rss_over_weights": round(rss_prune * 1024**3 / weights, 2),
        "params_before": record.params_before,
        "params_after": record.params_after,
        "achieved_ratio": record.achieved_ratio,
        "ppl_dense": dense and round(dense.ppl, 2),
        "ppl_pruned": pruned and round(pruned.ppl, 2),
        "ppl_protocol": dense and f"{Path(args.eval).name}: {dense.protocol}",
        "calibration": f"{Path(args.calibration).name}: {args.num_samples} x {args.seq_len} tokens",
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    try:
        main()
    except LlmpError as err:
        sys.exit(f"error: {err}")
