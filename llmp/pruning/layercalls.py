"""Calling one decoder layer by itself: the arguments the model passes it, its outputs for the
next layer, in the dtype it computes in. What the layer-by-layer drivers and the allocation's
search share."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from llmp.importance import activations
from llmp.structure import adapter_for


def compute_dtype(model: PreTrainedModel) -> torch.dtype:
    """What a layer computes in when run by itself: float32 on CPU (half-precision products are
    slow there, and statistics want the precision), the model's dtype elsewhere."""
    embeddings = model.get_input_embeddings().weight
    return torch.float32 if embeddings.device.type == "cpu" else embeddings.dtype


def layer_inputs(model: PreTrainedModel, calibration: torch.Tensor, batch_size: int | None, dtype: torch.dtype) -> list:
    """Per calibration batch, ``(hidden_states, args, kwargs)`` as the model passes them to layer 0.

    The rest of the call (rotary embeddings, masks, position ids) is reused for every layer.
    """
    layers = adapter_for(model).layers(model)
    seen = []

    def grab(_module, args, kwargs):
        seen.append((args, kwargs))
        raise activations.Stop  # nothing after layer 0's inputs is needed

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            activations.run_batches(model, calibration, batch_size)
    finally:
        handle.remove()
    inputs = []
    for args, kwargs in seen:
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        inputs.append((_cast(hidden, dtype), _cast(tuple(args[1:]), dtype), _cast(kwargs, dtype)))
    return inputs


def _cast(value, dtype: torch.dtype):
    return _tensors(value, lambda t: t.to(dtype) if t.is_floating_point() else t)


def _tensors(value, fn):
    """``value`` (a layer call's arguments: tensors in tuples, lists and dicts) with ``fn`` applied to each tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _tensors(v, fn) for k, v in value.items()}
    return value


NEXT_TOKENS = 512
"""Tokens per forward when a pruned layer computes the next layer's inputs: its activations
(an MLP's four intermediate-wide tensors, attention's expanded keys and values) for a quarter of
the default 16 × 128 calibration at a time, whatever the batch; samples are independent rows, so
the outputs are the same (``tests/test_activations.py``)."""


@torch.no_grad()
def run_layer(layer: nn.Module, inputs: list, whole: bool = False) -> list:
    """The next layer's inputs: this layer's hidden states for every batch, with the same rest.

    ``whole``: each batch in one forward, as recorded statistics must see it (their float32 sums
    are per forward: another split would move their last bits)."""
    outputs = []
    for hidden, args, kwargs in inputs:
        rows = len(hidden) if whole else max(1, NEXT_TOKENS // max(hidden.shape[1], 1))
        parts = []
        for start in range(0, hidden.shape[0], rows):
            cut = slice(start, start + rows)
            out = layer(hidden[cut], *_samples(args, cut, len(hidden)), **_samples(kwargs, cut, len(hidden)))
            parts.append(out[0] if isinstance(out, tuple) else out)
        outputs.append((torch.cat(parts) if len(parts) > 1 else parts[0], args, kwargs))
    return outputs


def _samples(value, cut: slice, batch: int):
    """``value`` (a layer call's arguments) for the samples ``cut``: a tensor of two or more dims
    whose first is the batch's is per sample (a ``[B, 1, L, L]`` mask); the rest (``[1, L, D]``
    rotary tables, ``[1, L]`` positions) is shared."""
    per_sample = batch > 1
    return _tensors(value, lambda t: t[cut] if per_sample and t.dim() >= 2 and t.shape[0] == batch else t)


@contextmanager
def computing(layer: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run a layer in ``dtype`` (float32 on CPU) and give its weights back their own dtype after."""
    stored = {p.dtype for p in layer.parameters() if p.is_floating_point()}
    if stored != {dtype}:
        layer.to(dtype)
    try:
        yield
    finally:
        if len(stored) == 1 and stored != {dtype}:
            layer.to(next(iter(stored)))
