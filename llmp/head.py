"""The output head apart from the body: the hidden states a causal LM feeds its head, so that a
loss can run the head on the tokens it needs (and a few at a time) instead of all logits at once."""

from __future__ import annotations

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
