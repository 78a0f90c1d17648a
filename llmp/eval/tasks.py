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

Online (no ``data_dir``) the harness's own task definitions and hub data are used; offline the
task files are read by :mod:`llmp.eval.task_files` (its docstring lists the formats).

Example::

    model, tokenizer = llmp.load_model("smollm2-135m")
    results = evaluate_tasks(model, tokenizer, ["piqa", "arc_easy"], "data/zeroshot", limit=200)
    results.tasks["piqa"].acc_norm
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from llmp.errors import LlmpError
from llmp.eval.task_files import load_local_task

PROMPT_NOTE = (
    "zero-shot; acc = argmax of summed log-likelihood of ' ' + choice after the prompt, "
    "acc_norm = argmax of log-likelihood / len(choice) in characters (lm-evaluation-harness definitions)"
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
