"""Zero-shot task files read offline, for :mod:`llmp.eval.tasks`.

The files of a task are read into ``{query, choices, gold}`` (or ``{query, target}``) records with the
harness's prompts and handed to the harness as a task whose continuation is ``" " + choice``:

============  ================================================  ==================================
format        file (in ``DIR/<task>/`` or ``DIR/<task>.jsonl``)  prompt
============  ================================================  ==================================
piqa          ``*.jsonl`` ``{goal, sol1, sol2}`` +               ``Question: {goal}\\nAnswer:``
              ``*-labels.lst`` beside it
boolq         ``{question, passage, answer}`` (dev)             ``{passage}\\nQuestion: {question}?\\nAnswer:``
obqa          ``{question: {stem, choices}, answerKey}``        ``{stem}`` (``*Main_test*`` first)
mc            ``{query, choices, gold}`` (llm-foundry), any     ``{query}``, plus ``\\nAnswer:`` for
              task name; ``gold`` is a 0-based index            piqa, boolq, arc_easy, arc_challenge
lambada       ``{context, continuation}`` (llm-foundry)          ``{context}``, target ``" " + continuation``
============  ================================================  ==================================

The original formats give exactly the harness's prompts. llm-foundry's files are stripped of
surrounding spaces (as llm-foundry does) and llm-foundry's continuation delimiter ``"\\nAnswer: "``
for those four tasks becomes ``"\\nAnswer:"`` + ``" " + choice``: the same text, split where the
harness splits it. Its BoolQ passage keeps llm-foundry's ``Passage:`` prefix.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmp.errors import LlmpError

ALIASES = {"openbookqa": "openbook_qa", "openbook_qa": "openbookqa"}
ANSWER_TASKS = {"piqa", "boolq", "arc_easy", "arc_challenge"}  # llm-foundry's "\nAnswer: " tasks
FORMATS = ("piqa", "boolq", "obqa", "mc", "lambada")  # preference order: the originals give the harness prompt
FORMATS_HELP = (
    "{query, choices, gold} records (gold: 0-based index), {context, continuation} cloze records, "
    "or the original PIQA (with its -labels.lst), BoolQ or OpenBookQA files"
)


def find_task_file(name: str, data_dir: str | Path) -> tuple[Path, str]:
    """The file of task ``name`` in ``data_dir`` and its format (see the module docstring).

    An original format wins over ``mc`` (it gives the harness's exact prompt); among files of one
    format, OpenBookQA's ``Main_test`` (the harness's split) wins, then a name with ``test`` in it.

    Raises:
        LlmpError: ``data_dir`` is not a folder, no file for the task is in it, or its files are in
            no known format.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LlmpError(f"`data_dir` {data_dir} is not a folder")
    candidates = []
    for folder in (data_dir / name, data_dir / ALIASES.get(name, name)):
        candidates += sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    candidates += [p for p in (data_dir / f"{name}.jsonl",) if p.is_file()]
    candidates = list(dict.fromkeys(candidates))
    if not candidates:
        raise LlmpError(
            f"no file for task `{name}` in {data_dir}: expected {data_dir / name}/*.jsonl or "
            f"{data_dir / name}.jsonl holding {FORMATS_HELP}"
        )
    sniffed = {path: _sniff(path) for path in candidates}
    found = [(path, fmt) for path, fmt in sniffed.items() if fmt in FORMATS]
    if not found:
        details = "; ".join(f"{path.name}: {why}" for path, why in sniffed.items())
        raise LlmpError(f"no file of task `{name}` is in a known format ({details}); llmp reads {FORMATS_HELP}")

    def rank(pf):
        path, fmt = pf
        lower = path.name.lower()
        return FORMATS.index(fmt), "main_test" not in lower, "test" not in lower, path.name

    return min(found, key=rank)


def load_local_task(name: str, data_dir: str | Path, limit: int | None = None) -> tuple[list[dict], str, str]:
    """Read task ``name`` from ``data_dir`` as ``(records, source file, format)``.

    Records are ``{"query", "choices", "gold"}`` (``{"query", "target"}`` with ``target`` =
    ``" " + continuation`` for the ``lambada`` format) in the harness's prompt (see the module docstring); ``limit`` keeps the first records.

    Raises:
        LlmpError: no readable file for the task, or records that are not valid.
    """
    path, fmt = find_task_file(name, data_dir)
    rows = []
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if limit is not None and len(rows) == limit:
                    break
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise LlmpError(f"{path} line {number} is not JSON ({err}); one JSON object per line") from err
    except UnicodeDecodeError as err:
        raise LlmpError(f"{path} is not UTF-8 text ({err}); give a .jsonl file, one JSON object per line") from None
    not_objects = [i + 1 for i, row in enumerate(rows) if not isinstance(row, dict)]
    if not_objects:
        raise LlmpError(f"{path}: line(s) {not_objects[:5]} are not JSON objects; one JSON object per line")
    try:
        records = _READERS[fmt](rows, path, name)
    except LlmpError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LlmpError(f"{path}: a record lacks a field of the {fmt} format ({type(err).__name__}: {err})") from err
    _check(records, path, fmt)
    return records, str(path), fmt


def _sniff(path: Path) -> str:
    """The format of ``path`` from its first record, or why it has none."""
    try:
        with path.open(encoding="utf-8") as f:
            line = f.readline()
        first = json.loads(line)
    except UnicodeDecodeError:
        return "it is not UTF-8 text"
    except json.JSONDecodeError:
        return "the first line is not JSON"
    if not isinstance(first, dict):
        return f"the first line is a {type(first).__name__}, not a JSON object"
    keys = set(first)
    if {"query", "choices", "gold"} <= keys:
        return "mc"
    if {"context", "continuation"} <= keys:
        return "lambada"
    if {"goal", "sol1", "sol2"} <= keys:
        return "piqa" if _labels_file(path).is_file() else f"PIQA records without {_labels_file(path).name} beside"
    if {"question", "passage", "answer"} <= keys:
        return "boolq"
    if isinstance(first.get("question"), dict) and "answerKey" in first:
        return "obqa"
    return f"unknown record keys {sorted(keys)}"


def _labels_file(path: Path) -> Path:
    return path.with_name(path.stem + "-labels.lst")


def _read_piqa(rows: list[dict], path: Path, name: str) -> list[dict]:
    labels = _labels_file(path).read_text().split()
    if len(labels) < len(rows):
        raise LlmpError(f"{_labels_file(path)} has {len(labels)} labels for {len(rows)} questions in {path}")
    return [
        {"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(label)}
        for r, label in zip(rows, labels, strict=False)
    ]


def _read_boolq(rows: list[dict], path: Path, name: str) -> list[dict]:
    return [
        {
            "query": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",
            "choices": ["no", "yes"],
            "gold": int(bool(r["answer"])),
        }
        for r in rows
    ]


def _read_obqa(rows: list[dict], path: Path, name: str) -> list[dict]:
    records = []
    for r in rows:
        choices = r["question"]["choices"]
        labels = [c["label"] for c in choices]
        key = r["answerKey"].strip()
        records.append(
            {
                "query": r["question"]["stem"],
                "choices": [c["text"] for c in choices],
                "gold": labels.index(key) if key in labels else -1,
            }
        )
    return records


def _read_mc(rows: list[dict], path: Path, name: str) -> list[dict]:
    records = []
    for r in rows:
        query = str(r["query"]).strip()
        if name in ANSWER_TASKS and not query.endswith("Answer:"):
            query += "\nAnswer:"
        choices = [str(c).strip() for c in r["choices"]] if isinstance(r["choices"], list) else r["choices"]
        records.append({"query": query, "choices": choices, "gold": r["gold"]})
    return records


def _read_lambada(rows: list[dict], path: Path, name: str) -> list[dict]:
    # As the harness's lambada_openai: the context without the last space, the target " " + last
    # word (a loglikelihood task gets no target delimiter from the harness, so the space is here).
    records = []
    for r in rows:
        word = str(r["continuation"]).strip()
        records.append({"query": str(r["context"]).rstrip(" "), "target": f" {word}" if word else ""})
    return records


_READERS = {"piqa": _read_piqa, "boolq": _read_boolq, "obqa": _read_obqa, "mc": _read_mc, "lambada": _read_lambada}


def _check(records: list[dict], path: Path, fmt: str) -> None:
    if not records:
        raise LlmpError(f"{path} holds no records")
    if fmt == "lambada":
        bad = [i + 1 for i, r in enumerate(records) if not r["query"] or not r["target"]]
        need = "non-empty `context` and `continuation`"
    else:
        bad = [
            i + 1
            for i, r in enumerate(records)
            if not isinstance(r["choices"], list)
            or len(r["choices"]) < 2
            or not all(isinstance(c, str) and c for c in r["choices"])
            or not isinstance(r["gold"], int)
            or not 0 <= r["gold"] < len(r["choices"])
        ]
        need = "`choices` as a list of 2+ non-empty strings and `gold` as a 0-based index into them"
    if bad:
        raise LlmpError(f"{path}: record(s) {bad[:5]} (counting from 1) need {need}")
