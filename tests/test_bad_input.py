"""Bad input to `llmp prune | eval | report | generate`: one `error:` line, exit 2, nothing written.

Most of these are refused before any model loads: ``no_load`` makes loading one fail the test.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from helpers import run_cli
from safetensors.torch import load_file, save_file

from llmp.io import load_pruned

GARBAGE = bytes(range(256)) * 8  # not UTF-8


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr("llmp.models.load_model", refuse)


@pytest.fixture
def files(tmp_path) -> dict[str, Path]:
    made = {
        "garbage.jsonl": GARBAGE,
        "mixed.jsonl": b'{"text": "a dict"}\n["then", "a list"]\n',
        "garbage.json": GARBAGE,
        "scalar.json": b"42",
    }
    for name, data in made.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in made}


def expect_error(capsys, tmp_path: Path, match: str, *argv) -> str:
    before = sorted(p.name for p in tmp_path.rglob("*"))
    code, out, err = run_cli(capsys, *argv)
    assert code == 2, (out, err)
    assert err.startswith("error: ") and match in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    return err


PRUNE_BEFORE_LOAD = [
    (["--eval-tokens", "-1"], "`--eval-tokens` must be a positive whole number; got -1"),
    (["--num-samples", "0"], "`--num-samples` must be a positive whole number; got 0"),
    (["--seq-len", "1"], "`--seq-len` must be at least 2"),
    (["--seq-len", "100000"], "exceeds the model's max_position_embeddings (512)"),
    (["--batch-size", "0"], "`--batch-size` must be >= 1"),
    (["--seed", "-1"], "`--seed` must be >= 0"),
    (["--min-keep", "1.5"], "`--min-keep` must be in [0, 1)"),
    (["--round-to", "0"], "`--round-to` must be >= 1"),
    (["--samples", "-2"], "`--samples` must be 0 (none) or more"),
    (["--calibration", "no-such.jsonl"], "`--calibration` file no-such.jsonl does not exist"),
    (["--eval-data", "./wiki.txt"], "`--eval-data` file ./wiki.txt does not exist"),
    (["--ratio", "-0.1"], "`--ratio` must be between 0 and 1"),
]


@pytest.mark.parametrize(
    ("args", "message"), PRUNE_BEFORE_LOAD, ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_prune_refuses_before_loading(tiny_dir, tmp_path, capsys, no_load, args, message):
    expect_error(capsys, tmp_path, message, "prune", "--model", tiny_dir, "--output", tmp_path / "out", *args)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("garbage.jsonl", "is not UTF-8 text"),
        ("mixed.jsonl", "record(s) [2] (counting from 1) are not JSON objects"),
        ("garbage.json", "is not UTF-8 text"),
        ("scalar.json", "it holds one int"),
    ],
)
def test_unreadable_data_files(tiny_dir, tmp_path, capsys, no_load, files, name, message):
    out = tmp_path / "out"
    expect_error(capsys, tmp_path, message, "prune", "--model", tiny_dir, "--output", out, "--calibration", files[name])
    expect_error(capsys, tmp_path, message, "prune", "--model", tiny_dir, "--output", out, "--eval-data", files[name])
    expect_error(capsys, tmp_path, message, "eval", "ppl", "--model", tiny_dir, "--data", files[name])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-tokens", "-5"], "`--max-tokens` must be a positive whole number; got -5"),
        (["--max-tokens", "0"], "`--max-tokens` must be a positive whole number; got 0"),
        (["--seq-len", "1"], "`--seq-len` must be at least 2"),
        (["--seq-len", "4096"], "exceeds the model's max_position_embeddings (512); give at most 512"),
        (["--data", "wikitext-2.raw"], "`--data` file wikitext-2.raw does not exist"),
    ],
)
def test_eval_ppl_refuses_before_loading(tiny_dir, tmp_path, capsys, no_load, args, message):
    argv = ["eval", "ppl", "--model", tiny_dir, "--data", "wikitext2", *args]
    expect_error(capsys, tmp_path, message, *argv)


def test_eval_tasks_refuses_before_loading(tiny_dir, tmp_path, capsys, no_load):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "piqa.jsonl").write_bytes(GARBAGE)
    argv = ["eval", "tasks", "--model", tiny_dir, "--tasks", "piqa", "--data-dir", tasks]
    expect_error(capsys, tmp_path, "it is not UTF-8 text", *argv)
    (tmp_path / "results").mkdir()
    expect_error(capsys, tmp_path, "is a folder; give a file path", *argv, "--output", tmp_path / "results")
    expect_error(capsys, tmp_path, "`--batch-size` must be at least 1", *argv, "--batch-size", "0")
    expect_error(capsys, tmp_path, "`--limit` must be a positive number", *argv, "--limit", "0")


def test_task_file_with_a_list_line(tiny_dir, tmp_path, capsys, one_thread):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    record = {"query": "Q: a?\nA:", "choices": [" x", " y"], "gold": 0}
    (tasks / "mc1.jsonl").write_text(json.dumps(record) + "\n" + json.dumps([1, 2]) + "\n")
    argv = ["eval", "tasks", "--model", tiny_dir, "--tasks", "mc1", "--data-dir", tasks]
    expect_error(capsys, tmp_path, "line(s) [2] are not JSON objects", *argv)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--prompt", ""], "`--prompt` is empty"),
        (["--prompt", "   "], "`--prompt` is empty"),
        (["--prompt", "Hi", "--max-new-tokens", "0"], "`--max-new-tokens` must be at least 1; got 0"),
        (["--prompt", "Hi", "--max-new-tokens", "-1"], "`--max-new-tokens` must be at least 1; got -1"),
    ],
)
def test_generate_refuses_before_loading(tiny_dir, tmp_path, capsys, no_load, args, message):
    expect_error(capsys, tmp_path, message, "generate", "--model", tiny_dir, *args)


@pytest.fixture
def pruned(tiny_dir, tmp_path_factory, capsys) -> Path:
    out = tmp_path_factory.mktemp("pruned") / "out"
    code, _, err = run_cli(
        capsys, "prune", "--model", tiny_dir, "--output", out, "--criterion", "l1", "--attention", "kv", "--samples", 0
    )
    assert code == 0, err
    return out


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (GARBAGE, "cannot read"),
        (b"[1, 2]", "holds a list, not a pruning report object"),
        (
            json.dumps({"params_before": "many", "params_after": [1]}).encode(),
            "`params_before`: input should be a valid integer",
        ),
        (json.dumps({"layer_shapes": "x", "perplexity": 3}).encode(), "`layer_shapes`: input should be a valid list"),
    ],
)
def test_report_of_a_damaged_pruning_report(pruned, capsys, content, message):
    (pruned / "pruning_report.json").write_bytes(content)
    for name in ("report.md", "report.png"):
        (pruned / name).unlink(missing_ok=True)
    expect_error(capsys, pruned, message, "report", pruned)


def test_edited_head_dim_is_named_at_load(pruned, capsys):
    config = json.loads((pruned / "config.json").read_text())
    (pruned / "config.json").write_text(json.dumps({**config, "head_dim": 8}))
    err = expect_error(
        capsys,
        pruned,
        "do not fit together or with its config.json",
        "eval",
        "ppl",
        "--model",
        pruned,
        "--data",
        "wikitext2",
    )
    assert "`model.layers.0`" in err and "config head_dim 8" in err


def test_weights_that_disagree_with_each_other_are_named_at_load(pruned):
    from llmp.errors import LlmpError

    (weights,) = pruned.glob("*.safetensors")
    state = load_file(weights)
    name = "model.layers.1.self_attn.o_proj.weight"
    state[name] = state[name][:, :-16].contiguous()  # one head fewer than q_proj has
    save_file(state, weights, metadata={"format": "pt"})
    with pytest.raises(LlmpError, match=r"`model.layers.1.self_attn(.o_proj)?`"):
        load_pruned(pruned)


def test_a_damaged_builtin_cache_names_the_folder_to_delete(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMP_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{not json")
    err = expect_error(
        capsys,
        tmp_path,
        "the cached copy of built-in 'smollm2-135m' is damaged",
        "generate",
        "--model",
        "smollm2-135m",
        "--prompt",
        "Hi",
    )
    assert f"delete the folder {folder}" in err


def test_a_path_typo_is_not_a_long_hub_wait(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # as on this machine: no hub
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.perf_counter()
    err = expect_error(
        capsys,
        tmp_path,
        "there is no such folder here, and the Hugging Face hub",
        "eval",
        "ppl",
        "--model",
        "modles/base",
        "--data",
        "wikitext2",
    )
    assert time.perf_counter() - start < 20 and "modles/base" in err
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    expect_error(capsys, tmp_path, "is unreachable", "generate", "--model", "modles/base", "--prompt", "Hi")


def test_trust_remote_code_flag_sets_the_switch(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LLMP_TRUST_REMOTE_CODE", "0")  # restored (unset) afterwards: no other test trusts code
    code, _, _ = run_cli(capsys, "--trust-remote-code", "generate", "--model", tmp_path / "none", "--prompt", "x")
    assert code == 2 and os.environ.get("LLMP_TRUST_REMOTE_CODE") == "1"


def test_importance_is_an_alias_of_criterion(tiny_dir, tmp_path, capsys, no_load):
    expect_error(
        capsys,
        tmp_path,
        "`--criterion` must be one of",
        "prune",
        "--model",
        tiny_dir,
        "--output",
        tmp_path / "o",
        "--importance",
        "magic",
    )
