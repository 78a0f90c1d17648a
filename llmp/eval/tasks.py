"""Zero-shot tasks through lm-evaluation-harness, online or from local files.

The harness scores every multiple-choice task the same way: each choice is a continuation of the
prompt, its log-likelihood is the sum of its tokens' log-probabilities, and

- ``acc`` is right when the gold choice has the highest log-likelihood;
- ``acc_norm`` is right when it has the highest log-likelihood divided by the choice's length in
  characters (the harness's definition: ``len(choice)``, the delimiter space not counted). It
  removes the bias towards short choices; on tasks whose choices differ in length (PIQA, ARC,
  OpenBookQA) the two can rank models differently, so both are reported.

LAMBADA-style cloze files (``{context, continuation}``) are scored as the harness's
``lambada_openai``: ``acc`` is the share of continuations that greedy decoding reproduces
exactly, ``ppl`` the perplexity of the continuations; there is no ``acc_norm``.

Online (no ``data_dir``) the harness's own task definitions and hub data are used. Offline the
files of a task are read into ``{query, choices, gold}`` (or ``{query, target}``) records with the
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

Example::

    model, tokenizer = llmp.load_model("smollm2-135m")
    results = evaluate_tasks(model, tokenizer, ["piqa", "arc_easy"], "data/zeroshot", limit=200)
    results.tasks["piqa"].acc_norm
"""

from __future__ import annotations

import json
import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmp.errors import LlmpError

PROMPT_NOTE = (
    "zero-shot; acc = argmax of summed log-likelihood of ' ' + choice after the prompt, "
    "acc_norm = argmax of log-likelihood / len(choice) in characters (lm-evaluation-harness definitions)"
)
ALIASES = {"openbookqa": "openbook_qa", "openbook_qa": "openbookqa"}
ANSWER_TASKS = {"piqa", "boolq", "arc_easy", "arc_challenge"}  # llm-foundry's "\nAnswer: " tasks
FORMATS = ("piqa", "boolq", "obqa", "mc", "lambada")  # preference order: the originals give the harness prompt
FORMATS_HELP = (
    "{query, choices, gold} records (gold: 0-based index), {context, continuation} cloze records, "
    "or the original PIQA (with its -labels.lst), BoolQ or OpenBookQA files"
)


@dataclass
class TaskResult:
    """Scores of one task.

    Attributes:
        acc: accuracy by summed log-likelihood (cloze tasks: greedy decoding reproduces the target).
        acc_norm: accuracy by log-likelihood per character of the choice; ``None`` for cloze tasks.
        n: items scored.
        source: the file read, or ``hub:<dataset>`` online.
        format: ``piqa``, ``boolq``, ``obqa``, ``mc``, ``lambada`` (local) or ``harness`` (online).
        acc_stderr: standard error of ``acc`` (sample standard deviation / sqrt(n), as the harness).
        acc_norm_stderr: the same for ``acc_norm``.
        ppl: perplexity of the targets (cloze tasks only).
    """

    acc: float
    acc_norm: float | None
    n: int
    source: str
    format: str
    acc_stderr: float | None = None
    acc_norm_stderr: float | None = None
    ppl: float | None = None


@dataclass
class TaskResults:
    """All tasks of one run, with what is needed to reproduce it."""

    model: str
    tasks: dict[str, TaskResult]
    limit: int | None
    harness_version: str
    protocol: str = PROMPT_NOTE
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A Markdown table: one row per task, acc and acc_norm labelled (and ppl for cloze tasks)."""
        ppl = any(r.ppl is not None for r in self.tasks.values())
        lines = [
            "| task | n | acc | acc_norm |" + (" ppl |" if ppl else "") + " format |",
            "| --- | ---: | ---: | ---: |" + (" ---: |" if ppl else "") + " --- |",
        ]
        for name, r in self.tasks.items():
            cells = [name, str(r.n), f"{r.acc:.4f}", _fmt(r.acc_norm, ".4f")]
            cells += [_fmt(r.ppl, ".2f")] if ppl else []
            lines.append("| " + " | ".join([*cells, r.format]) + " |")
        return "\n".join(lines)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


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
        raise LlmpError(f"`--data-dir` {data_dir} is not a folder")
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


def evaluate_tasks(
    model,
    tokenizer,
    tasks: list[str],
    data_dir: str | Path | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    model_name: str = "",
) -> TaskResults:
    """Zero-shot accuracies of ``model`` on ``tasks`` through lm-evaluation-harness.

    Args:
        model: a Hugging Face causal LM (pruned ones included).
        tokenizer: its tokenizer.
        tasks: task names; offline, any name with a file in ``data_dir``.
        data_dir: folder of local task files; ``None`` uses the harness's tasks and the hub.
        limit: score only the first ``limit`` items of every task.
        batch_size: sequences per forward pass.
        model_name: recorded in the results.

    Raises:
        LlmpError: bad arguments, missing or invalid task files, or hub data out of reach.
    """
    check_task_args(tasks, limit, batch_size)
    with _quiet_harness():
        if data_dir is not None:
            local = {name: load_local_task(name, data_dir, limit) for name in tasks}
            task_dict = {name: _harness_task(name, records, fmt) for name, (records, _, fmt) in local.items()}
        else:
            local, task_dict = {}, _hub_tasks(tasks)
        results = _run(model, tokenizer, task_dict, limit, batch_size)
    out = {}
    for name in tasks:
        scores = results["results"][name]
        source, fmt = local[name][1:] if name in local else (_hub_source(task_dict[name]), "harness")
        n = int(results["n-samples"][name]["effective"])
        acc, acc_norm = scores["acc,none"], _number(scores.get("acc_norm,none"))
        out[name] = TaskResult(
            acc=acc,
            acc_norm=acc_norm,
            n=n,
            source=source,
            format=fmt,
            acc_stderr=_binomial_stderr(acc, n),
            acc_norm_stderr=_binomial_stderr(acc_norm, n),
            ppl=_number(scores.get("perplexity,none")),
        )
    return TaskResults(model_name, out, limit, harness_version())


def check_task_args(tasks: list[str], limit: int | None, batch_size: int) -> None:
    """Raise one :class:`LlmpError` for every bad argument of :func:`evaluate_tasks`."""
    problems = []
    if not tasks:
        problems.append("`tasks` is empty; name at least one task, e.g. piqa,arc_easy")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        problems.append(f"`limit` must be a positive number of items; got {limit!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"`batch_size` must be a whole number, at least 1; got {batch_size!r}")
    if problems:
        raise LlmpError("; ".join(problems))


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) else None


def _binomial_stderr(p: float | None, n: int) -> float | None:
    """The harness's ``mean_stderr`` of 0/1 scores with mean ``p``: sample std (n - 1) / sqrt(n)."""
    return None if p is None or n < 2 else math.sqrt(p * (1 - p) / (n - 1))


def _harness_task(name: str, records: list[dict], fmt: str):
    import datasets
    from lm_eval.api.task import ConfigurableTask

    dataset = datasets.Dataset.from_list(records)
    if fmt == "lambada":  # the harness's lambada_openai task, on local records
        kind = {"output_type": "loglikelihood", "doc_to_target": "target"}
        metric = [
            {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
            {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
        ]
    else:
        kind = {"output_type": "multiple_choice", "doc_to_choice": "choices", "doc_to_target": "gold"}
        metric = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    config = {
        "task": name,
        "custom_dataset": lambda **_: {"test": dataset},
        "test_split": "test",
        "doc_to_text": "query",
        "target_delimiter": " ",
        "metric_list": metric,
        "metadata": {"version": 1.0},
        **kind,
    }
    return ConfigurableTask(config=config)


def _hub_tasks(names: list[str]) -> dict:
    from lm_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager()
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        raise LlmpError(
            f"`tasks` {unknown} are not lm-evaluation-harness task names; give harness names "
            "(e.g. piqa, arc_easy) or pass --data-dir with local files for other names"
        )
    try:
        return get_task_dict(names, manager)
    except Exception as err:  # the hub raises connection, HTTP and datasets errors alike
        raise LlmpError(
            f"cannot load {names} from the dataset hub ({type(err).__name__}: {str(err)[:200]}); "
            "offline, pass --data-dir with local task files"
        ) from err


def _hub_source(task) -> str:
    config = task.config
    return f"hub:{config.dataset_path}" + (f"/{config.dataset_name}" if config.dataset_name else "")


def _run(model, tokenizer, task_dict: dict, limit: int | None, batch_size: int) -> dict:
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM

    was_training = model.training
    model.eval()
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        # No bootstrapping: it starts a process pool for 100,000 resamples of LAMBADA's perplexity
        # (seconds); the accuracies' standard errors are closed-form (see _binomial_stderr).
        return evaluate(lm, task_dict, limit=limit, bootstrap_iters=0, log_samples=False)
    finally:
        model.train(was_training)


@contextmanager
def _quiet_harness():
    """The harness logs every request batch and warns about passing a model object: keep it to errors."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    if not logging.getLogger().isEnabledFor(logging.INFO):
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
