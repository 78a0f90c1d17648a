"""The record of a pruning run: what was removed, from what, and how it went afterwards.

One schema for every place a run is written down: a model folder's ``pruning_report.json``,
the ``llmp`` entry of a Lightning checkpoint, and the input of :func:`llmp.pruning.replay`::

    PruningRecord                       what llmp prune / llmp fit / RecoveryModule record
    ├─ model, family, settings          the input, and what was asked (a PruneConfig as a dict)
    ├─ params_before / params_after     of the original model, and now
    ├─ dense_layer_shapes, layer_shapes per-layer heads / KV heads / MLP channels, before and now
    ├─ steps: [Step]                    each step's kinds and plan: enough to repeat it (replay)
    ├─ calibration, schedule, timings
    └─ perplexity, recovery, generations    added by evaluation and recovery

Reading checks every field (types, nesting, no unknown key) and says which key is wrong;
``schema`` is the version of this layout. Folders written before it existed (no ``schema``)
read the same way: their keys are the ones above.

Example::

    record = read_record("out/p20")
    record.achieved_ratio, record.steps[0].plan
    record.perplexity = Perplexity(data="wikitext2", dense=51.9, pruned=106.1)
    write_record("out/p20", record)
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError, with_config

from llmp.errors import LlmpError

SCHEMA = 4  # 2: `dtype`; 3: `Step.biases`; 4: `Step.allocation`
REPORT = "pruning_report.json"
Shape = dict[str, int]  # {"heads", "kv_heads", "mlp"} of one layer
_STRICT = ConfigDict(extra="forbid")


@with_config(_STRICT)
@dataclass
class Allocation:
    """How a step's counts per layer were chosen (:mod:`llmp.allocation`).

    Attributes:
        rule: uniform, depth, sensitivity or search.
        counts: group name → elements removed in each of its blocks.
        fitness: the search's best KL to the dense model after each generation.
        seed: the starting allocation the search chose (the better on its held-out samples).
        seed_fitness: the KL of the search's starting allocation.
        generations: generations run.
        evaluated: candidates scored.
        seconds: the search's time, its database included.
    """

    rule: str
    counts: dict[str, int]
    fitness: list[float] | None = None
    seed: str | None = None
    seed_fitness: float | None = None
    generations: int | None = None
    evaluated: int | None = None
    seconds: float | None = None


@with_config(_STRICT)
@dataclass
class Step:
    """One pruning step.

    Attributes:
        kinds: the structure kinds scored together (``mlp``, ``kv_groups`` ...).
        plan: group name → indices of the elements removed (groups with none are left out).
        params_before: the model's parameters before the step.
        params_after: and after it.
        step: 1-based number within its :func:`llmp.prune` call.
        removed: group name → count removed (every group discovered, zeros included).
        layer_shapes: per-layer counts after the step.
        timings: seconds spent scoring, planning and in surgery.
        epoch: the epoch whose start ran the step (pruning inside a fit).
        target_ratio: the cumulative fraction of the original parameters asked by then.
        biases: the modules to which compensation gave a bias in this step (``replay`` adds them).
        allocation: how many elements each layer lost, and how that was chosen.
        routing: MoE layers' expert groups → each original expert's share of the calibration
            tokens routed to it (summing to ``num_experts_per_tok``), measured before the removal.
    """

    kinds: list[str]
    plan: dict[str, list[int]]
    params_before: int
    params_after: int
    step: int = 1
    removed: dict[str, int] = field(default_factory=dict)
    layer_shapes: list[Shape] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    epoch: int | None = None
    target_ratio: float | None = None
    biases: list[str] | None = None
    allocation: Allocation | None = None
    routing: dict[str, list[float]] | None = None


@with_config(_STRICT)
@dataclass
class Calibration:
    """The calibration text: its source (a file, a built-in name or ``datamodule``) and size."""

    source: str
    num_samples: int
    seq_len: int


@with_config(_STRICT)
@dataclass
class Perplexity:
    """Perplexity of the dense, pruned and recovered models on ``data`` (any may be missing)."""

    data: str | None = None
    dense: float | None = None
    pruned: float | None = None
    recovered: float | None = None
    protocol: str | None = None


@with_config(_STRICT)
@dataclass
class Generations:
    """Greedy continuations of the same prompts by several models (``outputs``: label → texts)."""

    prompts: list[str]
    max_new_tokens: int
    outputs: dict[str, list[str]]


@with_config(_STRICT)
@dataclass
class Recovery:
    """How the pruned model was trained back (``llmp fit``), and how it ended.

    Attributes:
        mode: ``lora`` or ``full``.
        lora: the adapter's settings (LoRA mode).
        learning_rate: the peak learning rate.
        distill: the distillation settings (teacher, weight, top-k ...), if any.
        epochs: epochs completed.
        optimizer_steps: optimizer steps taken.
        world_size: processes that trained.
        strategy: the Lightning strategy's class name.
        precision: Lightning's precision setting.
        fit_s: seconds in ``trainer.fit``.
        val_ppl: the last validation perplexity.
    """

    mode: str
    lora: dict[str, Any] | None = None
    learning_rate: float | None = None
    distill: dict[str, Any] | None = None
    epochs: int | None = None
    optimizer_steps: int | None = None
    world_size: int | None = None
    strategy: str | None = None
    precision: str | None = None
    fit_s: float | None = None
    val_ppl: float | None = None


@with_config(_STRICT)
@dataclass
class PruningRecord:
    """A pruning run (one :func:`llmp.prune` call, or all steps of a fit), as saved.

    Attributes:
        family: the adapter family (``llama``, ``gpt2``, ``auto`` ...).
        params_before: parameters of the original model.
        params_after: parameters now.
        layer_shapes: per-layer counts now.
        model: the input model as given (a folder, built-in name or hub id).
        settings: the :class:`~llmp.PruneConfig` asked for, as a dict.
        dense_layer_shapes: per-layer counts of the original model.
        hidden_size: the model's hidden size now.
        num_layers: decoder layers now.
        steps: the steps applied to the original model, in order.
        timings: seconds, summed over the steps (and load / prune time of ``llmp prune``).
        calibration: the calibration text of the gradient criteria.
        schedule: epoch → cumulative ratio of a pruning schedule inside a fit.
        perplexity: dense → pruned → recovered perplexity.
        recovery: how the pruned model was trained back (shown as a table).
        generations: side-by-side greedy continuations.
        loads_with_plain_transformers: the folder's config holds the pruned counts.
        engines: where the saved model runs (llmp, transformers, llama.cpp and vLLM through ``llmp export``).
        dtype: the saved weights' dtype (``float32``, ``bfloat16`` ...).
        schema: the version of this layout.
    """

    family: str
    params_before: int
    params_after: int
    layer_shapes: list[Shape] = field(default_factory=list)
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    dense_layer_shapes: list[Shape] | None = None
    hidden_size: int | None = None
    num_layers: int | None = None
    steps: list[Step] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    calibration: Calibration | None = None
    schedule: dict[str, float] | None = None
    perplexity: Perplexity | None = None
    recovery: Recovery | None = None
    generations: Generations | None = None
    loads_with_plain_transformers: bool | None = None
    engines: list[str] | None = None
    dtype: str | None = None
    schema: int = SCHEMA

    @property
    def achieved_ratio(self) -> float:
        """Fraction of the original parameters removed."""
        return round(1 - self.params_after / self.params_before, 6) if self.params_before else 0.0

    def extend(self, other: PruningRecord) -> None:
        """Add the steps of a later :func:`llmp.prune` call on the same model (its timings summed)."""
        self.steps.extend(other.steps)
        self.params_after, self.layer_shapes = other.params_after, other.layer_shapes
        self.hidden_size, self.num_layers = other.hidden_size, other.num_layers
        for key, seconds in other.timings.items():
            self.timings[key] = round(self.timings.get(key, 0.0) + seconds, 4)

    def to_json(self) -> dict[str, Any]:
        """A JSON object: empty optional entries left out, ``achieved_ratio`` added for readers."""
        data = _plain(self)
        data["achieved_ratio"] = self.achieved_ratio
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "the pruning record") -> PruningRecord:
        """Read and check a :meth:`to_json` object.

        Raises:
            LlmpError: not an object, a newer schema, or a key of the wrong type or unknown,
                named with its path (``steps[0].plan``).
        """
        if not isinstance(data, dict):
            raise LlmpError(f"{source} holds a {type(data).__name__}, not a pruning report object")
        data = {k: v for k, v in data.items() if k != "achieved_ratio"}  # derived, not stored
        schema = data.get("schema", SCHEMA)
        if isinstance(schema, int) and schema > SCHEMA:
            raise LlmpError(
                f"{source} has schema {schema}, newer than this llmp reads ({SCHEMA}); upgrade llmp to read it"
            )
        return strict_read(_READER, data, source)


_READER = TypeAdapter(PruningRecord)


def strict_read(reader: TypeAdapter, data: Any, source: str) -> Any:
    """``data`` checked by ``reader``; every problem named by its key path (wrong values first).

    Raises:
        LlmpError: a key of the wrong type, missing or unknown (at most three named).
    """
    try:
        return reader.validate_python(data)
    except ValidationError as err:
        errors = sorted(err.errors(), key=lambda e: e["type"] == "missing")  # wrong values first
        problems = [_problem(e) for e in errors]
        more = f"; and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise LlmpError(
            f"{source}: " + "; ".join(problems[:3]) + more + "; it was edited or damaged: "
            "re-create it with `llmp prune` or `llmp fit`"
        ) from None


def read_record(folder: str | Path) -> PruningRecord:
    """The checked ``pruning_report.json`` of ``folder``.

    Raises:
        LlmpError: it is missing, not JSON, or not a valid record (the bad key named).
    """
    path = Path(folder) / REPORT
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: not JSON, or not UTF-8 text
        raise LlmpError(f"cannot read {path}: {err}; give a folder written by `llmp prune` or `llmp fit`") from err
    return PruningRecord.from_json(data, str(path))


def write_record(folder: str | Path, record: PruningRecord) -> Path:
    """Write ``record`` as ``folder``'s ``pruning_report.json``, atomically."""
    from llmp.outdir import write_json_atomic

    path = Path(folder) / REPORT
    write_json_atomic(path, record.to_json())
    return path


def _plain(value: Any) -> Any:
    """JSON data of a record's dataclasses; their unset (``None``) fields left out, free-form dicts kept whole."""
    if dataclasses.is_dataclass(value):
        fields = ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
        return {name: _plain(v) for name, v in fields if v is not None}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _problem(error: dict) -> str:
    got = "" if error["type"] == "missing" else f" (got {_short(error.get('input'))})"
    return f"`{_path(error['loc'])}`: {error['msg'].lower()}{got}"


def _path(loc: tuple) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
