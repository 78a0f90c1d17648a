"""The side-by-side table of one sitting (``side_by_side.sh``): LLM-Pruner's and llmp's paper runs,
each tool's median and single runs, llmp's time and peak as a share of LLM-Pruner's, and llmp's
peak against the weights' bytes. Stdlib only.

    python bench/reference/sitting_table.py [BENCH]      (default bench/work)

Reads ``BENCH/ref_results/<run>_run<i>.json`` (LLM-Pruner) and ``BENCH/sitting/llmp_<run>_<i>.json``
(llmp's ``bench/prune.py``); peaks are GiB of the process's ``ru_maxrss``. Where the sitting has
``BENCH/sitting/floor_<run>_<i>.json`` (``autograd_floor.py --repeats 1``), a second table sets
what an exact score costs at least beside both tools: one plain autograd forward and backward in
a fresh process, and the matrix products alone, each as a share of LLM-Pruner's time.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

RUNS = ("smollm2", "tl-fp32", "tl-bf16")


def _read_json(path: Path) -> dict:
    """The file's JSON object: all of it (``bench/prune.py`` indents), or its last line."""
    text = path.read_text().strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return json.loads(text.splitlines()[-1])


def _times(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})"


def table(bench: Path) -> str:
    lines = [
        "| run | LLM-Pruner | llmp | time | peak / LLM-Pruner's | peak / weights |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for run in RUNS:
        ref = [_read_json(f) for f in sorted((bench / "ref_results").glob(f"{run}_run*.json"))]
        ours = [_read_json(f) for f in sorted((bench / "sitting").glob(f"llmp_{run}_[0-9]*.json"))]
        if not ours:
            continue
        t = [r["prune_total_s"] for r in ours]
        peak = statistics.median(r["peak_rss_gb_after_prune"] for r in ours)
        over_weights = statistics.median(r["peak_rss_over_weights"] for r in ours)
        if ref:
            rt = [r["prune_total_s"] for r in ref]
            rpeak = statistics.median(r["peak_rss_gb"] for r in ref)
            their = f"{_times(rt)}, {rpeak:.2f} GiB"
            share = f"{statistics.median(t) / statistics.median(rt):.2f}×"
            peak_share = f"{peak / rpeak:.2f}×"
        else:
            their, share, peak_share = "–", "–", "–"
        lines.append(
            f"| {run} | {their} | {_times(t)}, {peak:.2f} GiB | {share} | {peak_share} | {over_weights:.2f}× |"
        )
    floors = floor_table(bench)
    return "\n".join(lines) + ("\n\n" + floors if floors else "")


def floor_table(bench: Path) -> str:
    """The runs with ``floor_<run>_<i>.json`` files: LLM-Pruner, plain autograd, the products
    alone and llmp, median seconds and their share of LLM-Pruner's."""
    lines = [
        "| run | LLM-Pruner | plain autograd | products alone | llmp |",
        "| --- | --- | --- | --- | --- |",
    ]
    for run in RUNS:
        floors = [_read_json(f) for f in sorted((bench / "sitting").glob(f"floor_{run}_[0-9]*.json"))]
        ref = [_read_json(f)["prune_total_s"] for f in sorted((bench / "ref_results").glob(f"{run}_run*.json"))]
        ours = [_read_json(f)["prune_total_s"] for f in sorted((bench / "sitting").glob(f"llmp_{run}_[0-9]*.json"))]
        if not floors or not ref or not ours:
            continue
        base = statistics.median(ref)
        cells = [f"{base:.2f} s"]
        for values in ([f["fwd_bwd_s"][0] for f in floors], [f["gemm_floor_s"] for f in floors], ours):
            cells.append(f"{statistics.median(values):.2f} s ({statistics.median(values) / base:.2f}×)")
        lines.append(f"| {run} | {' | '.join(cells)} |")
    return "\n".join(lines) if len(lines) > 2 else ""


if __name__ == "__main__":
    print(table(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/work")))
