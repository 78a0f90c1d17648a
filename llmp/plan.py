"""Planning: which elements to remove so that a given number of parameters goes.

One knob ``p`` (a fraction) sets how many elements every group loses: ``round(p · size)``,
evenly per block, capped by the minimum kept and rounded to a multiple when asked. Bisection
finds the ``p`` whose removed parameters come closest to the target; then the coarse kinds
(heads: ~200k parameters per element) keep their counts and the finest kind (MLP or hidden
channels: ~2k each) is solved again for the remainder, so the achieved ratio lands on target::

    target 20% of 134.5M = 26.9M
    p = 0.26 → 9 → 6 query heads (-5.1M) + 400 of 1536 channels × 23 layers (-15.9M) ...
    refill MLP → -21.8M on channels → 26.9M total

``ranking="layer"`` removes each group's lowest-scored elements; ``"global"`` spends each kind's
budget on the lowest-scored elements across all layers. ``weights`` (:mod:`llmp.allocation`) scale
``p`` per group: a group of weight 1.5 loses 1.5 times the fraction of one of weight 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from llmp.errors import LlmpError
from llmp.structure import Group, Kind

Plan = dict[str, list[int]]
"""Group name → the elements (indices in the group's space) to remove."""


@dataclass
class PlanSettings:
    """How the removal is spread.

    Attributes:
        ranking: ``layer`` (same fraction of every group) or ``global`` (lowest scores anywhere).
        min_keep: fraction of each group (of each block) that is always kept; at least one element.
        round_to: kept MLP/hidden channels are a multiple of this (8, 64, 128 suit fast kernels).
    """

    ranking: str = "layer"
    min_keep: float = 0.0
    round_to: int = 1


@dataclass
class _Candidate:
    group: Group
    order: torch.Tensor  # [blocks, block_size]: element ids of each block, least important first
    scores: torch.Tensor  # importance per element (inf where removal is not allowed)
    params: torch.Tensor  # parameters per element
    allowed: int  # elements each block may lose
    settings: PlanSettings
    weight: float = 1.0  # this group loses the fraction p · weight
    removed: list[int] = field(init=False, repr=False)  # [k]: parameters of the k first of each block

    def __post_init__(self):
        # The bisection asks for removed_params a hundred times per group: one cumulative sum.
        per_rank = self.params[self.order].sum(0).cumsum(0).tolist()
        self.removed = [0, *per_rank]

    def count(self, p: float) -> int:
        """Elements removed per block at fraction ``p``."""
        b = self.group.block_size
        return self.rounded(min(math.floor(p * self.weight * b + 0.5), self.allowed))

    def rounded(self, k: int) -> int:
        """``k`` adjusted so that the kept count is a multiple of ``round_to`` (MLP, hidden)."""
        b, m = self.group.block_size, self.settings.round_to
        if k and m > 1 and self.group.kind in (Kind.MLP, Kind.HIDDEN):
            kept = max(m, round((b - k) / m) * m)
            k = min(max(b - kept, 0), self.allowed)
        return k

    def take(self, per_block: int) -> torch.Tensor:
        return self.order[:, :per_block].flatten()

    def removed_params(self, per_block: int) -> int:
        return self.removed[per_block]


def make_plan(
    groups: list[Group],
    scores: dict[str, torch.Tensor],
    element_params: dict[str, torch.Tensor],
    target: int,
    settings: PlanSettings,
    allowed: dict[str, torch.Tensor] | None = None,
    weights: dict[str, float] | None = None,
) -> Plan:
    """Choose elements to remove, about ``target`` parameters in all.

    Args:
        groups: the groups that may lose elements.
        scores: importance per element (lower goes first).
        element_params: parameters per element.
        target: parameters to remove.
        settings: ranking, minimum kept, rounding.
        allowed: optional boolean mask per group of the elements that may be removed.
        weights: optional multiplier per group of the fraction it loses (> 0; default 1).

    Raises:
        LlmpError: the target exceeds what the groups can give under the constraints.
    """
    if settings.ranking not in ("layer", "global"):
        raise LlmpError(f"`ranking` must be 'layer' or 'global'; got {settings.ranking!r}")
    if not 0.0 <= settings.min_keep < 1.0:
        raise LlmpError(f"`min_keep` must be in [0, 1); got {settings.min_keep}")
    if settings.round_to < 1:
        raise LlmpError(f"`round_to` must be a positive integer; got {settings.round_to}")
    weights = weights or {}
    candidates = [
        _candidate(g, scores[g.name], element_params[g.name], settings, allowed, weights.get(g.name, 1.0))
        for g in groups
    ]
    candidates = [c for c in candidates if c.allowed > 0]
    if target <= 0 or not candidates:
        return {}
    most = sum(c.removed_params(c.rounded(c.allowed)) for c in candidates)
    if most < target * 0.99:
        raise LlmpError(
            f"cannot remove {target:,} parameters: these structures, layer ranges and minimum kept allow at "
            f"most {most:,}; lower `ratio`, widen the layer range, lower `min_keep`, or add group kinds"
        )
    p = _solve(candidates, target)
    counts = {id(c): c.count(p) for c in candidates}
    kinds = sorted({c.group.kind for c in candidates}, key=lambda k: -_granularity(candidates, k))
    if len(kinds) > 1:  # fix the coarse kinds, refill the finest
        finest = [c for c in candidates if c.group.kind is kinds[-1]]
        fixed = sum(c.removed_params(counts[id(c)]) for c in candidates if c.group.kind is not kinds[-1])
        p_fine = _solve(finest, target - fixed)
        counts.update({id(c): c.count(p_fine) for c in finest})
    if settings.ranking == "global":
        counts = _global_counts(candidates, counts)
    return {c.group.name: sorted(c.take(counts[id(c)]).tolist()) for c in candidates if counts[id(c)]}


def _candidate(group, scores, params, settings, allowed, weight: float = 1.0) -> _Candidate:
    scores = scores.clone().double()
    mask = allowed.get(group.name) if allowed else None
    if mask is not None:
        scores[~mask] = math.inf
    b = group.block_size
    blocks = scores.view(group.blocks, b)
    order = blocks.argsort(dim=1, stable=True) + torch.arange(group.blocks)[:, None] * b
    keep_min = max(1, math.ceil(settings.min_keep * b))
    movable = b - keep_min
    if mask is not None:
        movable = min(movable, int(mask.view(group.blocks, b).sum(1).min()))
    return _Candidate(group, order, scores, params, max(movable, 0), settings, weight)


def _granularity(candidates: list[_Candidate], kind: Kind) -> float:
    return max(float(c.params.max()) * c.group.blocks for c in candidates if c.group.kind is kind)


def _total(candidates: list[_Candidate], p: float) -> int:
    return sum(c.removed_params(c.count(p)) for c in candidates)


def _solve(candidates: list[_Candidate], target: int) -> float:
    """The fraction whose removed parameters come closest to ``target``."""
    if target <= 0:
        return 0.0
    lo, hi = 0.0, max(1.0 / c.weight for c in candidates)  # at hi every group gives all it may
    # _total(lo) < target <= _total(hi) once the loop has run
    for _ in range(50):
        mid = (lo + hi) / 2
        if _total(candidates, mid) < target:
            lo = mid
        else:
            hi = mid
    return lo if target - _total(candidates, lo) < _total(candidates, hi) - target else hi


def _global_counts(candidates: list[_Candidate], counts: dict[int, int]) -> dict[int, int]:
    """Spend each kind's budget on the least important units across layers."""
    result = dict(counts)
    for kind in {c.group.kind for c in candidates}:
        members = [c for c in candidates if c.group.kind is kind]
        budget = sum(c.removed_params(counts[id(c)]) for c in members)
        units = []  # (score of the j-th unit, candidate, j): unit j = j-th lowest element of every block
        for c in members:
            units += [(float(c.scores[c.order[:, j]].sum()), j, c) for j in range(c.allowed)]
        units.sort(key=lambda u: (u[0], u[1]))
        for c in members:
            result[id(c)] = 0
        spent = 0
        for _, j, c in units:
            if spent >= budget:
                break
            if j != result[id(c)]:  # units of one group go in order
                continue
            result[id(c)] = j + 1
            spent += c.removed[j + 1] - c.removed[j]
        for c in members:
            result[id(c)] = c.rounded(result[id(c)])
    return result


def layer_counts(
    groups: list[Group],
    element_params: dict[str, torch.Tensor],
    target: int,
    settings: PlanSettings,
    weights: dict[str, float] | None = None,
) -> dict[str, int]:
    """Elements each group loses per block under ``layer`` ranking: they follow from the sizes
    and the target alone, so a layer-by-layer pruner knows them before any layer is scored.

    Raises:
        LlmpError: as :func:`make_plan`.
    """
    zeros = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in groups}
    layer = PlanSettings("layer", settings.min_keep, settings.round_to)
    plan = make_plan(groups, zeros, element_params, target, layer, weights=weights)
    blocks = {g.name: g.blocks for g in groups}
    return {name: len(elements) // blocks[name] for name, elements in plan.items()}


def choose(group: Group, scores: torch.Tensor, per_block: int) -> list[int]:
    """The ``per_block`` lowest-scored elements of every block of ``group``."""
    if per_block <= 0:
        return []
    order = scores.double().view(group.blocks, group.block_size).argsort(dim=1, stable=True)
    order = order + torch.arange(group.blocks)[:, None] * group.block_size
    return sorted(order[:, :per_block].flatten().tolist())


def groups_element_parameters(groups: list[Group], model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`element_parameters` of each group, by name, reading the model's parameters once."""
    params = dict(model.named_parameters())
    return {g.name: element_parameters(g, model, params) for g in groups}


def element_parameters(group: Group, model: nn.Module, params: dict[str, nn.Parameter] | None = None) -> torch.Tensor:
    """Parameters removed with each element of ``group`` (shared weights counted once);
    ``params``: ``dict(model.named_parameters())``, where the caller has it."""
    if group.kind is Kind.LAYERS:
        counts = [sum(p.numel() for p in model.get_submodule(m).parameters()) for m in group.modules]
        return torch.tensor(counts, dtype=torch.long)
    params = dict(model.named_parameters()) if params is None else params
    per = sum(s.width * math.prod(params[s.param].shape) // params[s.param].shape[s.dim] for s in group.slices)
    return torch.full((group.size,), per, dtype=torch.long)
