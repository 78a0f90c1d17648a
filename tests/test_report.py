"""`llmp report` and `write_report`: report.md and report.png of a pruned (and recovered) folder."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import run_cli as run

from llmp.cli import main
from llmp.errors import LlmpError
from llmp.eval.generation import samples_entry
from llmp.report import repeated_ngrams, write_report

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def pruned_dir(tiny_dir, tmp_path_factory) -> Path:
    """`llmp prune` of the tiny model: MLP channels and query heads, one generation before/after."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("report") / "p20"
    code = main(
        [
            "prune",
            "--model",
            str(tiny_dir),
            "--ratio",
            "0.2",
            "--attention",
            "query",
            "--output",
            str(out),
            "--num-samples",
            "2",
            "--seq-len",
            "16",
            "--samples",
            "1",
        ]
    )
    assert code == 0
    return out


@pytest.fixture
def folder(pruned_dir, tmp_path) -> Path:
    """A copy of the pruned folder that a test may change."""
    return Path(shutil.copytree(pruned_dir, tmp_path / "p20"))


def test_prune_writes_the_report(pruned_dir):
    md = (pruned_dir / "report.md").read_text()
    assert (pruned_dir / "report.png").read_bytes().startswith(PNG)
    report = json.loads((pruned_dir / "pruning_report.json").read_text())
    assert f"| before | {report['params_before']:,} |" in md and f"| after | {report['params_after']:,} |" in md
    assert "(asked 20.00%)" in md and "`attention=query`" in md
    assert "| layer | heads kept | KV heads kept | MLP channels kept |" in md
    for i, (kept, dense) in enumerate(zip(report["layer_shapes"], report["dense_layer_shapes"], strict=True)):
        assert f"| {i} | {kept['heads']} / {dense['heads']} (" in md
    assert "## Generations (greedy, 32 new tokens)" in md and "| dense |" in md and "| pruned |" in md
    assert "## Perplexity" not in md and "## Zero-shot tasks" not in md


def test_report_command_with_task_scores(folder, tiny_dir, tmp_path, capsys):
    rows = [{"query": "The sky is", "choices": ["blue", "green"], "gold": 0}] * 3
    (tmp_path / "zs" / "sky").mkdir(parents=True)
    (tmp_path / "zs" / "sky" / "sky.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for label, model in (("dense", tiny_dir), ("pruned", folder)):
        code, _, err = run(
            capsys,
            *("eval", "tasks", "--model", model, "--tasks", "sky", "--data-dir", tmp_path / "zs"),
            *("--limit", 2, "--output", folder / f"tasks_{label}.json"),
        )
        assert code == 0, err
    (folder / "report.png").unlink()

    code, out, err = run(capsys, "report", folder)
    assert code == 0, err
    assert out.strip() == f"wrote {folder / 'report.md'} and {folder / 'report.png'}"
    assert (folder / "report.png").read_bytes().startswith(PNG)
    md = (folder / "report.md").read_text()
    assert "| task | n dense | acc dense | acc_norm dense | n pruned | acc pruned | acc_norm pruned |" in md
    assert "| sky | 2 | " in md and "first 2 items per task" in md and "acc_norm = argmax" in md


def test_report_command_generates_from_the_dense_model(folder, tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Once upon a time\n\nThe game\n")
    code, _, err = run(capsys, "report", folder, "--dense", tiny_dir, "--prompts", prompts, "--max-new-tokens", 4)
    assert code == 0, err
    md = (folder / "report.md").read_text()
    assert "## Generations (greedy, 4 new tokens)" in md
    assert "**Once upon a time**" in md and "**The game**" in md and "AI can create" not in md
    assert "| dense |" in md and "| pruned |" in md


def test_recovered_folder_shows_perplexities_and_settings(folder):
    """What `llmp fit` adds to the pruning report is shown: dense → pruned → recovered."""
    report = json.loads((folder / "pruning_report.json").read_text())
    report["perplexity"] = {"dense": 51.9, "pruned": 106.8, "recovered": 60.25, "protocol": "128-token windows"}
    report["recovery"] = {"mode": "lora", "lora": {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}, "epochs": 1}
    report["generations"] = dataclasses.asdict(
        samples_entry(
            *({"prompts": ["Hi"], "max_new_tokens": 3, "outputs": [text]} for text in ("a b c", "a a a", "a b d")),
            labels=("dense", "pruned", "recovered"),
        )
    )
    (folder / "pruning_report.json").write_text(json.dumps(report))
    md_path, png_path = write_report(folder)
    assert (md_path, png_path) == (folder / "report.md", folder / "report.png")
    md = md_path.read_text()
    assert "| data | dense | pruned | recovered | protocol |" in md
    assert "| - | 51.90 | 106.80 | 60.25 | 128-token windows |" in md
    assert "## Recovery" in md and "| lora.r | 8 |" in md and "| lora.targets | q_proj, v_proj |" in md
    assert "| recovered | a b d | 0% |" in md
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != ".llmp"]
    assert not leftovers  # atomic writes leave no temporary files


def test_missing_stages_and_shapes(folder):
    report = json.loads((folder / "pruning_report.json").read_text())
    del report["layer_shapes"], report["generations"]  # the config's llmp_layer_shapes are used
    report["perplexity"] = {"data": "wikitext2", "dense": 51.9, "pruned": None, "protocol": "p"}
    (folder / "pruning_report.json").write_text(json.dumps(report))
    md = write_report(folder)[0].read_text()
    assert "| data | dense | protocol |" in md and "| wikitext2 | 51.90 | p |" in md
    assert "| 0 | 4 / 4 (100%) |" in md and "## Generations" not in md


def test_repeated_ngrams():
    assert repeated_ngrams("a b c d") == 0.0
    assert repeated_ngrams("a b a b a b") == pytest.approx(0.5)
    assert repeated_ngrams("") == 0.0
    assert repeated_ngrams("to do it first.\n\n\n\n\n\n") == pytest.approx(3 / 8)


@pytest.mark.parametrize(
    ("setup", "args", "message"),
    [
        (lambda f: shutil.rmtree(f), [], "is not a folder"),
        (lambda f: (f / "pruning_report.json").unlink(), [], "has no pruning_report.json"),
        (lambda f: (f / "pruning_report.json").write_text("{oops"), [], "cannot read"),
        (lambda f: (f / "pruning_report.json").write_text("[1]"), [], "holds a list, not a pruning report"),
        (lambda f: (f / "tasks_x.json").write_text("{}"), [], "holds no `tasks` object"),
        (lambda f: (f / "tasks_x.json").write_text("nope"), [], "is not JSON"),
        (lambda f: None, ["--max-new-tokens", "0"], "`--max-new-tokens` must be at least 1; got 0"),
        (lambda f: None, ["--prompts", "/nonexistent.txt"], "`--prompts` file /nonexistent.txt does not exist"),
        (lambda f: (f / "p.txt").write_text("\n \n"), ["--prompts", "{f}/p.txt"], "holds no prompt"),
        (lambda f: (f / "p.txt").write_text("Hi\n"), ["--prompts", "{f}/p.txt"], "`--prompts` needs `--dense`"),
    ],
)
def test_report_errors(folder, capsys, setup, args, message):
    setup(folder)
    code, out, err = run(capsys, "report", folder, *[a.format(f=folder) for a in args])
    assert code == 2 and not out
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_write_report_error(tmp_path):
    with pytest.raises(LlmpError, match=r"cannot read .*pruning_report.json"):
        write_report(tmp_path)


def test_speed_bench_dense_vs_pruned(tiny_dir, pruned_dir, monkeypatch, capsys):
    """`python bench/speed.py --pruned DIR` on the tiny model: JSON rows and the Markdown table."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "bench" / "speed.py"
    spec = importlib.util.spec_from_file_location("bench_speed", path)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    argv = ["speed.py", "--model", str(tiny_dir), "--pruned", str(pruned_dir), "--seq-lens", "8,32"]
    argv += ["--batch-sizes", "1,2", "--dtypes", "fp32,bf16", "--repeats", "1", "--decode-tokens", "2"]
    monkeypatch.setattr("sys.argv", [*argv, "--max-batch-tokens", "32", "--threads", "1"])
    speed.main()
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert result["threads"] == 1 and len(result["load_average"]["before"]) == 3
    assert result["skipped"] == [{"dtype": d, "batch": 2, "kind": "prefill", "seq": 32} for d in ("fp32", "bf16")]
    cases = {(r["model"], r["dtype"], r["batch"], r["kind"], r["seq"]) for r in result["rows"]}
    assert len(result["rows"]) == 2 * 2 * 5 and ("pruned", "bf16", 2, "decode", 128) in cases
    pruned = [r for r in result["rows"] if r["model"] == "pruned"]
    assert all(r["flops_ratio"] > 1.0 and r["weights_mb"] > 0 and r["tokens_per_s"] > 0 for r in pruned)
    assert all(r["meets_flops"] == (r["speedup"] >= r["flops_ratio"]) for r in pruned)
    assert (
        "| dtype | batch | case | dense ms | pruned ms |" in err and "| fp32 | 2 | decode (128-token prompt) |" in err
    )
