"""Benchmark: prune a random-initialised model of a real shape streamed from disk (``--stream``).

    python bench/scale.py --shape llama-7b --dtype bfloat16 --folder /tmp/llama7b-bf16

Writes the model with ``bench/make_model.py`` first (in a child process, so its memory does not
count) when ``--folder`` holds none, then prunes it layer by layer (``llmp.pruning.streamed``) into
``--output`` and prints one JSON object: time, peak RSS of this process against the weights'
bytes, shards written. The weights are random: this measures memory and time, not quality.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmp import PruneConfig
from llmp.data import calibration_samples
from llmp.memory import return_freed_memory
from llmp.models import model_folder
from llmp.pruning.streamed import prune_streamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tinyllama-1.1b", help="a bench/make_model.py shape")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--folder", required=True, help="the model folder (written first if missing)")
    parser.add_argument("--output", help="the pruned folder (default: FOLDER-pruned)")
    parser.add_argument(
        "--ratio", type=float, default=None, help="as `llmp prune --ratio` (unset: 0.2, 0 with --experts)"
    )
    parser.add_argument("--experts", type=float, default=0.0, help="as `llmp prune --experts` (MoE shapes)")
    parser.add_argument("--expert-channels", type=float, default=0.0, help="as `llmp prune --expert-channels`")
    parser.add_argument("--attention", default="none")
    parser.add_argument("--criterion", default="flap")
    parser.add_argument("--compensate", default="lstsq")
    parser.add_argument("--ranking", default="layer")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="where the layers run (cuda: one layer on the GPU at a time)")
    args = parser.parse_args()
    folder = Path(args.folder)
    made = None
    if not (folder / "config.json").is_file():
        make = Path(__file__).with_name("make_model.py")
        cmd = [sys.executable, str(make), "--shape", args.shape, "--dtype", args.dtype, "--output", str(folder)]
        lines = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        made = json.loads(lines[-1])  # its JSON line, after the tokenizer trainer's progress
    return_freed_memory()
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    config = PruneConfig(
        ratio=args.ratio,
        experts=args.experts,
        expert_channels=args.expert_channels,
        attention=args.attention,
        criterion=args.criterion,
        compensate=args.compensate,
        ranking=args.ranking,
        layerwise=True,
    )
    t0 = time.perf_counter()
    path, tokenizer = model_folder(folder)
    calib = calibration_samples("c4", tokenizer, args.num_samples, args.seq_len, config.seed)
    t1 = time.perf_counter()
    output = Path(args.output or f"{folder}-pruned")
    record = prune_streamed(path, output, config, calib, tokenizer, overwrite=True, device=args.device)
    t2 = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {
        "shape": args.shape,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "weights_gb": round(weights / 1024**3, 3),
        "calibration": f"c4: {args.num_samples} x {args.seq_len} tokens",
        "settings": {
            k: getattr(config, k)
            for k in ("ratio", "experts", "expert_channels", "attention", "criterion", "compensate", "ranking")
        },
        "prune_s": round(t2 - t1, 1),
        "total_s": round(t2 - t0, 1),
        "peak_rss_gb": round(peak / 1024**3, 3),
        "peak_rss_over_weights": round(peak / weights, 3),
        "cuda_peak_gb": round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        if args.device.startswith("cuda")
        else None,
        "params_before": record.params_before,
        "params_after": record.params_after,
        "achieved_ratio": record.achieved_ratio,
        "output_gb": round(sum(f.stat().st_size for f in output.glob("*.safetensors")) / 1024**3, 3),
        "shards": len(list(output.glob("*.safetensors"))),
        "made": made,
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
