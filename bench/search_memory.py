"""Benchmark: what the allocation search holds before its first generation, on a model folder.

    python bench/search_memory.py --model DIR --ratio 0.35 [--attention query] [--stats-gib 4]

Builds the search's database as :func:`llmp.allocation.evolution.search` does: the dense model,
every pruned layer's input statistics on the calibration samples (Gram matrices past
``--stats-gib`` go to a memory-mapped temporary file), then one pruned variant of every layer at
the uniform allocation, stitched as a candidate is. Prints one JSON object: the peak RSS after
each phase, the statistics' bytes (held / spilled), the variants' bytes, each phase's time and the
thread count. It measures memory and time, not quality: random weights serve.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from llmp import PruneConfig, load_model
from llmp.allocation import SearchSettings, allocate
from llmp.allocation.variants import Database
from llmp.data import calibration_samples
from llmp.plan import groups_element_parameters
from llmp.pruning.config import layer_ranges
from llmp.structure import Structure, adapter_for


def peak_gb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--ratio", type=float, default=0.35)
    parser.add_argument("--attention", default="query")
    parser.add_argument("--stats-gib", type=float, default=4.0, help="SearchSettings.stats_bytes, in GiB")
    parser.add_argument("--num-samples", type=int, default=16, help="the samples that make the variants")
    args = parser.parse_args()
    model, tokenizer = load_model(args.model)
    result = {"model": args.model, "dtype": str(model.dtype), "peak_rss_gb_model": peak_gb()}
    calibration = calibration_samples("c4", tokenizer, args.num_samples, 128, 0)
    config = PruneConfig(ratio=args.ratio, attention=args.attention).resolved(model)
    adapter = adapter_for(model)
    ranges = layer_ranges(config, len(adapter.layers(model)))
    structure = adapter.discover(model, config.kinds)
    part = Structure(structure.family, [g for g in structure.groups if g.layer in ranges[g.kind]])
    params = groups_element_parameters(part.groups, model)
    target = round(args.ratio * sum(p.numel() for p in model.parameters()))
    counts = allocate(model, part, params, target, config, calibration).counts
    settings = SearchSettings(stats_bytes=int(args.stats_gib * 2**30))
    start = time.perf_counter()
    database = Database(model, part, config, calibration, settings)
    result["statistics_s"] = round(time.perf_counter() - start, 1)
    result["peak_rss_gb_statistics"] = peak_gb()
    grams = sum(s.gram.numel() * 8 for st in database.stats.values() for s in st.values() if s.gram is not None)
    result["statistics_bytes_held"] = database.spill.held
    result["statistics_bytes_spilled"] = grams - database.spill.held
    start = time.perf_counter()
    database.stitch(counts)
    result["variants_s"] = round(time.perf_counter() - start, 1)
    result["variants_bytes"] = database.bytes
    result["peak_rss_gb_variants"] = peak_gb()
    database.restore()
    result["threads"] = torch.get_num_threads()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
