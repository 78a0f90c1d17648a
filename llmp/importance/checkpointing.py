"""Which decoder layers recompute their activations in the calibration backward, and how.

::

    layer 0 … first scored − 1   nothing kept (no gradient needed below the first scored layer)
    …                            full: only the layer's input kept, everything recomputed
    top − k … top − 1            selective: the Linear outputs kept too, while they fit the budget
    top                          not checkpointed (its backward runs first: same peak)

Selective layers recompute elementwise work and attention only (:func:`keep_matmuls`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial

import torch
import torch.utils.checkpoint
from torch import nn

from llmp.importance.settings import ScoringSettings
from llmp.structure import Structure, adapter_for

_aten = torch.ops.aten
_KEPT_OPS = frozenset((_aten.mm.default, _aten.addmm.default))
"""The products of ``nn.Linear`` (a 2-D input, or one flattened to 2-D)."""


def keep_matmuls(ctx, op, *args, passed: frozenset[int] = frozenset(), **kwargs):
    """Selective checkpointing's policy: keep what the layer's ``Linear`` products return, except
    those of the weights whose data pointers are in ``passed``; recompute the rest.

    ``passed`` holds the layer's last ``Linear``, whose output only feeds the residual sum that
    becomes the layer's output: that sum is kept anyway, as the next layer's input, so the
    recompute stops before the product (where a post-norm saves something after it, the product
    is recomputed: slower, not wrong)."""
    policy = torch.utils.checkpoint.CheckpointPolicy
    if op in _KEPT_OPS and args[-1].data_ptr() not in passed:
        return policy.MUST_SAVE
    return policy.PREFER_RECOMPUTE


def _linears(layer: nn.Module) -> list[nn.Linear]:
    return [m for m in layer.modules() if isinstance(m, nn.Linear)]


def budget(model: nn.Module, settings: ScoringSettings) -> int:
    """Bytes of ``Linear`` outputs the selective layers may keep: absolute for a small model (its
    peak is mostly the runtime's), a share of a big one's weights, half of it in half precision
    (whose float32 score buffers weigh twice as much next to its weights)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    if weights <= 4 * settings.activation_budget:
        return settings.activation_budget
    precision = min(next(model.parameters()).element_size(), 4) / 4
    return int(weights * precision) // settings.activation_share


def plan(model: nn.Module, structure: Structure, tokens: int, settings: ScoringSettings) -> tuple[list, list]:
    """Layers to checkpoint fully and selectively (module docstring), for ``tokens`` per batch:
    from the top down, selective while ``tokens`` × the summed output widths of the layer's
    ``Linear`` modules but the last fit in :func:`budget`."""
    layers = list(adapter_for(model).layers(model))[:-1]
    spans_all = any(g.layer is None for g in structure.groups)  # hidden channels: every layer needs a gradient
    first = 0 if spans_all else min((g.layer for g in structure.groups), default=0)
    layers = layers[first:]
    left = budget(model, settings)
    selective = []
    for layer in reversed(layers):
        linears = _linears(layer)
        if not linears:
            break
        cost = tokens * sum(m.out_features for m in linears[:-1]) * linears[0].weight.element_size()
        if cost > left:
            break
        left -= cost
        selective.append(layer)
    return [layer for layer in layers if all(layer is not s for s in selective)], selective


@contextmanager
def checkpointed(layers: nn.ModuleList | list, policy=None) -> Iterator[None]:
    """Run every layer of ``layers`` under activation checkpointing (in eval mode too, unlike
    transformers' own switch, so dropout stays off): full, or selective by ``policy``
    (:func:`keep_matmuls`, given the layer's last ``Linear`` as ``passed``)."""
    for layer in layers:
        forward, extra = layer.forward, {}
        if policy is not None:
            linears = _linears(layer)
            passed = frozenset([linears[-1].weight.data_ptr()] if linears else [])
            extra["context_fn"] = partial(
                torch.utils.checkpoint.create_selective_checkpoint_contexts, partial(policy, passed=passed)
            )

        def run(*args, _forward=forward, _extra=extra, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **_extra, **kwargs)

        layer.forward = run
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the class's forward again
