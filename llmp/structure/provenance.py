"""What a traced forward records (:mod:`llmp.structure.trace` fills it, :mod:`llmp.structure.mapping`
reads it): sources of tracked channels, the projections that read them, attention calls, pooled
statistics, parameters used elementwise, opaque ops, and the union-find of coupled channel codes.

A code is ``source << SHIFT | channel``: channel ``c`` of source ``s``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

SHIFT = 32


@dataclass
class Source:
    """A tensor family whose channels are tracked: a projection output, the embedding, an attention output."""

    kind: str  # "linear" | "embed" | "attention"
    param: str | None  # weight of a linear/embedding
    size: int
    module: str  # innermost module running when it was made
    bias: str | None = None


@dataclass
class Sink:
    """A projection reading tracked channels: ``codes[j]`` is what its input column ``j`` carries."""

    param: str
    module: str
    codes: torch.Tensor


@dataclass
class Attention:
    """One attention call: head ``i`` of the output (source ``out``) reads ``q[i]``, ``k[i]``, ``v[i]``."""

    module: str
    q: torch.Tensor  # [heads, head_dim] codes
    k: torch.Tensor  # [heads, head_dim] (K/V head of each query head: repeated for GQA)
    v: torch.Tensor
    out: int


@dataclass
class Stat:
    """``op`` pooled, for each row of ``codes``, those codes into one value (a norm, a softmax)."""

    op: str
    module: str
    codes: torch.Tensor  # [rows, pooled]


@dataclass
class ParamUse:
    """Index ``pairs[:, 0]`` of parameter ``param`` met activation code ``pairs[:, 1]`` elementwise."""

    param: str
    module: str
    pairs: torch.Tensor


@dataclass
class Opaque:
    """An op the tracer cannot map, and the sources whose channels it read."""

    op: str
    module: str
    sources: set[int]


@dataclass
class Trace:
    """What one forward pass showed."""

    sources: list[Source] = field(default_factory=list)
    sinks: list[Sink] = field(default_factory=list)
    attentions: list[Attention] = field(default_factory=list)
    stats: list[Stat] = field(default_factory=list)
    uses: list[ParamUse] = field(default_factory=list)
    opaque: list[Opaque] = field(default_factory=list)
    modules_run: list[str] = field(default_factory=list)
    parent: dict[int, int] = field(default_factory=dict)

    def find(self, code: int) -> int:
        root = code
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while code != root:
            self.parent[code], code = root, self.parent.get(code, code)
        return root

    def union(self, pairs: torch.Tensor) -> None:
        pairs = pairs[(pairs >= 0).all(1) & (pairs[:, 0] != pairs[:, 1])]
        for a, b in torch.unique(pairs, dim=0).tolist():
            ra, rb = self.find(a), self.find(b)
            if ra != rb:
                self.parent[max(ra, rb)] = min(ra, rb)

    def components(self, source: int) -> list[int]:
        """The coupled set (its root code) of each channel of ``source``."""
        base = source << SHIFT
        return [self.find(base + c) for c in range(self.sources[source].size)]


def source_of(codes: torch.Tensor) -> torch.Tensor:
    return torch.where(codes >= 0, codes >> SHIFT, -1)
