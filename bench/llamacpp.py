"""Benchmark: llama.cpp tokens/s of a dense and a pruned GGUF, measured in the same run.

    python bench/llamacpp.py --dense out/dense.gguf --pruned out/p.gguf --threads 2

Per model: prefill tokens/s of a ``--prefill``-token prompt and decode tokens/s of ``--decode``
tokens generated one at a time after it (best of ``--repeats``; dense and pruned alternate in
every repeat, so a busy machine slows both alike). ``flops_ratio`` is dense/pruned FLOPs per
token read from the files' own per-layer counts (2 x the matrix parameters, plus attention scores
and values over the average causal context; the output head for every decoded token, once per
prompt), and ``meets_flops`` says
whether the measured speed-up reached it. llama.cpp runs as a server would: its default f16
KV cache, the output head for the last position of the prompt only. Prints a Markdown table to stderr and one JSON object
to stdout; the thread count and load averages are part of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from llmp.eval.llamacpp import LlamaCpp
from llmp.export.gguf import read_metadata


def flops_per_token(path: Path, context: float, head: float = 1.0) -> float:
    """Forward FLOPs of one token with ``context`` earlier tokens, from the GGUF's metadata;
    ``head``: the share of tokens the output head runs for (a prompt: only its last)."""
    meta = dict(read_metadata(path))
    arch = meta["general.architecture"]

    def per_layer(key):
        value = meta[f"{arch}.{key}"]
        return value if isinstance(value, list) else [value] * meta[f"{arch}.block_count"]

    h, vocab = meta[f"{arch}.embedding_length"], meta[f"{arch}.vocab_size"]
    d = meta.get(f"{arch}.attention.key_length") or h // per_layer("attention.head_count")[0]
    heads, kv, ff = (
        per_layer("attention.head_count"),
        per_layer("attention.head_count_kv"),
        per_layer("feed_forward_length"),
    )
    matrices = sum(h * (q + 2 * k) * d + q * d * h + 3 * h * f for q, k, f in zip(heads, kv, ff, strict=True))
    attention = sum(2 * 2 * q * d * context for q in heads)  # q·k scores and weights·v
    return 2 * (matrices + head * h * vocab) + attention


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", required=True, type=Path)
    parser.add_argument("--pruned", required=True, type=Path)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    load = os.getloadavg()
    engines = {
        name: LlamaCpp(path, n_ctx=args.prefill + args.decode, threads=args.threads, f32_cache=False, all_logits=False)
        for name, path in (("dense", args.dense), ("pruned", args.pruned))
    }
    best: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, engine in engines.items():
            run = engine.speed(args.prefill, args.decode, repeats=1)
            keep = best.setdefault(name, run)
            for key in ("prefill_tokens_per_s", "decode_tokens_per_s"):
                keep[key] = max(keep[key], run[key])
    rows = []
    for name, path in (("dense", args.dense), ("pruned", args.pruned)):
        rows.append(
            {
                "model": name,
                "file": str(path),
                "size_mb": round(path.stat().st_size / 2**20, 1),
                **best[name],
                "prefill_flops_per_token": flops_per_token(path, args.prefill / 2, head=1 / args.prefill),
                "decode_flops_per_token": flops_per_token(path, args.prefill + args.decode / 2),
            }
        )
    dense, pruned = rows
    for phase in ("prefill", "decode"):
        speedup = pruned[f"{phase}_tokens_per_s"] / dense[f"{phase}_tokens_per_s"]
        ratio = dense[f"{phase}_flops_per_token"] / pruned[f"{phase}_flops_per_token"]
        pruned |= {f"{phase}_speedup": round(speedup, 3), f"{phase}_flops_ratio": round(ratio, 3)}
        pruned[f"{phase}_meets_flops"] = speedup >= ratio
    for engine in engines.values():
        engine.close()
    print("| model | size MB | prefill tok/s | decode tok/s |", file=sys.stderr)
    print("| --- | ---: | ---: | ---: |", file=sys.stderr)
    for r in rows:
        print(
            f"| {r['model']} | {r['size_mb']} | {r['prefill_tokens_per_s']} | {r['decode_tokens_per_s']} |",
            file=sys.stderr,
        )
    print(
        f"speed-up prefill {pruned['prefill_speedup']}x (FLOPs {pruned['prefill_flops_ratio']}x), decode "
        f"{pruned['decode_speedup']}x (FLOPs {pruned['decode_flops_ratio']}x)",
        file=sys.stderr,
    )
    settings = {"prefill": args.prefill, "decode": args.decode, "repeats": args.repeats, "threads": args.threads}
    print(json.dumps({"settings": settings, "load_before": load, "load_after": os.getloadavg(), "rows": rows}))


if __name__ == "__main__":
    main()
