"""Allocation: how many elements each layer's groups lose, the parameter budget met.

::

    uniform      the same fraction of every group (LLM-Pruner's, FLAP's): no cost
    depth        deeper layers lose more (rules.py): no cost
    sensitivity  layers that change their input least lose more (rules.py): one dense forward
    search       an evolutionary search judged by KL to the dense model (evolution.py), from the
                 better of uniform and uniform over MLP channels alone: minutes

Every allocation is a :data:`Counts` (group → elements removed per block) in deployable units:
counts respect ``min_keep`` and ``round_to`` (hence ``--target``'s alignment), and the removed
parameters come as close to the target as the finest kind's steps allow.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from llmp.allocation.evolution import Counts, SearchResult, SearchSettings, search
from llmp.allocation.rules import depth_weights, layer_influence, sensitivity_weights
from llmp.errors import LlmpError
from llmp.plan import PlanSettings, layer_counts
from llmp.structure import Group, Kind, Structure

log = logging.getLogger(__name__)

SEED = "uniform"
"""What a streamed run that asked for the search does instead."""


@dataclass
class Chosen:
    """An allocation and how it was reached (the search's result, when it ran)."""

    rule: str
    counts: Counts
    search: SearchResult | None = None


def weights_for(
    rule: str, model: PreTrainedModel, groups: list[Group], calibration: torch.Tensor | None, batch_size=None, io=None
) -> dict[str, float] | None:
    """Per-group multipliers of the fraction lost, for a closed form (``None``: uniform)."""
    if rule == "depth":
        return depth_weights(groups)
    if rule == "sensitivity":
        return sensitivity_weights(groups, layer_influence(model, calibration, batch_size, io))
    return None


def allocate(
    model: PreTrainedModel,
    part: Structure,
    params: dict[str, torch.Tensor],
    target: int,
    config,
    calibration: torch.Tensor | None,
    io=None,
    search_settings: SearchSettings | None = None,
) -> Chosen:
    """The counts of ``part``'s groups under ``config.allocation`` that remove ``target`` parameters.

    ``io``: where streamed layers' weights live; the search needs the whole model in memory, so a
    streamed run is allocated by the search's seed instead (said in the log).
    """
    rule = config.allocation
    settings = PlanSettings("layer", config.min_keep, config.round_to)
    if rule == "search" and io is not None and io.visits_all:
        log.warning("a streamed run cannot search the allocation (it needs the model in memory): using %s", SEED)
        rule = SEED
    weights = weights_for(rule, model, part.groups, calibration, config.batch_size, io)  # None: uniform
    counts = layer_counts(part.groups, params, target, settings, weights)
    counts = {g.name: counts.get(g.name, 0) for g in part.groups}
    if rule != "search":
        return Chosen(rule, counts)
    seeds = {"uniform": counts}
    channels = [g for g in part.groups if g.kind is Kind.MLP]
    if 0 < len(channels) < len(part.groups):  # MLP channels alone seed too: at low ratios heads are worth keeping
        try:
            alone = layer_counts(channels, params, target, settings)
            seeds["uniform, MLP channels only"] = {g.name: alone.get(g.name, 0) for g in part.groups}
        except LlmpError:
            pass  # they cannot give the whole budget
    found = search(model, part, params, seeds, target, config, calibration, search_settings or config.search)
    return Chosen(rule, found.counts, found)


__all__ = ["Chosen", "Counts", "SearchResult", "SearchSettings", "allocate", "weights_for"]
