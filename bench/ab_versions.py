"""Benchmark: ``llmp.prune`` of an earlier commit against the working tree, in one process.

    python bench/ab_versions.py --old 8354547 --rounds 3

The earlier commit's ``llmp/`` is taken with ``git archive`` into a temporary folder and imported
as ``llmpold`` (every ``llmp`` import in it renamed), so both versions run in one process on one
loaded model: each round prunes a fresh copy with each version, alternating which goes first,
with LLM-Pruner's criterion (``--criterion taylor``) and with the defaults. Prints one JSON object:
each version's seconds per run (``prune()`` alone) and whether both gave the same weights (the
sum and the sum of squares of every parameter, compared exactly).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"taylor": dict(ratio=0.2, criterion="taylor"), "default": dict(ratio=0.2)}


def import_old(revision: str, folder: Path):
    """``llmp/`` of ``revision`` as the package ``llmpold``."""
    archive = subprocess.run(["git", "archive", revision, "llmp"], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    (folder / "llmp").rename(folder / "llmpold")
    for path in (folder / "llmpold").rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bllmp\.", "llmpold.", text)
        text = re.sub(r"\bfrom llmp import\b", "from llmpold import", text)
        path.write_text(re.sub(r"^import llmp$", "import llmpold as llmp", text, flags=re.M))
    sys.path.insert(0, str(folder))
    return importlib.import_module("llmpold")


def weights(model: torch.nn.Module) -> tuple[float, float]:
    w = torch.cat([p.detach().double().flatten() for p in model.parameters()])
    return float(w.sum()), float((w * w).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", required=True, help="the earlier commit (any git revision)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import llmp
    from llmp.data import calibration_samples
    from llmp.memory import return_freed_memory

    with tempfile.TemporaryDirectory() as folder:
        old = import_old(args.old, Path(folder))
        return_freed_memory()  # as `llmp prune` does; each copy keeps its own switch of the policy
        importlib.import_module("llmpold.memory").return_freed_memory()
        model, tokenizer = llmp.load_model(args.model)
        calib = calibration_samples("c4", tokenizer, 16, 128, 0)
        runs: dict[str, list] = {}
        for r in range(args.rounds):
            sides = (("old", old), ("new", llmp)) if r % 2 == 0 else (("new", llmp), ("old", old))
            for name, settings in SETTINGS.items():
                for side, lib in sides:
                    pruned = copy.deepcopy(model)
                    start = time.perf_counter()
                    lib.prune(pruned, lib.PruneConfig(**settings), calib)
                    runs.setdefault((name, side), []).append((time.perf_counter() - start, weights(pruned)))
    result = {"model": args.model, "old": args.old, "threads": torch.get_num_threads(), "calibration": "c4 16 x 128"}
    for name in SETTINGS:
        old_runs, new_runs = runs[(name, "old")], runs[(name, "new")]
        result[name] = {
            "old_s": [round(s, 3) for s, _ in old_runs],
            "new_s": [round(s, 3) for s, _ in new_runs],
            "same_weights": all(a == b for (_, a), (_, b) in zip(old_runs, new_runs, strict=True)),
        }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
