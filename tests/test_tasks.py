"""Zero-shot tasks (`llmp eval tasks`): local formats, harness prompts, scores on a tiny model, errors."""

from __future__ import annotations

import ast
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import pytest
from helpers import DATA
from helpers import run_cli as run

from llmp.errors import LlmpError
from llmp.eval.task_files import find_task_file, load_local_task
from llmp.eval.tasks import evaluate_tasks
from llmp.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")

ZEROSHOT = DATA / "zeroshot"
needs_shared = pytest.mark.skipif(not ZEROSHOT.is_dir(), reason="../shared/data/zeroshot is not here")


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """One small task in every accepted format, with short texts so the tiny model is quick."""
    root = tmp_path_factory.mktemp("tasks")
    write_jsonl(
        root / "mytask" / "llmfoundry_mytask.jsonl",
        [
            {"query": "The sky is", "choices": ["blue", "a very long and green answer"], "gold": 0},
            {"query": "Two plus two is", "choices": ["four", "five", "six"], "gold": 0},
            {"query": "Water is", "choices": ["dry", "wet"], "gold": 1},
        ],
    )
    write_jsonl(
        root / "piqa" / "piqa_orig_valid.jsonl",
        [{"goal": "Open a jar", "sol1": "twist the lid", "sol2": "eat the lid"}] * 2
        + [{"goal": "Dry hands", "sol1": "use water", "sol2": "use a towel"}],
    )
    (root / "piqa" / "piqa_orig_valid-labels.lst").write_text("0\n0\n1\n")
    write_jsonl(
        root / "boolq" / "boolq_orig_dev.jsonl",
        [
            {"question": "is the sky blue", "title": "Sky", "answer": True, "passage": "The sky is blue."},
            {"question": "is fire cold", "title": "Fire", "answer": False, "passage": "Fire is hot."},
        ],
    )
    choices = [{"text": t, "label": k} for t, k in (("rain", "A"), ("sand", "B"), ("ice", "C"), ("fog", "D"))]
    write_jsonl(
        root / "openbookqa" / "obqa_orig_Main_test.jsonl",
        [{"id": "1", "question": {"stem": "Clouds bring", "choices": choices}, "answerKey": "A"}] * 2,
    )
    write_jsonl(  # the harness's split is Main_test: this one must not be read
        root / "openbookqa" / "obqa_orig_Additional_test_complete.jsonl",
        [{"id": "1", "question": {"stem": "Never read", "choices": choices}, "answerKey": "B"}],
    )
    write_jsonl(
        root / "lambada_openai" / "llmfoundry_lambada_openai.jsonl",
        [{"context": "The cat sat on the", "continuation": "mat"}, {"context": "One, two,", "continuation": "three"}],
    )
    return root


@pytest.fixture(scope="module")
def tiny_lm(tiny_dir):
    return load_model(str(tiny_dir))


def test_formats_become_harness_records(task_dir):
    records, source, fmt = load_local_task("piqa", task_dir)
    assert fmt == "piqa" and source.endswith("piqa_orig_valid.jsonl")
    assert records[2] == {"query": "Question: Dry hands\nAnswer:", "choices": ["use water", "use a towel"], "gold": 1}
    records, _, fmt = load_local_task("boolq", task_dir)
    assert fmt == "boolq"
    assert records[0] == {
        "query": "The sky is blue.\nQuestion: is the sky blue?\nAnswer:",
        "choices": ["no", "yes"],
        "gold": 1,
    }
    records, source, fmt = load_local_task("openbookqa", task_dir)
    assert fmt == "obqa" and "Main_test" in source
    assert records[0] == {"query": "Clouds bring", "choices": ["rain", "sand", "ice", "fog"], "gold": 0}
    records, _, fmt = load_local_task("mytask", task_dir, limit=2)
    assert fmt == "mc" and len(records) == 2 and records[1]["choices"] == ["four", "five", "six"]
    records, _, fmt = load_local_task("lambada_openai", task_dir)
    assert fmt == "lambada" and records[0] == {"query": "The cat sat on the", "target": " mat"}


@needs_shared
def test_shared_files_are_found_in_their_best_format():
    expected = {
        "piqa": "piqa",
        "boolq": "boolq",
        "openbookqa": "obqa",
        "arc_easy": "mc",
        "copa": "mc",
        "lambada_openai": "lambada",
    }
    found = {name: find_task_file(name, ZEROSHOT) for name in expected}
    assert {name: fmt for name, (_, fmt) in found.items()} == expected
    assert found["openbookqa"][0].name == "obqa_orig_Main_test.jsonl"


@needs_shared
@pytest.mark.parametrize(
    ("name", "foundry"),
    [("piqa", "piqa/llmfoundry_piqa.jsonl"), ("openbookqa", "openbookqa/llmfoundry_openbook_qa.jsonl")],
)
def test_llmfoundry_files_give_the_original_prompts(tmp_path, name, foundry):
    """llm-foundry's copy of a task, read as `mc`, yields the harness prompt of the original files."""
    shutil.copy(ZEROSHOT / foundry, (tmp_path / name).mkdir() or tmp_path / name)
    original, _, fmt = load_local_task(name, ZEROSHOT, limit=200)
    copy, _, copy_fmt = load_local_task(name, tmp_path, limit=200)
    assert (fmt, copy_fmt) == ("obqa" if name == "openbookqa" else name, "mc")
    strip = [{**r, "choices": [c.strip() for c in r["choices"]]} for r in original]  # llm-foundry strips
    assert copy == strip


@needs_shared
@pytest.mark.parametrize(
    ("name", "harness_yaml", "to_harness_doc"),
    [
        ("piqa", "piqa/piqa.yaml", lambda row, label: {**row, "label": label}),
        ("boolq", "super_glue/boolq/default.yaml", lambda row, label: {**row, "label": int(row["answer"])}),
        (
            "lambada_openai",
            "lambada/lambada_openai.yaml",
            lambda row, label: {"text": row["context"] + " " + row["continuation"]},
        ),
    ],
)
def test_prompts_equal_the_harness_templates(name, harness_yaml, to_harness_doc):
    """The records equal what the harness's own task YAML makes of the same items."""
    import lm_eval
    import yaml
    from lm_eval.utils import apply_template

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks" / harness_yaml).read_text())
    path, _ = find_task_file(name, ZEROSHOT)
    rows = [json.loads(line) for line in path.read_text().splitlines()[:50]]
    labels = path.with_name(path.stem + "-labels.lst")
    gold = [int(x) for x in labels.read_text().split()[:50]] if labels.is_file() else [None] * 50
    records, _, _ = load_local_task(name, ZEROSHOT, limit=50)
    for record, row, label in zip(records, rows, gold, strict=True):
        doc = to_harness_doc(row, label)
        assert record["query"] == apply_template(config["doc_to_text"], doc)
        if "choices" in record:
            choices = config["doc_to_choice"]
            expected = apply_template(choices, doc) if isinstance(choices, str) else choices
            assert record["choices"] == (ast.literal_eval(expected) if isinstance(expected, str) else expected)
            assert record["gold"] == doc["label"]
        else:
            assert record["target"] == apply_template(config["doc_to_target"], doc)


def test_every_format_scores_on_a_tiny_model(tiny_lm, task_dir):
    model, tokenizer = tiny_lm
    names = ["mytask", "piqa", "boolq", "openbookqa", "lambada_openai"]
    first = evaluate_tasks(model, tokenizer, names, task_dir, batch_size=4, model_name="tiny")
    assert first.harness_version == version("lm_eval")
    assert {n: r.n for n, r in first.tasks.items()} == {
        "mytask": 3,
        "piqa": 3,
        "boolq": 2,
        "openbookqa": 2,
        "lambada_openai": 2,
    }
    for name in names[:4]:
        r = first.tasks[name]
        assert 0.0 <= r.acc <= 1.0 and 0.0 <= r.acc_norm <= 1.0 and r.ppl is None
    cloze = first.tasks["lambada_openai"]
    assert cloze.acc_norm is None and cloze.ppl > 1.0 and cloze.format == "lambada"
    table = first.table()
    assert "| task | n | acc | acc_norm | ppl | format |" in table and "| boolq | 2 |" in table
    again = evaluate_tasks(model, tokenizer, names, task_dir, batch_size=4, model_name="tiny")
    assert again.as_dict() == first.as_dict()  # deterministic


def test_cli_json_and_output(tiny_dir, task_dir, tmp_path, capsys):
    out_file = tmp_path / "tasks_dense.json"
    args = ["eval", "tasks", "--model", tiny_dir, "--tasks", "mytask,piqa", "--data-dir", task_dir]
    code, out, err = run(capsys, *args, "--limit", 2, "--json", "--output", out_file)
    assert code == 0, err
    result = json.loads(out)
    assert result == json.loads(out_file.read_text())
    assert result["limit"] == 2 and result["harness_version"] == version("lm_eval")
    assert {n: (t["n"], t["format"]) for n, t in result["tasks"].items()} == {"mytask": (2, "mc"), "piqa": (2, "piqa")}
    assert all({"acc", "acc_norm", "acc_stderr"} <= set(t) for t in result["tasks"].values())

    code, out, err = run(capsys, *args)
    assert code == 0, err
    assert f"lm-evaluation-harness {version('lm_eval')}, all items" in out
    assert "| task | n | acc | acc_norm | format |" in out and "| mytask | 3 |" in out
    assert "acc_norm = argmax of log-likelihood / len(choice)" in out


def test_online_tasks_go_through_the_harness_registry(tiny_dir, task_dir, capsys, monkeypatch):
    """Without --data-dir the harness's own task (here a stand-in for its hub download) is scored."""
    import lm_eval.tasks

    from llmp.eval.tasks import _harness_task

    class Manager:
        all_tasks = ("piqa",)

    def get_task_dict(names, manager):
        task = _harness_task("piqa", load_local_task("piqa", task_dir)[0], "piqa")
        task.config.dataset_path, task.config.dataset_name = "baber/piqa", None
        return {name: task for name in names}

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Manager)
    monkeypatch.setattr(lm_eval.tasks, "get_task_dict", get_task_dict)
    code, out, err = run(capsys, "eval", "tasks", "--model", tiny_dir, "--tasks", "piqa", "--json")
    assert code == 0, err
    piqa = json.loads(out)["tasks"]["piqa"]
    assert (piqa["source"], piqa["format"], piqa["n"]) == ("hub:baber/piqa", "harness", 3)

    code, _, err = run(capsys, "eval", "tasks", "--model", tiny_dir, "--tasks", "piqa,mytask")
    assert code == 2 and "`tasks` ['mytask'] are not lm-evaluation-harness task names" in err


@pytest.mark.parametrize(
    ("files", "args", "message"),
    [
        ({}, ["--tasks", "hellaswag"], "no file for task `hellaswag`"),
        ({"hellaswag/h.jsonl": [{"ctx": "a", "endings": ["b", "c"], "label": 0}]}, [], "unknown record keys"),
        ({"hellaswag/h.jsonl": [{"goal": "a", "sol1": "b", "sol2": "c"}]}, [], "PIQA records without h-labels.lst"),
        ({"hellaswag/h.jsonl": ["not an object"]}, [], "the first line is a str"),
        ({}, ["--limit", "0"], "`--limit` must be a positive number of items; got 0"),
        ({}, ["--batch-size", "0"], "`--batch-size` must be at least 1"),
        ({}, ["--tasks", " , "], "`--tasks` names no task"),
        ({}, ["--data-dir", "/nonexistent/zeroshot"], "is not a folder"),
        ({}, ["--output", "/nonexistent/dir/tasks.json"], "`--output` /nonexistent/dir/tasks.json: its folder"),
    ],
)
def test_cli_errors_before_the_model_loads(tmp_path, capsys, files, args, message):
    for name, rows in files.items():
        write_jsonl(tmp_path / name, rows)
    # The model does not exist: the task error must come first, from checks made before loading.
    base = {"--model": tmp_path / "no-model", "--tasks": "hellaswag", "--data-dir": tmp_path}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    code, out, err = run(capsys, "eval", "tasks", *[x for kv in base.items() for x in kv])
    assert code == 2 and not out
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"query": "q", "choices": ["a", "b"], "gold": 2}], r"record\(s\) \[1\] .* need `choices`"),
        ([{"query": "q", "choices": ["a"], "gold": 0}], "a list of 2\\+ non-empty strings"),
        ([{"context": "c", "continuation": ""}], "non-empty `context` and `continuation`"),
    ],
)
def test_bad_records(tmp_path, rows, message):
    write_jsonl(tmp_path / "t" / "t.jsonl", rows)
    with pytest.raises(LlmpError, match=message):
        load_local_task("t", tmp_path)


def test_bad_json_line_and_arguments(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}])
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(LlmpError, match=r"t.jsonl line 2 is not JSON"):
        load_local_task("t", tmp_path)
    with pytest.raises(LlmpError, match=r"`tasks` is empty.*; `limit` must be a positive.*; `batch_size`"):
        evaluate_tasks(None, None, [], tmp_path, limit=-3, batch_size=0)


@pytest.mark.slow
@needs_shared
def test_smollm2_piqa_arc_easy(smollm2):
    """SmolLM2-135M-Instruct scores well above chance (PIQA 0.5, ARC-Easy 0.25), the same twice."""
    model, tokenizer = smollm2
    first = evaluate_tasks(model, tokenizer, ["piqa", "arc_easy"], ZEROSHOT, limit=40, model_name="smollm2-135m")
    assert {n: r.n for n, r in first.tasks.items()} == {"piqa": 40, "arc_easy": 40}
    piqa, arc = first.tasks["piqa"], first.tasks["arc_easy"]
    assert 0.55 <= piqa.acc <= 0.85 and 0.55 <= piqa.acc_norm <= 0.85
    assert 0.35 <= arc.acc <= 0.80 and 0.30 <= arc.acc_norm <= 0.80
    again = evaluate_tasks(model, tokenizer, ["piqa", "arc_easy"], ZEROSHOT, limit=40, model_name="smollm2-135m")
    assert again.as_dict() == first.as_dict()
