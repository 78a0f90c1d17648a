"""What every driver shares: the removal target of a step, its timings, the record of it, the
biases compensation added, and replaying recorded steps without scoring."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch
from transformers import PreTrainedModel

from llmp.pruning.config import PruneConfig
from llmp.record import Allocation, Calibration, PruningRecord, Step
from llmp.structure import Kind, adapter_for
from llmp.structure.adapters.base import BIASES_KEY
from llmp.surgery import apply


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass(frozen=True)
class RunInput:
    """What a run was given, as its record keeps it.

    Attributes:
        model: the model as the user named it (a folder, built-in name or hub id).
        calibration: the calibration text's source and size (``None``: the criterion reads none).
        load_s: seconds the caller spent loading the model (kept with the run's timings).
    """

    model: str | None = None
    calibration: Calibration | None = None
    load_s: float | None = None


@dataclass(frozen=True)
class Start:
    """A model as a driver found it: its parameters, per-layer counts and the clock."""

    params: int
    shapes: list[dict[str, int]]
    time: float

    @classmethod
    def of(cls, model: torch.nn.Module) -> Start:
        return cls(count_parameters(model), adapter_for(model).layer_shapes(model), time.perf_counter())


@dataclass
class Budget:
    """Parameters to remove, as fractions of a reference size.

    ``ratio`` is of ``reference`` (the original model's size, for an iterative schedule that
    already pruned ``reference - total``); step ``k`` of ``steps`` removes what brings the
    cumulative removal to ``already + (goal - already) · k / steps``.
    """

    total: int  # the model's parameters now
    reference: int

    @classmethod
    def of(cls, start: Start, reference_params: int | None) -> Budget:
        return cls(start.params, start.params if reference_params is None else reference_params)

    def step_target(self, model: torch.nn.Module, ratio: float, step: int = 1, steps: int = 1) -> int:
        """Parameters that step ``step`` of ``steps`` removes from ``model`` as it is now."""
        already, goal = self.reference - self.total, ratio * self.reference
        cumulative = round(already + (goal - already) * step / steps)
        return cumulative - (self.reference - count_parameters(model))


@dataclass
class Timings:
    """Seconds spent per phase, summed over steps or layers."""

    seconds: dict[str, float] = field(default_factory=lambda: {"scoring_s": 0.0, "planning_s": 0.0, "surgery_s": 0.0})

    @contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self.seconds.items()}


def step_record(model, config: PruneConfig, plan, before: int, step: int, seconds: dict, biases: list[str]) -> Step:
    """The :class:`Step` of ``plan`` just applied to ``model`` (``before``: its parameters before)."""
    return Step(
        kinds=[str(k) for k in config.kinds],
        plan={name: [int(e) for e in v] for name, v in plan.items() if len(v)},
        params_before=before,
        params_after=count_parameters(model),
        step=step,
        removed={name: len(v) for name, v in plan.items()},
        layer_shapes=adapter_for(model).layer_shapes(model),
        timings={k: round(v, 4) for k, v in seconds.items()},
        biases=biases or None,
    )


def run_record(
    model, config: PruneConfig, start: Start, steps: list[Step], timings: Timings, given: RunInput | None
) -> PruningRecord:
    """The :class:`PruningRecord` of ``steps`` taking ``model`` from ``start`` to its size now:
    the one place a driver's record is made (evaluation and saving add their own fields)."""
    adapter, given = adapter_for(model), given or RunInput()
    seconds = timings.rounded()
    if given.load_s is not None:
        seconds["load_s"] = round(given.load_s, 3)
    seconds["prune_s"] = round(time.perf_counter() - start.time, 3)
    return PruningRecord(
        family=adapter.family,
        params_before=start.params,
        params_after=count_parameters(model),
        layer_shapes=adapter.layer_shapes(model),
        model=given.model,
        settings=asdict(config),
        dense_layer_shapes=start.shapes,
        hidden_size=model.config.hidden_size,
        num_layers=len(adapter.layers(model)),
        steps=steps,
        timings=seconds,
        calibration=given.calibration,
    )


def unpruned_record(model, given: RunInput) -> PruningRecord:
    """The record of ``model`` before any step (a fit's schedule starts here and adds its steps)."""
    start = Start.of(model)
    record = run_record(model, PruneConfig(), start, [], Timings(), given)
    return dataclasses.replace(record, settings={}, timings={})


def note_biases(
    model: PreTrainedModel, adapter, gained: list[str], config: PruneConfig, declare: bool = True
) -> list[str]:
    """Record in the model's config which layer modules compensation gave a bias (the loader
    rebuilds them); with ``declare``, a uniform model also gets them declared (:func:`declare_biases`).

    Returns every module that gained a bias, declared zeros included (what :func:`replay` re-adds).
    """
    if not gained:
        return []
    _remember_biases(model, adapter, gained)
    return sorted(set(gained) | set(declare_biases(model, adapter, config) if declare else ()))


def _remember_biases(model: PreTrainedModel, adapter, modules: Iterable[str]) -> None:
    """Add ``modules`` (full names) to the config's :data:`BIASES_KEY`, as names inside a layer."""
    prefix = adapter.layers_path + "."
    names = {name.removeprefix(prefix).partition(".")[2] for name in modules}
    setattr(model.config, BIASES_KEY, sorted(names | set(getattr(model.config, BIASES_KEY, None) or ())))


def declare_biases(model: PreTrainedModel, adapter, config: PruneConfig) -> list[str]:
    """A uniform model's compensation biases, declared the plain-transformers way (zero biases
    beside them, see :meth:`Adapter.plain_biases`); returns the modules given a zero bias."""
    if config.layout != "uniform" or not getattr(model.config, BIASES_KEY, None):
        return []
    before = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    adapter.plain_biases(model)
    after = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    return sorted(after - before)


def replay(model: PreTrainedModel, steps: Iterable[Step]) -> None:
    """Repeat recorded pruning steps (a :class:`PruningRecord`'s ``steps``) on ``model``, without scoring.

    ``model`` must be the model the steps were first applied to (same original shapes): this is
    how a checkpoint's pruned shapes are rebuilt before its weights are loaded.

    Raises:
        LlmpError: a step names groups the model does not have (another model, or another order).
    """
    adapter = adapter_for(model)
    for step in steps:
        structure = adapter.discover(model, tuple(Kind(k) for k in step.kinds))
        plan = {name: list(v) for name, v in step.plan.items()}
        apply(model, structure, plan, adapter)
        for name in step.biases or ():  # compensation's biases: their values come with the weights
            module = model.get_submodule(name)
            if module.bias is None:
                module.bias = torch.nn.Parameter(module.weight.new_zeros(module.out_features))
        _remember_biases(model, adapter, step.biases or ())


def allocation_record(chosen) -> Allocation | None:
    """The record of an allocation (:class:`llmp.allocation.Chosen`; ``None``: none was made)."""
    if chosen is None:
        return None
    found = chosen.search
    if found is None:
        return Allocation(chosen.rule, dict(chosen.counts))
    return Allocation(
        chosen.rule,
        dict(chosen.counts),
        found.fitness,
        found.seed,
        round(found.seed_fitness, 6),
        found.generations,
        found.evaluated,
        found.seconds,
    )
