"""Groups: the sets of weight slices that must be removed together.

A group has one index space of ``size`` elements (heads, KV groups, channels). Each element owns
the same ``width`` consecutive indices in every slice, found at ``offset + e * stride``::

    KV group g of a layer with 2 query heads per KV head (head_dim d):

    q_proj.weight  rows   [g*2d, g*2d+2d)   Slice(dim=0, width=2d)
    k_proj.weight  rows   [g*d,  g*d+d)     Slice(dim=0, width=d)
    v_proj.weight  rows   [g*d,  g*d+d)     Slice(dim=0, width=d)
    o_proj.weight  cols   [g*2d, g*2d+2d)   Slice(dim=1, width=2d, writes=True)

Slices marked ``writes`` are the ones that put the element's result into the residual stream:
zeroing them (see :func:`llmp.surgery.mask`) gives the model that the physically pruned one must
equal. Discovery produces groups; importance scores them; the planner picks elements to drop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

import torch


class Kind(StrEnum):
    """What a group's elements are."""

    KV_GROUPS = "kv_groups"  # a key/value head with all of its query heads (MHA: one head)
    QUERY_HEADS = "query_heads"  # query heads inside their KV group, removed evenly per group
    MLP = "mlp"  # intermediate channels: gate/up rows + down columns
    HIDDEN = "hidden"  # residual-stream channels: embeddings, norms, every projection
    LAYERS = "layers"  # whole decoder layers
    EXPERTS = "experts"  # whole experts of a mixture-of-experts layer: their weights and router rows
    EXPERT_CHANNELS = "expert_channels"  # each expert's MLP channels, the same count from every expert


@dataclass(frozen=True)
class Slice:
    """The indices of one parameter along one dimension that belong to the group's elements."""

    param: str
    dim: int
    width: int
    offset: int = 0
    stride: int | None = None
    writes: bool = False
    gap: int = 0  # after every ``gap_every`` elements, skip ``gap`` more indices (fused K/V rows)
    gap_every: int | None = None
    starts: tuple[int, ...] | None = None  # element e starts at offset + starts[e] (any order: a gather)

    def indices(self, elements: torch.Tensor) -> torch.Tensor:
        """Indices along ``dim`` owned by ``elements`` (1-D integer tensor), in order.

        Element ``e`` starts at ``offset + e * stride + (e // gap_every) * gap``: with Falcon's
        grouped layout ``[q0 q1 k v | q2 q3 k v]`` query head ``e`` sits at ``e*d + (e//2)*2d``.
        """
        stride = self.stride if self.stride is not None else self.width
        span = torch.arange(self.width, device=elements.device)
        start = self.offset + elements * stride
        if self.starts is not None:
            start = self.offset + torch.tensor(self.starts, device=elements.device)[elements]
        if self.gap_every:
            start = start + torch.div(elements, self.gap_every, rounding_mode="floor") * self.gap
        return (start[:, None] + span).flatten()


@dataclass
class Group:
    """A set of slices with one element index space.

    Attributes:
        name: readable id, e.g. ``layers.3.mlp``.
        kind: what the elements are.
        layer: decoder layer index, or ``None`` for model-wide groups (hidden channels).
        size: number of elements.
        slices: every slice removed with an element.
        blocks: the elements form ``blocks`` equal consecutive parts (query heads per KV group)
            and every part must lose the same number of elements.
        modules: for ``LAYERS`` groups, the module path of each element.
    """

    name: str
    kind: Kind
    layer: int | None
    size: int
    slices: tuple[Slice, ...] = ()
    blocks: int = 1
    modules: tuple[str, ...] = field(default=())

    @property
    def block_size(self) -> int:
        return self.size // self.blocks


@dataclass
class Structure:
    """All prunable groups of one model, as found by a family adapter."""

    family: str
    groups: list[Group]

    def of_kind(self, *kinds: Kind) -> list[Group]:
        return [g for g in self.groups if g.kind in kinds]

    def __getitem__(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)
