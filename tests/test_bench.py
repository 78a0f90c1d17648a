"""The benchmark tools run, take the options they document, and refuse bad settings clearly."""

from __future__ import annotations

import json

import pytest
import torch


def test_bench_prune_takes_the_prune_options(tiny_dir):
    """`bench/prune.py` has every `llmp prune` pruning option (same help), and runs in a fresh clone
    (built-in data by default)."""
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    from llmp.pruning import PruneConfig

    bench = Path(__file__).resolve().parents[1] / "bench" / "prune.py"
    out = subprocess.run(
        [sys.executable, bench, "--model", tiny_dir, "--num-samples", "2", "--no-ppl", "--attention", "kv"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    assert result["settings"]["attention"] == "kv" and result["params_after"] < result["params_before"]
    assert result["peak_rss_over_weights"] > 1 and result["threads"] >= 1
    assert result["prune_minor_faults"] > 0 and result["prune_system_s"] >= 0
    helps = subprocess.run([sys.executable, bench, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(f"--{f.name.replace('_', '-')}" in helps for f in dataclasses.fields(PruneConfig))


def test_autograd_floor_runs(tiny_dir, calib, tmp_path):
    """`bench/reference/autograd_floor.py` (the floor the docs compare llmp's Taylor path with) runs
    one plain forward and backward per repeat and prints its times and peak."""
    import subprocess
    import sys
    from pathlib import Path

    ids = tmp_path / "calib.pt"
    torch.save(calib, ids)
    script = Path(__file__).resolve().parents[1] / "bench" / "reference" / "autograd_floor.py"
    out = subprocess.run(
        [sys.executable, script, tiny_dir, ids, "--layers", "1:2", "--repeats", "2"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = json.loads(out)
    assert len(result["fwd_bwd_s"]) == 2 and all(t > 0 for t in result["fwd_bwd_s"]) and result["peak_rss_gib"] > 0
    assert result["gemm_floor_s"] > 0


def test_ab_score_alternates_two_settings(tiny_dir):
    """`bench/ab_score.py` scores under settings A and B in turns in one process; the same scores
    under a setting that only changes the head's chunking."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "ab_score.py"
    common = [sys.executable, script, "--model", tiny_dir, "--num-samples", "2", "--seq-len", "16", "--attention", "kv"]
    out = subprocess.run(
        [*common, "--a", "loss_chunk_bytes=0", "--b", "loss_chunk_bytes=1<<20"], capture_output=True, text=True
    )
    assert out.returncode == 2 and "is not a Python literal" in out.stderr  # 1<<20 is an expression
    out = subprocess.run(
        [*common, "--a", "loss_chunk_bytes=0", "--b", "loss_chunk_bytes=1048576", "--rounds", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert [len(result[side]["runs"]) for side in "ab"] == [3, 3] and result["threads"] >= 1
    assert all(run["s"] > 0 for side in "ab" for run in result[side]["runs"])
    assert result["score_relative_difference"] < 1e-5
    bad = subprocess.run([*common, "--a", "no_such=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "ScoringSettings has no setting 'no_such'" in bad.stderr


def test_sitting_table(tmp_path):
    """`bench/reference/sitting_table.py` puts each tool's runs of a sitting side by side."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "ref_results").mkdir()
    (tmp_path / "sitting").mkdir()
    for i, t in enumerate((4.0, 6.0), 1):
        (tmp_path / "ref_results" / f"smollm2_run{i}.json").write_text(
            json.dumps({"prune_total_s": t, "peak_rss_gb": 2.0})
        )
        ours = {"prune_total_s": t / 2, "peak_rss_gb_after_prune": 1.0, "peak_rss_over_weights": 2.0}
        (tmp_path / "sitting" / f"llmp_smollm2_{i}.json").write_text(json.dumps(ours, indent=2))
    script = Path(__file__).resolve().parents[1] / "bench" / "reference" / "sitting_table.py"
    out = subprocess.run([sys.executable, script, tmp_path], capture_output=True, text=True, check=True).stdout
    row = next(line for line in out.splitlines() if line.startswith("| smollm2"))
    assert "5.00 s (4.00, 6.00), 2.00 GiB" in row and "2.50 s (2.00, 3.00), 1.00 GiB" in row
    assert "| 0.50× | 0.50× | 2.00× |" in row
    assert "plain autograd" not in out  # no floor runs in this sitting
    for i, (plain, products) in enumerate(((3.0, 2.0), (4.0, 2.2)), 1):
        floor = {"threads": 2, "fwd_bwd_s": [plain], "peak_rss_gib": 2.0, "gemm_floor_s": products}
        (tmp_path / "sitting" / f"floor_smollm2_{i}.json").write_text(json.dumps(floor))
    out = subprocess.run([sys.executable, script, tmp_path], capture_output=True, text=True, check=True).stdout
    floors = out.split("plain autograd")[1]
    row = next(line for line in floors.splitlines() if line.startswith("| smollm2"))
    assert row == "| smollm2 | 5.00 s | 3.50 s (0.70×) | 2.10 s (0.42×) | 2.50 s (0.50×) |"


def test_ab_versions_runs_two_commits_in_one_process(tiny_dir):
    """`bench/ab_versions.py` imports an earlier commit's llmp beside the working tree's and prunes
    with both: against HEAD (the same code in CI's clean clone) the weights are the same."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    script = root / "bench" / "ab_versions.py"
    out = subprocess.run(
        [sys.executable, script, "--old", "HEAD", "--model", tiny_dir, "--rounds", "1"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert result["taylor"]["same_weights"] and result["default"]["same_weights"]
    assert len(result["default"]["old_s"]) == len(result["default"]["new_s"]) == 1


def test_search_memory_spills_past_its_budget(tiny_dir):
    """`bench/search_memory.py` builds the search's database; with no memory for the statistics
    every Gram goes to the memory-mapped file, and the variants are still made."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "search_memory.py"
    args = [sys.executable, script, "--model", tiny_dir, "--num-samples", "4", "--attention", "none", "--ratio", "0.2"]
    result = json.loads(subprocess.run([*args, "--stats-gib", "0"], capture_output=True, text=True, check=True).stdout)
    assert (
        result["statistics_bytes_held"] == 0 and result["statistics_bytes_spilled"] > 0 and result["variants_bytes"] > 0
    )
    assert result["peak_rss_gb_variants"] >= result["peak_rss_gb_model"] > 0 and result["threads"] >= 1


@pytest.mark.slow
def test_the_gpu_check_dry_run_passes_every_step(tmp_path):
    """bench/gpu_check.py --dry-run: the GPU check's steps on the CPU with tiny shapes (the ZeRO
    step through llmp's CPU DeepSpeed strategy), so the script a lent GPU runs cannot rot."""
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("deepspeed")
    script = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"
    done = subprocess.run(
        [sys.executable, str(script), "--dry-run", "--work", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1500,
    )
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    steps = {line["step"]: line for line in lines}
    assert list(steps) == ["machine", "tests", "prune", "zero", "ddp", "vllm"], (
        done.stdout[-3000:] + done.stderr[-3000:]
    )
    failed = {k: v.get("error") for k, v in steps.items() if k != "machine" and not v["ok"]}
    assert not failed and done.returncode == 0, failed
    assert set(steps["zero"]["result"]) == {"zero2_lora", "zero2_full", "zero3_lora", "zero3_full"}
    assert all(r["loads"] for r in steps["zero"]["result"].values())
    assert steps["ddp"]["result"]["lightning_over_bare"] > 0
    assert steps["prune"]["result"]["streamed"]["achieved_ratio"] > 0.1
