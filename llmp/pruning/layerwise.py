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

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from llmp import surgery
from llmp.allocation import Chosen, allocate
from llmp.importance import activations
from llmp.plan import PlanSettings, choose, groups_element_parameters, make_plan
from llmp.pruning import compensation
from llmp.pruning.config import PruneConfig, layer_ranges
from llmp.pruning.layercalls import compute_dtype, computing, layer_inputs, run_layer
from llmp.pruning.steps import (
    Budget,
    RunInput,
    Start,
    Timings,
    allocation_record,
    declare_biases,
    note_biases,
    run_record,
    step_record,
)
from llmp.record import PruningRecord
from llmp.structure import Structure, adapter_for


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
        chosen = None if plan is not None else run.allocate(calibration, target)
        counts = chosen.counts if chosen is not None else None
    inputs = layer_inputs(model, calibration, config.batch_size, run.compute)
    applied: dict[str, list[int]] = {}
    biases: list[str] = []
    for i, layer in enumerate(run.layers):
        if i > run.last and not run.io.visits_all:
            break  # the layers after the last pruned one need nothing
        run.io.load(i)
        with computing(layer, run.compute):
            mine = [g for g in run.groups if g.layer == i]
            if mine:  # its statistics and refits are gone before the next inputs are computed
                mine_plan, gained = run.prune_layer(Structure(run.family, mine), inputs, plan, counts, timings)
                biases += gained
                applied.update(mine_plan)
            if i < run.last:
                inputs = run_layer(layer, inputs)  # the next layer's inputs, from this pruned layer
        run.io.release(i)
    biases += declare_biases(model, run.adapter, config)  # after the last layer: its groups knew no such biases
    step = step_record(model, config, applied, budget.total, 1, timings.seconds, biases)
    step.allocation = allocation_record(chosen)
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
        self.compute = compute_dtype(model)

    def allocate(self, calibration: torch.Tensor, target: int) -> Chosen:
        """Each group's count under ``config.allocation`` (what every rank then applies)."""
        part = Structure(self.family, self.groups)
        chosen = allocate(self.model, part, self.params, target, self.config, calibration, self.io)
        if self.agree is not None:  # the search's random moves and timing differ between ranks
            agreed = self.agree({name: [k] for name, k in chosen.counts.items()})
            chosen.counts = {name: k for name, (k,) in agreed.items()}
        return chosen

    def _agreed(self, plan: dict[str, list[int]]) -> dict[str, list[int]]:
        return self.agree(plan) if self.agree is not None else plan

    def global_plan(self, calibration: torch.Tensor, target: int) -> dict[str, list[int]]:
        """Pass 1 of global ranking: every layer scored on the dense activations, one plan over all."""
        scores, inputs = {}, layer_inputs(self.model, calibration, self.config.batch_size, self.compute)
        for i, layer in enumerate(self.layers[: self.last + 1]):
            self.io.load(i)
            mine = [g for g in self.groups if g.layer == i]
            with computing(layer, self.compute), activations.recording(self.model, self._owners(mine)) as stats:
                inputs = run_layer(layer, inputs)
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
                run_layer(self.adapter.layers(self.model)[part.groups[0].layer], inputs, whole=True)
        if plan is None:
            scores = activations.score(self.model, part, stats, self.config.criterion)
            mine = self._agreed({g.name: choose(g, scores[g.name], counts.get(g.name, 0)) for g in part.groups})
        else:
            mine = {g.name: plan.get(g.name, []) for g in part.groups}
        return stats, {k: v for k, v in mine.items() if v}

    def _owners(self, groups) -> list[str]:
        return [self.owners[g.name] for g in groups]
