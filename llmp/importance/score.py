"""``score``: one score per group element, dispatched to the criterion's engine.

::

    criterion.needs   engine
    nothing           the weights alone (l1, l2), or seeded noise (random)
    gradients         GradientScorer: calibration forward + backward (.gradients)
    activations       a calibration forward recording the output projections' inputs (.activations)

An element's slices each give a score; ``reduction`` (sum, mean, max, prod, first) combines them.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from llmp.errors import LlmpError
from llmp.importance import activations
from llmp.importance.criteria import CRITERIA, REDUCTIONS, Criterion, CriterionSpec, Random, Reduction, reduce_to
from llmp.importance.gradients import GradientScorer, Sums
from llmp.importance.settings import ScoringSettings
from llmp.structure import Group, Kind, Structure


def score(
    model: nn.Module,
    structure: Structure,
    calibration: torch.Tensor | None = None,
    criterion: Criterion = "taylor",
    reduction: Reduction = "sum",
    batch_size: int | None = None,
    seed: int = 0,
    settings: ScoringSettings | None = None,
) -> dict[str, torch.Tensor]:
    """Score every element of every group (higher = more important).

    Args:
        model: the causal LM; its parameters are not changed.
        structure: the groups to score.
        calibration: ``[N, L]`` token ids; required by the criteria that need calibration.
        criterion: a name of :data:`~llmp.importance.criteria.CRITERIA`.
        reduction: how an element's per-slice scores combine.
        batch_size: calibration samples per forward/backward (``None``: all in one; per-sample
            criteria use 1).
        seed: for ``random``.
        settings: the gradient engine's memory policy (default :class:`ScoringSettings`).

    Returns:
        Group name → float64 tensor of ``group.size`` scores.

    Raises:
        LlmpError: unknown criterion or reduction, or no calibration data for a criterion that needs it.
    """
    if criterion not in CRITERIA:
        raise LlmpError(f"`criterion` must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if reduction not in REDUCTIONS:
        raise LlmpError(f"`reduction` must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    spec = CRITERIA[criterion]
    if isinstance(spec, Random):
        return spec.scores({g.name: g.size for g in structure.groups}, seed)
    if spec.needs != "nothing" and (calibration is None or calibration.numel() == 0):
        raise LlmpError(
            f"`criterion` {criterion!r} needs calibration tokens and `calibration` is empty: pass token ids "
            "(e.g. from llmp.data.calibration_samples), or use a data-free criterion (l1, l2, random)"
        )
    if spec.needs == "activations":
        modules = list(activations.projections(structure).values())
        stats = activations.collect(model, modules, calibration, batch_size)
        return activations.score(model, structure, stats, criterion)
    params = dict(model.named_parameters())
    tracked = _tracked(structure, params)
    keys = _slice_keys(structure)
    if spec.needs == "gradients":
        scorer = GradientScorer(spec, keys, calibration.shape[0])
        scorer.run(model, structure, tracked, calibration, batch_size, settings or ScoringSettings())
        sums, totals = scorer.sums, scorer.totals
    else:
        sums, totals = _weight_scores(spec, params, tracked, keys)
    return {g.name: _group_scores(g, sums, totals, reduction) for g in structure.groups}


def _tracked(structure: Structure, params: dict[str, nn.Parameter]) -> list[str]:
    """Every parameter a group slices, and every parameter of a whole layer that may go."""
    names = {s.param for g in structure.groups for s in g.slices}
    for group in structure.of_kind(Kind.LAYERS):
        names.update(n for n in params if any(n.startswith(m + ".") for m in group.modules))
    return sorted(names)


def _slice_keys(structure: Structure) -> dict[str, set[int]]:
    keys: dict[str, set[int]] = defaultdict(set)
    for g in structure.groups:
        for s in g.slices:
            keys[s.param].add(s.dim)
    return keys


@torch.no_grad()
def _weight_scores(spec: CriterionSpec, params, tracked, keys) -> tuple[Sums, dict[str, float]]:
    sums, totals = {}, {}
    for name in tracked:
        salience = spec.salience(params[name].detach().float(), None, None)
        for dim in keys.get(name, ()):
            sums[(name, dim)] = reduce_to(salience, dim).double()
        totals[name] = float(salience.sum())
    return sums, totals


_REDUCE = {
    "sum": lambda s: s.sum(0),
    "mean": lambda s: s.mean(0),
    "max": lambda s: s.max(0).values,
    "prod": lambda s: s.prod(0),
    "first": lambda s: s[0],
}


def _group_scores(group: Group, sums: Sums, totals: dict[str, float], reduction: str) -> torch.Tensor:
    if group.kind is Kind.LAYERS:  # a layer's score: the salience of all its parameters
        return torch.tensor(
            [sum(v for n, v in totals.items() if n.startswith(m + ".")) for m in group.modules], dtype=torch.float64
        )
    elements = torch.arange(group.size)
    per_slice = []
    for s in group.slices:
        vector = sums.get((s.param, s.dim))
        if vector is None:
            continue
        per_slice.append(vector[s.indices(elements)].view(group.size, s.width).sum(1))
    out = _REDUCE[reduction](torch.stack(per_slice))
    if not torch.isfinite(out).all():
        raise LlmpError(f"importance of group {group.name} is not finite; check the model weights and data")
    return out
