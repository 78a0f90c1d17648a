"""The `llmp` command: prune / eval ppl / generate on a tiny model folder, and its error lines."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli as run
from transformers import GPT2Config, GPT2LMHeadModel


@pytest.fixture
def model_dir(tiny_dir):
    """The shared tiny Llama folder (GQA 4/2, a real byte-level BPE tokenizer; see conftest)."""
    return tiny_dir


def test_prune_eval_generate(model_dir, tmp_path, capsys):
    out_dir = tmp_path / "pruned"
    code, out, err = run(
        capsys,
        "prune",
        "--model",
        model_dir,
        "--ratio",
        0.2,
        "--output",
        out_dir,
        "--attention",
        "query",
        "--num-samples",
        4,
        "--seq-len",
        32,
        "--eval-data",
        "wikitext2",
        "--eval-tokens",
        2048,
    )
    assert code == 0, err
    assert "parameters:" in out and "perplexity on wikitext2" in out
    report = json.loads((out_dir / "pruning_report.json").read_text())
    assert abs(report["achieved_ratio"] - 0.2) <= 0.01
    assert {"dense", "pruned", "protocol"} <= set(report["perplexity"])
    assert (out_dir / "tokenizer.json").exists() and (out_dir / "config.json").exists()

    code, out, err = run(
        capsys, "eval", "ppl", "--model", out_dir, "--data", "wikitext2", "--max-tokens", 2048, "--json"
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["ppl"] == pytest.approx(report["perplexity"]["pruned"], rel=1e-4)

    code, out, err = run(capsys, "generate", "--model", out_dir, "--prompt", "The game", "--max-new-tokens", 5)
    assert code == 0, err
    assert out.strip()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ratio", "1.2"], "`--ratio` must be between 0 and 1"),
        (["--ratio", "0"], "`--ratio` must be between 0 and 1"),
        (["--layers", "2:9"], "goes beyond the model, which has 4 layers"),
        (["--calibration", "missing.jsonl"], "does not exist"),
        (["--ratio", "0.95", "--mlp-layers", "0:1"], "cannot remove"),
        (["--criterion", "magic"], "`criterion` must be one of"),
    ],
)
def test_prune_errors_are_one_line(model_dir, tmp_path, capsys, args, message):
    out_dir = tmp_path / "never"
    code, _out, err = run(
        capsys, "prune", "--model", model_dir, "--output", out_dir, "--num-samples", 2, "--seq-len", 16, *args
    )
    assert code == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out_dir.exists()


def test_model_errors(tmp_path, capsys):
    code, _, err = run(capsys, "eval", "ppl", "--model", tmp_path / "nope.gguf", "--data", "wikitext2")
    assert code == 2 and "does not exist" in err
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64)).save_pretrained(gpt2)
    code, _, err = run(capsys, "prune", "--model", gpt2, "--output", tmp_path / "o", "--criterion", "l1")
    assert code == 2 and "has no tokenizer files" in err


def test_corrupt_gguf(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    code, _, err = run(capsys, "eval", "ppl", "--model", bad, "--data", "wikitext2")
    assert code == 2 and "cannot read GGUF file" in err


def test_empty_calibration(model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code, _, err = run(capsys, "prune", "--model", model_dir, "--output", tmp_path / "o", "--calibration", empty)
    assert code == 2 and "no text in" in err


def test_bench_prune_takes_the_prune_options(tiny_dir):
    """`bench/prune.py` has every `llmp prune` pruning option (same help), and runs in a fresh clone
    (built-in data by default)."""
    import dataclasses
    import subprocess
    import sys
    from pathlib import Path

    from llmp.pruner import PruneConfig

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
    """`bench/ab_score.py` scores under settings A and B in turns in one process, each restored
    after its run; the same scores under a setting that only changes the head's chunking."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "ab_score.py"
    common = [sys.executable, script, "--model", tiny_dir, "--num-samples", "2", "--seq-len", "16", "--attention", "kv"]
    out = subprocess.run(
        [*common, "--a", "llmp.importance.LOSS_CHUNK_BYTES=0", "--b", "llmp.importance.LOSS_CHUNK_BYTES=1<<20"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and "is not a Python literal" in out.stderr  # 1<<20 is an expression
    out = subprocess.run(
        [*common, "--a", "llmp.importance.LOSS_CHUNK_BYTES=0", "--b", "llmp.importance.LOSS_CHUNK_BYTES=1048576",
         "--rounds", "3"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout  # fmt: skip
    result = json.loads(out)
    assert [len(result[side]["runs"]) for side in "ab"] == [3, 3] and result["threads"] >= 1
    assert all(run["s"] > 0 for side in "ab" for run in result[side]["runs"])
    assert result["score_relative_difference"] < 1e-5
    bad = subprocess.run([*common, "--a", "llmp.importance.NO_SUCH=1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "has no attribute 'NO_SUCH'" in bad.stderr


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


def test_prune_streamed_then_again_in_memory(model_dir, tmp_path, capsys):
    """`llmp prune --stream` writes a sharded folder equal to `--layerwise` in memory."""
    common = ("--ratio", 0.2, "--criterion", "flap", "--compensate", "bias", "--num-samples", 4, "--seq-len", 32)
    code, out, err = run(capsys, "prune", "--model", model_dir, "--stream", "--output", tmp_path / "s", *common)
    assert code == 0, err
    assert "streamed layer by layer" in out and (tmp_path / "s" / "model.safetensors.index.json").is_file()
    code, out, err = run(capsys, "prune", "--model", model_dir, "--layerwise", "--output", tmp_path / "m", *common)
    assert code == 0, err
    from llmp import load_pruned

    streamed, in_memory = load_pruned(tmp_path / "s").state_dict(), load_pruned(tmp_path / "m").state_dict()
    assert streamed.keys() == in_memory.keys() and all(torch.equal(streamed[k], in_memory[k]) for k in streamed)
    report = json.loads((tmp_path / "s" / "pruning_report.json").read_text())
    assert report["settings"]["layerwise"] and report["model"] == str(model_dir)
