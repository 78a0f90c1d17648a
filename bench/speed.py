"""Benchmark: inference speed of a dense and a pruned model, measured in the same run.

    python bench/speed.py --model smollm2-135m --ratio 0.2            # prunes on the fly
    python bench/speed.py --model smollm2-135m --pruned out/smollm2-20 \\
        --seq-lens 128,512 --batch-sizes 1 --dtypes fp32 --repeats 3

For every dtype x batch x sequence length: prefill latency (one forward over ``batch x seq``
random tokens, median of ``--repeats`` after one warm-up) and its tokens/s; for every dtype x
batch: decode tokens/s (``--decode-tokens`` greedy steps with the KV cache after a 128-token
prompt). Dense and pruned alternate inside each repeat, so a busy machine slows both alike;
the load averages before and after are recorded. Cells over ``--max-batch-tokens`` are skipped
(and listed) to bound the run time on a CPU.

``flops_ratio`` is dense/pruned forward FLOPs per token at that length (matmuls: 2 x linear
parameters, lm_head included, plus attention scores and values over the causal context);
``speedup`` >= ``flops_ratio`` is expected when the kept matrices stay large enough for the
kernels, and ``meets_flops`` says whether it was. Memory: ``weights_mb`` exactly; ``peak_mb``
is CUDA's peak allocation, or on CPU the process's RSS sampled during the warm-up above its
level before (an estimate; the timed repeats run without the sampling thread). Prints a line
per case and a Markdown table to stderr, one JSON object to stdout.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from llmp import PruneConfig, load_model, prune
from llmp.data import calibration_samples

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def flops_per_token(model, seq: int) -> float:
    """Forward FLOPs per token at context ``seq`` (average causal context ``seq / 2``)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attn = 0
    for layer in model.model.layers:
        q = layer.self_attn.q_proj.out_features  # heads x head_dim
        attn += 2 * 2 * q * seq / 2  # q·k scores and weights·v
    return 2 * linear + attn


class PeakMemory:
    """Peak memory of the block: CUDA's allocator peak, or the sampled CPU RSS above the start."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb = device, 0.0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self.base = self.high = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.high = max(self.high, _rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self.running = False
            self.thread.join()
            self.peak_mb = (max(self.high, _rss()) - self.base) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> float:
    _sync(ids.device)
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    _sync(ids.device)
    return time.perf_counter() - t0


@torch.no_grad()
def decode(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` single-token steps with the KV cache, after a prefill of ``ids``."""
    out = model(input_ids=ids, use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, **{CACHE: _cache(out)}, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
    _sync(ids.device)
    return time.perf_counter() - t0


# transformers 5 renamed `past_key_values` to `cache` (the old name still works, with a warning).
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _cache(out):
    # Not out.get("cache", out.get("past_key_values")): reading the old name warns even when unused.
    return out["cache"] if "cache" in out else out["past_key_values"]


def measure(models: dict, args, device) -> tuple[list[dict], list[dict]]:
    """Rows of timings and the cases skipped for ``--max-batch-tokens``."""
    rows, skipped = [], []
    vocab = min(m.config.vocab_size for m in models.values())
    gen = torch.Generator().manual_seed(0)
    for dtype_name in args.dtypes:
        typed = {name: m.to(DTYPES[dtype_name]) for name, m in models.items()}
        for model in typed.values():  # one-time allocations and lazy set-up, charged to no case
            prefill(model, torch.zeros(1, 8, dtype=torch.long, device=device))
        for batch in args.batch_sizes:
            cases = [("prefill", seq) for seq in args.seq_lens]
            cases += [("decode", 128)] if args.decode_tokens > 0 else []
            for kind, seq in cases:
                if kind == "prefill" and args.max_batch_tokens and batch * seq > args.max_batch_tokens:
                    skipped.append({"dtype": dtype_name, "batch": batch, "kind": kind, "seq": seq})
                    continue
                ids = torch.randint(0, vocab, (batch, seq), generator=gen).to(device)
                times = {name: [] for name in typed}
                peaks = {}
                for name, model in typed.items():  # warm-up, with the memory sampler
                    with PeakMemory(device) as mem:
                        _once(model, kind, ids, args.decode_tokens)
                    peaks[name] = mem.peak_mb
                for _ in range(args.repeats):
                    for name, model in typed.items():
                        times[name].append(_once(model, kind, ids, args.decode_tokens))
                for name, model in typed.items():
                    sec = statistics.median(times[name])
                    tokens = batch * (seq if kind == "prefill" else args.decode_tokens)
                    rows.append(
                        {
                            "model": name,
                            "dtype": dtype_name,
                            "batch": batch,
                            "kind": kind,
                            "seq": seq,
                            "median_s": round(sec, 5),
                            "tokens_per_s": round(tokens / sec, 1),
                            "peak_mb": round(peaks[name], 1),
                            "weights_mb": round(
                                sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20, 1
                            ),
                            "flops_per_token": flops_per_token(model, seq),
                        }
                    )
                _speedups(rows[-len(typed) :])
                print(_line(rows[-len(typed) :]), file=sys.stderr, flush=True)
    return rows, skipped


def _once(model, kind: str, ids: torch.Tensor, decode_tokens: int) -> float:
    return prefill(model, ids) if kind == "prefill" else decode(model, ids, decode_tokens)


def _speedups(rows: list[dict]) -> None:
    dense = next(r for r in rows if r["model"] == "dense")
    for r in rows:
        r["speedup"] = round(dense["median_s"] / r["median_s"], 3)
        r["flops_ratio"] = round(dense["flops_per_token"] / r["flops_per_token"], 3)
        r["meets_flops"] = r["speedup"] >= r["flops_ratio"]


def table(rows: list[dict]) -> str:
    """Markdown: one line per case, dense and pruned side by side."""
    lines = [
        "| dtype | batch | case | dense ms | pruned ms | dense tok/s | pruned tok/s | speed-up | FLOP ratio "
        "| peak MB dense / pruned |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    pairs = {}
    for r in rows:
        pairs.setdefault((r["dtype"], r["batch"], r["kind"], r["seq"]), {})[r["model"]] = r
    for (dtype, batch, kind, seq), pair in pairs.items():
        d, p = pair["dense"], pair["pruned"]
        case = f"prefill {seq}" if kind == "prefill" else f"decode ({seq}-token prompt)"
        lines.append(
            f"| {dtype} | {batch} | {case} | {d['median_s'] * 1000:.1f} | {p['median_s'] * 1000:.1f} "
            f"| {d['tokens_per_s']:.0f} | {p['tokens_per_s']:.0f} | {p['speedup']:.2f} | {p['flops_ratio']:.2f} "
            f"| {d['peak_mb']:.0f} / {p['peak_mb']:.0f} |"
        )
    return "\n".join(lines)


def _line(rows: list[dict]) -> str:
    r0 = rows[0]
    head = f"{r0['dtype']:>5} b{r0['batch']:<2} {r0['kind']:>7} {r0['seq']:>5}"
    cells = [
        f"{r['model']}: {r['median_s'] * 1000:8.1f} ms {r['tokens_per_s']:9.1f} tok/s x{r['speedup']:.2f} "
        f"(flops x{r['flops_ratio']:.2f}, peak {r['peak_mb']:.0f} MB)"
        for r in rows
    ]
    return head + " | " + " | ".join(cells)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pruned", help="pruned model folder; default: prune the model on the fly")
    parser.add_argument("--ratio", type=float, default=0.2, help="on-the-fly pruning ratio (llmp defaults otherwise)")
    parser.add_argument("--seq-lens", type=_ints, default=[128, 512, 2048])
    parser.add_argument("--batch-sizes", type=_ints, default=[1, 8])
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["fp32", "bf16"])
    parser.add_argument("--decode-tokens", type=int, default=32, help="0 skips decode")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--max-batch-tokens", type=int, default=None, help="skip prefill cases with batch x seq above this"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    bad = [d for d in args.dtypes if d not in DTYPES]
    if bad or args.repeats < 1:
        parser.error(f"`--dtypes` must be among {sorted(DTYPES)} (got {bad}) and `--repeats` >= 1")
    if args.pruned and not (Path(args.pruned) / "pruning_report.json").is_file():
        parser.error(f"`--pruned` {args.pruned} has no pruning_report.json; give a folder written by `llmp prune`")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    dense, tokenizer = load_model(args.model)
    if args.pruned:
        pruned, _ = load_model(args.pruned)
        report = json.loads((Path(args.pruned) / "pruning_report.json").read_text())
        how = {"folder": args.pruned, "achieved_ratio": report.get("achieved_ratio")}
    else:
        pruned = copy.deepcopy(dense)
        calib = calibration_samples("c4", tokenizer, 16, 128)
        report = prune(pruned, PruneConfig(ratio=args.ratio), calib)
        how = {"on_the_fly": f"PruneConfig(ratio={args.ratio}), 16 x 128 C4 tokens"}
        how["achieved_ratio"] = report["achieved_ratio"]
    models = {"dense": dense.to(device).eval(), "pruned": pruned.to(device).eval()}
    load_before = os.getloadavg()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}",
        file=sys.stderr,
    )
    rows, skipped = measure(models, args, device)
    load_after = os.getloadavg()
    print(table(rows), file=sys.stderr)
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}", file=sys.stderr)
    result = {
        "model": args.model,
        "pruned": how,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device),
        "repeats": args.repeats,
        "decode_tokens": args.decode_tokens,
        "load_average": {"before": load_before, "after": load_after},
        "skipped": skipped,
        "rows": rows,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
