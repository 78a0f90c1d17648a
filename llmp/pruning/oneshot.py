"""``prune``: the library call. Discover → score → plan → apply, in one or more steps, in memory.

Example::

    model, tokenizer = llmp.load_model("smollm2-135m")
    calib = llmp.data.calibration_samples("c4.jsonl", tokenizer, 10, 64)
    record = llmp.prune(model, PruneConfig(ratio=0.2), calib)
    record.achieved_ratio  # 0.2003

The activation criteria in one step go layer by layer (:mod:`llmp.pruning.layerwise`); every other
setting scores the whole model at once per step, here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import asdict

import torch
from transformers import PreTrainedModel

from llmp import importance, surgery
from llmp.allocation import weights_for
from llmp.importance import activations
from llmp.plan import PlanSettings, groups_element_parameters, make_plan
from llmp.pruning import compensation
from llmp.pruning.config import PruneConfig, layer_ranges
from llmp.pruning.experts import prune_experts
from llmp.pruning.layerwise import prune_layerwise
from llmp.pruning.preflight import preflight
from llmp.pruning.steps import (
    Budget,
    RunInput,
    Start,
    Timings,
    count_parameters,
    note_biases,
    run_record,
    step_record,
)
from llmp.record import PruningRecord
from llmp.structure import Group, Kind, Structure, adapter_for

Agree = Callable[[dict[str, list[int]]], dict[str, list[int]]]


def prune(
    model: PreTrainedModel,
    config: PruneConfig,
    calibration: torch.Tensor | None = None,
    agree: Agree | None = None,
    reference_params: int | None = None,
    given: RunInput | None = None,
) -> PruningRecord:
    """Prune ``model`` in place and return the record of it (settings, counts, shapes, timings).

    Each of ``record.steps`` holds its ``plan`` and ``kinds``: :func:`llmp.pruning.replay` repeats them.

    Args:
        model: the causal LM, pruned in place.
        config: what to remove.
        calibration: ``[N, L]`` token ids for the criteria that need calibration text.
        agree: called with each plan before it is applied; returns the plan to apply.
            Distributed callers broadcast rank 0's plan here so every rank removes the same.
        reference_params: the size ``config.ratio`` is a fraction of (default: ``model``'s own).
            An iterative schedule passes the original model's, so the ratio stays "of the
            original", and only what is still missing is removed.
        given: what the record keeps of the run's input (model name, calibration source, load time).

    Raises:
        LlmpError: as :func:`llmp.pruning.preflight`, or no calibration for a criterion that needs it.
    """
    config = preflight(model, config)
    if config.moe:
        return _experts_first(model, config, calibration, agree, given)
    if config.layerwise:
        return prune_layerwise(model, config, calibration, agree=agree, reference_params=reference_params, given=given)
    adapter = adapter_for(model)
    start = Start.of(model)
    budget, timings, steps = Budget.of(start, reference_params), Timings(), []
    for step in range(1, config.steps + 1):
        target = budget.step_target(model, config.ratio, step, config.steps)
        seconds = Timings()
        with seconds.phase("scoring_s"):
            structure = _structure(model, config)
            stats = _activation_stats(model, structure, calibration, config)
            scores = _scores(model, structure, calibration, stats, config)
        with seconds.phase("planning_s"):
            ranges = layer_ranges(config, len(adapter.layers(model)))
            params = groups_element_parameters(structure.groups, model)
            allowed = {g.name: _layer_mask(g, ranges[Kind.LAYERS]) for g in structure.of_kind(Kind.LAYERS)}
            settings = PlanSettings(config.ranking, config.min_keep, config.round_to)
            weights = None
            if config.ranking == "layer":
                weights = weights_for(config.allocation, model, structure.groups, calibration, config.batch_size)
            plan = make_plan(structure.groups, scores, params, target, settings, allowed, weights)
            plan = agree(plan) if agree is not None else plan
        with seconds.phase("surgery_s"):
            before = count_parameters(model)
            refits = compensation.compensation(model, structure, plan, stats, config.compensate, config.ridge)
            surgery.apply(model, structure, plan, adapter)
            gained = note_biases(model, adapter, compensation.install(model, refits), config)
        for key, value in seconds.seconds.items():
            timings.seconds[key] += value
        steps.append(step_record(model, config, plan, before, step, seconds.seconds, gained))
    return run_record(model, config, start, steps, timings, given)


def _experts_first(model, config: PruneConfig, calibration, agree: Agree | None, given) -> PruningRecord:
    """``config.experts`` of every MoE layer's experts (and ``expert_channels``), then (``ratio`` > 0) the other kinds remove
    ``ratio`` of the original parameters on top, scored on the expert-pruned model."""
    start = Start.of(model)
    first = prune_experts(model, config, calibration, agree)
    if not config.ratio:
        return run_record(model, config, start, first, Timings({**Timings().seconds, **first[0].timings}), given)
    rest = dataclasses.replace(
        config, experts=0.0, expert_channels=0.0, ratio=config.ratio * start.params / count_parameters(model)
    )
    record = prune(model, rest, calibration, agree, given=given)
    for step in record.steps:
        step.step += len(first)
    return dataclasses.replace(
        record,
        params_before=start.params,
        dense_layer_shapes=start.shapes,
        settings=asdict(config),
        steps=[*first, *record.steps],
    )


def _structure(model: PreTrainedModel, config: PruneConfig) -> Structure:
    """The groups of ``config``'s kinds inside their layer ranges (every layer for whole layers)."""
    adapter = adapter_for(model)
    structure = adapter.discover(model, config.kinds)
    ranges = layer_ranges(config, len(adapter.layers(model)))
    structure.groups = [g for g in structure.groups if g.layer is None or g.layer in ranges[g.kind]]
    return structure


def _scores(model, structure: Structure, calibration, stats: dict, config: PruneConfig) -> dict[str, torch.Tensor]:
    if config.criterion in importance.ACTIVATION:  # the statistics were collected for compensation too
        return activations.score(model, structure, stats, config.criterion)
    return importance.score(
        model,
        structure,
        calibration,
        config.criterion,
        config.reduction,
        config.batch_size,
        config.seed,
        config.scoring,
    )


def _activation_stats(model, structure: Structure, calibration, config: PruneConfig) -> dict:
    """The output projections' input statistics, when the criterion or the compensation needs them."""
    if config.criterion not in importance.ACTIVATION and config.compensate == "none":
        return {}
    modules = list(activations.projections(structure).values())
    return activations.collect(model, modules, calibration, config.batch_size, gram=config.compensate == "lstsq")


def _layer_mask(group: Group, allowed: range) -> torch.Tensor:
    return torch.tensor([i in allowed for i in range(group.size)])
