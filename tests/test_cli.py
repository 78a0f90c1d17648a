"""The `llmp` command: prune / eval ppl / generate on a tiny model folder, and its error lines."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli as run
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
        (["--criterion", "magic"], "`--criterion` must be one of"),
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
