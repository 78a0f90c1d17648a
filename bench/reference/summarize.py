"""Median of each reference configuration's runs: python summarize.py RESULTS_DIR (stdlib only)."""

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

runs = defaultdict(list)
for f in sorted(Path(sys.argv[1]).glob("*_run*.json")):
    runs[f.name.rsplit("_run", 1)[0]].append(json.loads(f.read_text().strip().splitlines()[-1]))
print(
    "| config | runs | prune time s (median; each) | peak RSS GB (median) | RSS after load GB | params before | params after | removed | threads |"
)
print("|---|---|---|---|---|---|---|---|---|")
for name, rs in runs.items():
    t = [r["prune_total_s"] for r in rs]
    print(
        f"| {name} ({rs[0]['dtype']}) | {len(rs)} | {statistics.median(t):.2f} ({', '.join(f'{x:.2f}' for x in t)}) "
        f"| {statistics.median(r['peak_rss_gb'] for r in rs):.2f} | {statistics.median(r['rss_after_load_gb'] for r in rs):.2f} "
        f"| {rs[0]['params_before']:,} | {rs[0]['params_after']:,} | {100 * rs[0]['removed_fraction']:.2f}% | {rs[0]['threads']} |"
    )
