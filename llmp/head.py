"""The output head apart from the body: the hidden states a causal LM feeds its head, so that a
loss can run the head on the tokens it needs (and a few at a time) instead of all logits at once."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def plain_head(model: nn.Module) -> nn.Linear | None:
    """The model's output head when its logits are just ``head(hidden)``; ``None`` when the forward
    changes them afterwards (Gemma 2's soft-capping, a logit scale) or the head is not a Linear."""
    head = model.get_output_embeddings()
    config = model.config
    changed = any(
        getattr(config, key, None) not in (None, 1, 1.0) for key in ("final_logit_softcapping", "logit_scale")
    )
    return head if type(head) is nn.Linear and not changed else None


def head_inputs(model: nn.Module, head: nn.Linear, **inputs) -> Tensor:
    """``[B, L, H]``: what ``model(**inputs)`` feeds ``head`` (its forward runs, the head's matmul
    does not; the logits it returns are a zero-stride placeholder)."""
    seen = {}

    def capture(hidden: Tensor) -> Tensor:
        seen["hidden"] = hidden
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], head.out_features)  # no memory

    head.forward = capture
    try:
        model(**inputs, use_cache=False)
    finally:
        del head.forward  # the class's forward again
    return seen["hidden"]


class _HeadLoss(torch.autograd.Function):
    """Summed next-token loss of ``head(hidden)``, its gradient made chunk by chunk in the forward.

    Per chunk of tokens: logits ``z = hidden·Wᵀ + b``, loss ``logsumexp(z) − z[label]``, and the
    loss's gradient with respect to ``hidden``, ``(softmax(z) − onehot(label))·W``, made as
    ``(e − Σe·onehot)·W / Σe`` with ``e = exp(z − max z)`` in the logits' own buffer. The backward
    only scales that stored gradient, so the head's matmul runs twice (logits, then gradient)
    instead of three times (logits, logits again under checkpointing, gradient), and at most one
    chunk of logits exists at a time, in a single buffer reused for every chunk.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int) -> Tensor:
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        buffer = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            out = buffer[: h.shape[0]]
            logits = torch.mm(h, weight.t(), out=out) if bias is None else torch.addmm(bias, h, weight.t(), out=out)
            z = logits.float()  # the same tensor in float32, a copy in bf16/fp16
            rows = torch.arange(h.shape[0], device=h.device)
            picked = z[rows, y]
            top = z.amax(dim=1, keepdim=True)
            z.sub_(top).exp_()  # e = exp(z - max), in place: no temporaries of the chunk's size
            e_sum = z.sum(dim=1, keepdim=True)
            total += (e_sum.log() + top).squeeze(1).sub_(picked).sum()  # logsumexp(z) - z[label]
            z[rows, y] -= e_sum.squeeze(1)  # (e - sum(e)·onehot) / sum(e) = softmax - onehot
            part = grad[start : start + chunk]
            torch.mm(z if z is logits else out.copy_(z), weight, out=part)  # bf16/fp16: back in the buffer
            part.div_(e_sum)  # the division on the [chunk, hidden] product, not on the logits
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, scale: Tensor):
        (grad,) = ctx.saved_tensors
        return grad * scale.to(grad.dtype), None, None, None, None


def head_loss(head: nn.Linear, hidden: Tensor, labels: Tensor, chunk: int) -> Tensor | None:
    """``cross_entropy(head(hidden), labels, reduction="sum")`` over ``[N, H]`` hidden states, ``chunk``
    tokens at a time and without keeping logits for the backward; ``None`` where the head's own
    parameters need gradients (the caller then runs the head under autograd)."""
    if any(p.requires_grad for p in head.parameters()):
        return None
    return _HeadLoss.apply(hidden, head.weight, head.bias, labels, chunk)
