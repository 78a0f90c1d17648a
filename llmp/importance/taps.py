"""A scored ``nn.Linear``: its weight's gradient ``dyᵀ·x`` goes to a sink, never to ``.grad``.

::

    x ──► _KeepInput ──► linear(x, w.detach()) ──► _ScoreWeight ──► y
           saves x                                   backward: sink(name, w, x, dy)

The input is saved before the product runs, so a checkpointed recompute that needs nothing more
stops before the product; the sink makes the gradient into one buffer per weight size and scores
it at once (no allocation per weight, no accumulation).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Sink = Callable[[str, torch.Tensor, torch.Tensor, torch.Tensor], None]
"""``sink(name, weight, x, dy)`` with ``x`` and ``dy`` flattened to 2-D."""


class _Tap:
    """What the two halves of a scored ``nn.Linear`` share: its input, or the node that keeps it."""

    __slots__ = ("ctx", "x")

    def __init__(self):
        self.ctx = self.x = None

    def input(self) -> torch.Tensor:
        return self.x if self.x is not None else self.ctx.saved_tensors[0]


class _KeepInput(torch.autograd.Function):
    """Identity on a Linear's input ``x``; keeps ``x`` for the weight's gradient."""

    @staticmethod
    def forward(ctx, x, tap):
        ctx.save_for_backward(x)
        tap.ctx = ctx
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dx):
        return dx, None


class _ScoreWeight(torch.autograd.Function):
    """Identity on ``y = linear(x, weight)``; its backward hands ``(x, dy)`` to ``sink`` in place
    of a weight gradient."""

    @staticmethod
    def forward(ctx, y, weight, tap, name, sink):
        ctx.weight, ctx.tap, ctx.name, ctx.sink = weight, tap, name, sink
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        x = ctx.tap.input()
        ctx.sink(ctx.name, ctx.weight, x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1]))
        return dy, None, None, None, None


@contextmanager
def scored_linears(modules: dict[str, nn.Linear], sink: Sink) -> Iterator[None]:
    """Run each ``modules[name]`` (``name`` its weight) so that its weight's gradient goes to ``sink``."""
    for name, module in modules.items():

        def run(x, _module=module, _name=name):
            tap = _Tap()
            if x.requires_grad:
                x = _KeepInput.apply(x, tap)
            else:  # nothing upstream needs a gradient (the first pruned layer): keep x as it is
                tap.x = x
            y = nn.functional.linear(x, _module.weight.detach(), _module.bias)
            return _ScoreWeight.apply(y, _module.weight, tap, _name, sink)

        module.forward = run
    try:
        yield
    finally:
        for module in modules.values():
            del module.forward  # the class's forward again


def linear_weights(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules among ``names`` whose weight is the named parameter (the output head
    aside: :func:`llmp.importance.loss.calibration_loss` runs it on its own)."""
    head, found = model.get_output_embeddings(), {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else None
        if leaf == "weight" and type(module) is nn.Linear and module is not head:
            found[name] = module
    return found
