"""Layer-by-layer pruning for the activation criteria, in memory or streamed from disk.

The calibration tokens go through the embeddings once; their hidden states enter decoder layer 0.
Each layer then in turn: runs on its inputs while its output projections' input statistics are
recorded (:mod:`llmp.importance.activations`), is scored, loses its planned elements, is compensated, and
runs again, pruned, so that its output (the next layer's input) is the pruned model's, as in
SparseGPT and FLAP. Only one layer's activations and statistics exist at a time.

``ranking="layer"`` needs one pass: how many elements each group loses follows from the sizes and
the target alone (:func:`llmp.plan.layer_counts`). ``ranking="global"`` needs two: the first
scores every layer (on the dense model's activations, nothing removed), the plan is made over all
of them, and the second applies it layer by layer with compensation from the pruned activations.

Streamed (:func:`llmp.pruning.streamed.prune_streamed`), the model is a skeleton on the ``meta`` device: the embeddings,
final norm and head are read first, each layer's weights are read from the safetensors files when
its turn comes and written out, pruned, as their own shard before the next is read. Memory is one
layer's weights plus the calibration activations, whatever the depth.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from llmp import surgery
from llmp.importance import activations
from llmp.plan import PlanSettings, choose, groups_element_parameters, layer_counts, make_plan
from llmp.pruning import compensation
from llmp.pruning.config import PruneConfig, layer_ranges
from llmp.pruning.steps import (
    Budget,
    RunInput,
    Start,
    Timings,
    declare_biases,
    note_biases,
    run_record,
    step_record,
)
from llmp.record import PruningRecord
from llmp.structure import Structure, adapter_for


def layer_inputs(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int | None, dtype: torch.dtype) -> list:
    """Per calibration batch, ``(hidden_states, args, kwargs)`` as the model passes them to layer 0.

    The rest of the call (rotary embeddings, masks, position ids) is reused for every layer.
    """
    layers = adapter_for(model).layers(model)
    seen = []

    def grab(_module, args, kwargs):
        seen.append((args, kwargs))
        raise activations.Stop  # nothing after layer 0's inputs is needed

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            activations.run_batches(model, calibration, batch_size)
    finally:
        handle.remove()
    inputs = []
    for args, kwargs in seen:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append((_cast(hidden, dtype), _cast(tuple(args[1:]), dtype), _cast(kwargs, dtype)))
    return inputs


def _cast(value, dtype: torch.dtype):
    return _tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _tensors(value, fn):
    """``value`` (a layer call's arguments: tensors in tuples, lists and dicts) with ``fn`` applied to each tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _tensors(v, fn) for k, v in value.items()}
    return value


NEXT_TOKENS = 512
"""Tokens per forward when a pruned layer computes the next layer's inputs: its activations
(an MLP's four intermediate-wide tensors, attention's expanded keys and values) for a quarter of
the default 16 × 128 calibration at a time, whatever the batch; samples are independent rows, so
the outputs are the same (``tests/test_activations.py``)."""


@torch.no_grad()
def _run(layer: nn.Module, inputs: list, whole: bool = False) -> list:
    """The next layer's inputs: this layer's hidden states for every batch, with the same rest.

    ``whole``: each batch in one forward, as recorded statistics must see it (their float32 sums
    are per forward: another split would move their last bits)."""
    outputs = []
    for hidden, args, kwargs in inputs:
        rows = len(hidden) if whole else max(1, NEXT_TOKENS // max(hidden.shape[1], 1))
        parts = []
        for start in range(0, hidden.shape[0], rows):
            cut = slice(start, start + rows)
            out = layer(hidden[cut], *_samples(args, cut, len(hidden)), **_samples(kwargs, cut, len(hidden)))
            parts.append(out[0] if isinstance(out, tuple) else out)
        outputs.append((torch.cat(parts) if len(parts) > 1 else parts[0], args, kwargs))
    return outputs


def _samples(value, cut: slice, batch: int):
    """``value`` (a layer call's arguments) for the samples ``cut``: a tensor of two or more dims
    whose first is the batch's is per sample (a ``[B, 1, L, L]`` mask); the rest (``[1, L, D]``
    rotary tables, ``[1, L]`` positions) is shared."""
    per_sample = batch > 1
    return _tensors(value, lambda t: t[cut] if per_sample and t.dim() >= 2 and t.shape[0] == batch else t)


class Layers:
    """Where a layer's weights live: in memory (nothing to do) or on disk
    (:class:`llmp.pruning.streamed.StreamedLayers`)."""

    visits_all = False
    """Every layer must be loaded and released, those after the last pruned one too (to be written)."""

    def load(self, i: int) -> None:
        """Make layer ``i``'s weights real."""

    def release(self, i: int, final: bool = True) -> None:
        """Layer ``i`` is done: pruned and run (``final``), or only scored (first pass of global ranking)."""


def prune_layerwise(
    model: PreTrainedModel,
    config: PruneConfig,
    calibration: torch.Tensor,
    layers_io: Layers | None = None,
    agree: Callable[[dict[str, list[int]]], dict[str, list[int]]] | None = None,
    reference_params: int | None = None,
    given: RunInput | None = None,
) -> PruningRecord:
    """Prune ``model`` one decoder layer at a time (see the module docstring); ``config`` resolved
    by :func:`llmp.pruning.preflight`, with an activation criterion.

    ``agree`` receives the plan before it is applied (global ranking: the whole plan; layer
    ranking: each layer's part) and returns the plan to apply (distributed callers broadcast);
    ``reference_params`` and ``given`` as in :func:`llmp.prune`.

    Raises:
        LlmpError: no calibration tokens.
    """
    activations.require_calibration(calibration)
    run = _Pass(model, config, layers_io or Layers(), agree)
    start = Start.of(model)
    budget, timings = Budget.of(start, reference_params), Timings()
    target = budget.step_target(model, config.ratio)
    with timings.phase("planning_s"):
        plan = run.global_plan(calibration, target) if config.ranking == "global" else None
        counts = None if plan is not None else layer_counts(run.groups, run.params, target, run.settings)
    inputs = layer_inputs(model, calibration, config.batch_size, run.compute)
    applied: dict[str, list[int]] = {}
    biases: list[str] = []
    for i, layer in enumerate(run.layers):
        if i > run.last and not run.io.visits_all:
            break  # the layers after the last pruned one need nothing
        run.io.load(i)
        with _computing(layer, run.compute):
            mine = [g for g in run.groups if g.layer == i]
            if mine:  # its statistics and refits are gone before the next inputs are computed
                mine_plan, gained = run.prune_layer(Structure(run.family, mine), inputs, plan, counts, timings)
                biases += gained
                applied.update(mine_plan)
            if i < run.last:
                inputs = _run(layer, inputs)  # the next layer's inputs, from this pruned layer
        run.io.release(i)
    biases += declare_biases(model, run.adapter, config)  # after the last layer: its groups knew no such biases
    step = step_record(model, config, applied, budget.total, 1, timings.seconds, biases)
    return run_record(model, config, start, [step], timings, given)


class _Pass:
    """What one layer-by-layer run knows of its model: the groups in range, their sizes and the
    modules whose inputs score them, and where the layers' weights live."""

    def __init__(self, model: PreTrainedModel, config: PruneConfig, io: Layers, agree) -> None:
        self.model, self.config, self.io, self.agree = model, config, io, agree
        self.adapter = adapter_for(model)
        self.layers = self.adapter.layers(model)
        ranges = layer_ranges(config, len(self.layers))
        structure = self.adapter.discover(model, config.kinds)
        self.family = structure.family
        self.groups = [g for g in structure.groups if g.layer in ranges[g.kind]]
        self.params = groups_element_parameters(self.groups, model)
        self.settings = PlanSettings(config.ranking, config.min_keep, config.round_to)
        self.owners = activations.projections(Structure(self.family, self.groups))
        self.last = max((g.layer for g in self.groups), default=-1)
        embeddings = model.get_input_embeddings().weight
        self.compute = torch.float32 if embeddings.device.type == "cpu" else embeddings.dtype

    def _agreed(self, plan: dict[str, list[int]]) -> dict[str, list[int]]:
        return self.agree(plan) if self.agree is not None else plan

    def global_plan(self, calibration: torch.Tensor, target: int) -> dict[str, list[int]]:
        """Pass 1 of global ranking: every layer scored on the dense activations, one plan over all."""
        scores, inputs = {}, layer_inputs(self.model, calibration, self.config.batch_size, self.compute)
        for i, layer in enumerate(self.layers[: self.last + 1]):
            self.io.load(i)
            mine = [g for g in self.groups if g.layer == i]
            with _computing(layer, self.compute), activations.recording(self.model, self._owners(mine)) as stats:
                inputs = _run(layer, inputs)
            scores.update(activations.score(self.model, Structure(self.family, mine), stats, self.config.criterion))
            self.io.release(i, final=False)
        return self._agreed(make_plan(self.groups, scores, self.params, target, self.settings))

    def prune_layer(self, part: Structure, inputs: list, plan, counts, timings: Timings) -> tuple[dict, list[str]]:
        """Score, plan, compensate and cut one layer's groups ``part``; returns its plan and the
        modules that gained a bias."""
        config = self.config
        with timings.phase("scoring_s"):
            stats, mine_plan = self.layer_plan(part, inputs, plan, counts)
        with timings.phase("surgery_s"):
            refits = compensation.compensation(self.model, part, mine_plan, stats, config.compensate, config.ridge)
            surgery.apply(self.model, part, mine_plan, self.adapter)
            gained = compensation.install(self.model, refits)
            return mine_plan, note_biases(self.model, self.adapter, gained, config, declare=False)

    def layer_plan(self, part: Structure, inputs: list, plan, counts) -> tuple[dict, dict[str, list[int]]]:
        """This layer's input statistics (where scoring or compensation needs them) and its plan:
        its part of the global ``plan``, or its lowest-scored elements by ``counts``."""
        stats = {}
        if plan is None or self.config.compensate != "none":
            gram = self.config.compensate == "lstsq"
            with activations.recording(self.model, self._owners(part.groups), gram) as stats:
                _run(self.adapter.layers(self.model)[part.groups[0].layer], inputs, whole=True)
        if plan is None:
            scores = activations.score(self.model, part, stats, self.config.criterion)
            mine = self._agreed({g.name: choose(g, scores[g.name], counts.get(g.name, 0)) for g in part.groups})
        else:
            mine = {g.name: plan.get(g.name, []) for g in part.groups}
        return stats, {k: v for k, v in mine.items() if v}

    def _owners(self, groups) -> list[str]:
        return [self.owners[g.name] for g in groups]


@contextmanager
def _computing(layer: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run a layer in ``dtype`` (float32 on CPU) and give its weights back their own dtype after."""
    stored = {p.dtype for p in layer.parameters() if p.is_floating_point()}
    if stored != {dtype}:
        layer.to(dtype)
    try:
        yield
    finally:
        if len(stored) == 1 and stored != {dtype}:
            layer.to(next(iter(stored)))
