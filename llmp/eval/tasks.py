"""Zero-shot multiple-choice tasks through lm-evaluation-harness, online or from local files.

The harness scores every task here the same way: each choice is a continuation of the prompt,
its log-likelihood is the sum of its tokens' log-probabilities, and

- ``acc`` is right when the gold choice has the highest log-likelihood;
- ``acc_norm`` is right when it has the highest log-likelihood divided by the continuation's
  length in characters (the harness's definition; it writes ``len(choice)``).

Online (no ``data_dir``) the harness's own task definitions and hub data are used. Offline the
files of a task are read, turned into ``{query, choices, gold}`` records with the harness's
prompts, and handed to the harness as a task whose prompt is ``query + " " + choice``:

============  ===============================================  ==================================
format        file (in ``DIR/<task>/`` or ``DIR/<task>.jsonl``)  prompt
============  ===============================================  ==================================
piqa          ``*valid.jsonl`` + ``*valid-labels.lst``         ``Question: {goal}\\nAnswer:``
boolq         ``{question, passage, answer}`` (dev)            ``{passage}\\nQuestion: {question}?\\nAnswer:``
obqa          ``{question: {stem, choices}, answerKey}``       ``{stem}`` (``*Main_test*`` first)
mc            ``{query, choices, gold}`` (llm-foundry)          ``{query}``, plus ``\\nAnswer:`` for
                                                               piqa, boolq, arc_easy, arc_challenge
============  ===============================================  ==================================

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
FORMATS = ("piqa", "boolq", "obqa", "mc")  # preference order: the originals give the harness prompt


@dataclass
class TaskResult:
    """Scores of one task.

    Attributes:
        acc: accuracy by summed log-likelihood.
        acc_norm: accuracy by log-likelihood per character of the continuation.
        n: items scored.
        source: the file read, or ``hub:<dataset>`` online.
        format: ``piqa``, ``boolq``, ``obqa``, ``mc`` (local) or ``harness`` (online).
        acc_stderr: standard error of ``acc`` (sample standard deviation / sqrt(n)).
        acc_norm_stderr: the same for ``acc_norm``.
    """

    acc: float
    acc_norm: float | None
    n: int
    source: str
    format: str
    acc_stderr: float | None = None
    acc_norm_stderr: float | None = None


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

    @classmethod
    def from_dict(cls, data: dict) -> TaskResults:
        tasks = {name: TaskResult(**result) for name, result in data["tasks"].items()}
        return cls(**{**data, "tasks": tasks})

    def table(self) -> str:
        """A Markdown table: one row per task, acc and acc_norm labelled."""
        lines = ["| task | n | acc | acc_norm | format |", "| --- | ---: | ---: | ---: | --- |"]
        for name, r in self.tasks.items():
            norm = "n/a" if r.acc_norm is None else f"{r.acc_norm:.4f}"
            lines.append(f"| {name} | {r.n} | {r.acc:.4f} | {norm} | {r.format} |")
        return "\n".join(lines)


def harness_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def find_task_file(name: str, data_dir: str | Path) -> tuple[Path, str]:
    """The file of task ``name`` in ``data_dir`` and its format (see the module docstring).

    An original format wins over ``mc`` (it gives the harness's exact prompt); among files of one
    format, a name with ``test`` in it wins (OpenBookQA's ``Main_test``, the harness's split).

    Raises:
        LlmpError: ``data_dir`` is not a folder, or no readable file for the task is in it.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LlmpError(f"`--data-dir` {data_dir} is not a folder")
    candidates = []
    for folder in (data_dir / name, data_dir / ALIASES.get(name, name)):
        candidates += sorted(folder.glob("*.jsonl")) if folder.is_dir() else []
    candidates += [p for p in (data_dir / f"{name}.jsonl",) if p.is_file()]
    found = [(path, fmt) for path in dict.fromkeys(candidates) if (fmt := _sniff(path)) is not None]
    if not found:
        raise LlmpError(
            f"no file for task `{name}` in {data_dir}: expected {data_dir / name}/*.jsonl (or {name}.jsonl) "
            "holding {query, choices, gold} records or the original PIQA, BoolQ or OpenBookQA files"
        )
    return min(found, key=lambda pf: (FORMATS.index(pf[1]), "test" not in pf[0].name, pf[0].name))


def load_local_task(name: str, data_dir: str | Path, limit: int | None = None) -> tuple[list[dict], str, str]:
    """Read task ``name`` from ``data_dir`` as ``(records, source file, format)``.

    Records are ``{"query", "choices", "gold"}`` in the harness's prompt (see the module docstring);
    ``limit`` keeps the first records.

    Raises:
        LlmpError: no readable file for the task, or records that are not valid.
    """
    path, fmt = find_task_file(name, data_dir)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if limit is not None and len(rows) == limit:
            break
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise LlmpError(f"{path} line {number} is not JSON ({err}); one JSON object per line") from err
    try:
        records = _READERS[fmt](rows, path, name)
    except LlmpError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise LlmpError(f"{path}: a record lacks a field of the {fmt} format ({type(err).__name__}: {err})") from err
    _check(records, path)
    return records, str(path), fmt


def _sniff(path: Path) -> str | None:
    with path.open() as f:
        try:
            first = json.loads(f.readline())
        except json.JSONDecodeError:
            return None
    if not isinstance(first, dict):
        return None
    if {"query", "choices", "gold"} <= set(first):
        return "mc"
    if {"goal", "sol1", "sol2"} <= set(first) and _labels_file(path).is_file():
        return "piqa"
    if {"question", "passage", "answer"} <= set(first):
        return "boolq"
    if isinstance(first.get("question"), dict) and "answerKey" in first:
        return "obqa"
    return None


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


_READERS = {"piqa": _read_piqa, "boolq": _read_boolq, "obqa": _read_obqa, "mc": _read_mc}


def _check(records: list[dict], path: Path) -> None:
    bad = [
        i + 1
        for i, r in enumerate(records)
        if not isinstance(r["choices"], list)
        or len(r["choices"]) < 2
        or not all(isinstance(c, str) and c for c in r["choices"])
        or not isinstance(r["gold"], int)
        or not 0 <= r["gold"] < len(r["choices"])
    ]
    if not records:
        raise LlmpError(f"{path} holds no records")
    if bad:
        raise LlmpError(
            f"{path}: line(s) {bad[:5]} need `choices` as a list of 2+ non-empty strings and `gold` as a "
            "0-based index into them"
        )


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
    if not tasks:
        raise LlmpError("`tasks` is empty; name at least one task, e.g. piqa,arc_easy")
    if limit is not None and limit < 1:
        raise LlmpError(f"`limit` must be a positive number of items; got {limit}")
    if batch_size < 1:
        raise LlmpError(f"`batch_size` must be at least 1; got {batch_size}")
    with _quiet_harness():
        if data_dir is not None:
            local = {name: load_local_task(name, data_dir, limit) for name in tasks}
            task_dict = {name: _harness_task(name, records) for name, (records, _, _) in local.items()}
        else:
            local, task_dict = {}, _hub_tasks(tasks)
        results = _run(model, tokenizer, task_dict, limit, batch_size)
    out = {}
    for name in tasks:
        scores = results["results"][name]
        source, fmt = local[name][1:] if name in local else (_hub_source(task_dict[name]), "harness")
        out[name] = TaskResult(
            acc=scores["acc,none"],
            acc_norm=scores.get("acc_norm,none"),
            n=int(results["n-samples"][name]["effective"]),
            source=source,
            format=fmt,
            acc_stderr=_number(scores.get("acc_stderr,none")),
            acc_norm_stderr=_number(scores.get("acc_norm_stderr,none")),
        )
    return TaskResults(model_name, out, limit, harness_version())


def _number(value) -> float | None:
    return value if isinstance(value, (int, float)) else None


def _harness_task(name: str, records: list[dict]):
    import datasets
    from lm_eval.api.task import ConfigurableTask

    dataset = datasets.Dataset.from_list(records)
    metric = [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")]
    config = {
        "task": name,
        "custom_dataset": lambda **_: {"test": dataset},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "query",
        "doc_to_choice": "choices",
        "doc_to_target": "gold",
        "target_delimiter": " ",
        "metric_list": metric,
        "metadata": {"version": 1.0},
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
        return evaluate(lm, task_dict, limit=limit, log_samples=False)
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
