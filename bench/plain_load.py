"""Load a pruned folder with plain transformers (no llmp) and generate: what a user of the folder sees.

    python bench/plain_load.py OUT_DIR [--prompt TEXT] [--new-tokens 8]

Prints one JSON object: the loading report's missing / unexpected / mismatched keys (all must be
empty), the config's counts, the generated ids' length, load and generation seconds, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args()
    t0 = time.perf_counter()
    model, info = AutoModelForCausalLM.from_pretrained(args.folder, output_loading_info=True)
    t1 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.new_tokens, do_sample=False)
    t2 = time.perf_counter()
    config = model.config
    counts = ("num_experts", "num_local_experts", "num_experts_per_tok", "intermediate_size", "num_hidden_layers")
    result = {
        "folder": args.folder,
        "threads": torch.get_num_threads(),
        "loading": {k: sorted(map(str, v)) for k, v in info.items()},
        "clean": not any(info.values()),
        "config": {k: getattr(config, k) for k in counts if hasattr(config, k)},
        "dtype": str(next(model.parameters()).dtype),
        "generated_tokens": out.shape[1] - ids.shape[1],
        "load_s": round(t1 - t0, 1),
        "generate_s": round(t2 - t1, 1),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
    }
    json.dump(result, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
