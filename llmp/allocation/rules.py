"""Closed-form allocations: how much each layer loses, from its depth or from what the dense model
does with it on the calibration text. Each gives a weight per group that scales the fraction it
loses (:func:`llmp.plan.layer_counts` then meets the budget), so they cost at most one forward.

``sensitivity`` ranks the layers by ``1 - cos(input, output)`` of the dense model (ShortGPT's
block influence): the layer that changes its input least loses most. Rank, not value, sets the
weight, as the values span orders of magnitude (the first layers' far above the rest)::

    weight = 1 + spread · (1 - 2 · rank / (n - 1))      rank 0: the least influential layer

``depth`` is the same line over the layer's position instead (deeper layers lose more, SlimGPT).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

from llmp.pruning.layercalls import compute_dtype, computing, layer_inputs, run_layer
from llmp.structure import Group, adapter_for

SPREAD = 0.5
"""Weights span 1 ± SPREAD: the most spared layer loses a third of what the least spared loses."""


def line_weights(order: list[int], spread: float = SPREAD) -> dict[int, float]:
    """Layer → weight along ``order`` (first: loses most), linear from ``1 + spread`` to ``1 - spread``."""
    n = len(order)
    if n < 2:
        return dict.fromkeys(order, 1.0)
    return {layer: 1 + spread * (1 - 2 * rank / (n - 1)) for rank, layer in enumerate(order)}


def depth_weights(groups: list[Group]) -> dict[str, float]:
    """Deeper layers lose more."""
    layers = sorted({g.layer for g in groups}, reverse=True)
    weights = line_weights(layers)
    return {g.name: weights[g.layer] for g in groups}


def sensitivity_weights(groups: list[Group], influence: dict[int, float]) -> dict[str, float]:
    """Layers that change their input least lose more (``influence``: layer → 1 - cos)."""
    layers = sorted({g.layer for g in groups}, key=lambda i: (influence[i], i))
    weights = line_weights(layers)
    return {g.name: weights[g.layer] for g in groups}


@torch.no_grad()
def layer_influence(
    model: PreTrainedModel, calibration: torch.Tensor, batch_size: int | None, io=None
) -> dict[int, float]:
    """Layer → mean over calibration tokens of ``1 - cos(input, output)`` in the dense model.

    ``io`` (:class:`llmp.pruning.layerwise.Layers`) makes streamed layers' weights real in turn.
    """
    layers = adapter_for(model).layers(model)
    compute = compute_dtype(model)
    inputs = layer_inputs(model, calibration, batch_size, compute)
    influence = {}
    for i, layer in enumerate(layers):
        if io is not None:
            io.load(i)
        with computing(layer, compute):
            outputs = run_layer(layer, inputs)
        if io is not None:
            io.release(i, final=False)
        change = [
            1 - F.cosine_similarity(x[0].float(), y[0].float(), dim=-1) for x, y in zip(inputs, outputs, strict=True)
        ]
        influence[i] = float(torch.cat([c.flatten() for c in change]).mean())
        inputs = outputs
    return influence
