"""The time and memory floor of an exact first-order Taylor score on one model, as plain autograd
gives it: one forward and backward over the calibration tokens, with only the pruned layers'
``Linear`` weights needing a gradient, no checkpointing, no scoring, no surgery.

It also times the matrix products alone (``gemm_floor_s``): each Linear's and the head's forward
product, the input gradients from the top down to the layer above the first pruned one, and the
weight gradients of the pruned layers, on random data of the run's shapes in reused buffers (no
page faults). No implementation that computes the same gradients in float32 can be faster.

    python bench/reference/autograd_floor.py bench/work/smollm2-hf bench/work/calib_smollm2_10x64.pt --layers 4:26

Prints one JSON line: each repeat's seconds and the process's peak RSS (GiB, loading included).
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from collections import Counter

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Hugging Face model folder")
    parser.add_argument("calibration", help="a .pt file of [N, L] token ids (make_calib.py)")
    parser.add_argument("--layers", default="4:26", help="pruned layers, start:end (end exclusive)")
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    start, end = (int(x) for x in args.layers.split(":"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="sdpa")
    ids = torch.load(args.calibration, weights_only=True)
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in model.model.layers[start:end]:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.requires_grad_(True)
    seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        seconds.append(round(time.perf_counter() - t, 3))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    floor = gemm_floor(model, ids.numel(), start, end)
    print(
        json.dumps(
            {
                "threads": torch.get_num_threads(),
                "fwd_bwd_s": seconds,
                "peak_rss_gib": round(peak, 3),
                "gemm_floor_s": round(floor, 6),
            }
        )
    )


def gemm_floor(model: torch.nn.Module, tokens: int, start: int, end: int) -> float:
    """Seconds of the float32 matrix products an exact first-order score needs (module docstring)."""
    counts: Counter[tuple[int, int, int]] = Counter()  # (m, k, n) of an [m, k] x [k, n] product -> times
    head = model.get_output_embeddings()
    for i, layer in enumerate(model.model.layers):
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                counts[tokens, module.in_features, module.out_features] += 1  # y = x W^T
                if i > start:
                    counts[tokens, module.out_features, module.in_features] += 1  # dx = dy W
                if start <= i < end:
                    counts[module.out_features, tokens, module.in_features] += 1  # dW = dy^T x
    counts[tokens, head.in_features, head.out_features] += 1
    counts[tokens, head.out_features, head.in_features] += 1
    total = 0.0
    for (m, k, n), times in counts.items():
        a, b, out = torch.randn(m, k), torch.randn(k, n), torch.empty(m, n)
        torch.mm(a, b, out=out)  # warm-up
        t = time.perf_counter()
        for _ in range(3):
            torch.mm(a, b, out=out)
        total += (time.perf_counter() - t) / 3 * times
    return total


if __name__ == "__main__":
    main()
