"""Importance: one score per group element, from weights and calibration gradients or activations.

Criteria (``w`` a weight, ``g`` the gradient of the mean calibration loss, ``F`` the mean of
per-sample squared gradients, the Fisher approximation of the Hessian diagonal):

=============  =====================================  ===========================
criterion      per weight, summed over an element      needs
=============  =====================================  ===========================
``taylor``     ``|w·g|``                               gradients
``taylor2``    ``w²·F`` (second-order Taylor term)     per-sample gradients
``taylor_mix`` ``|w·g − ½·w²·F|``                       both
``vectorwise`` ``|Σ_row w·g|`` (signs cancel in a row)  gradients
``flap``       ``Var(x)·‖w‖²`` of the output projection    activations (llmp.activations)
``wanda``      ``‖x‖·|w|`` of the output projection        activations (llmp.activations)
``l1``/``l2``  ``|w|`` / ``w²``                          nothing
``random``     uniform noise                            nothing
=============  =====================================  ===========================

An element's slices each give a score; ``reduction`` (sum, mean, max, prod, first) combines them.
Second-order scores are reduced as each parameter's gradient arrives and the gradient is freed at
once, so no copy of all gradients is ever held. First-order ones need the summed gradient and are
scored during the last batch's backward, so with a single batch (the default) no full set of
gradients ever exists:

- an ``nn.Linear`` weight's gradient ``dyᵀ·x`` is made in its backward (:class:`_ScoreWeight`)
  into one buffer per weight size and scored at once; it never becomes a ``.grad`` (no
  allocation per weight, no accumulation). Over several batches it is summed in a float32 copy;
- any other parameter of a group (norms, embeddings, the head) accumulates in ``param.grad``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn
from tqdm.auto import tqdm

from llmp.errors import LlmpError
from llmp.head import head_inputs, head_loss, plain_head
from llmp.memory import BACKWARD_THRESHOLD, FORWARD_THRESHOLD, mmap_threshold, release_free_heap
from llmp.structure import Group, Kind, Structure, adapter_for

Criterion = Literal["taylor", "taylor2", "taylor_mix", "vectorwise", "flap", "wanda", "l1", "l2", "random"]
ACTIVATION = ("flap", "wanda")
"""Criteria from calibration activations, without gradients (:mod:`llmp.activations`)."""
Reduction = Literal["sum", "mean", "max", "prod", "first"]
CRITERIA: tuple[str, ...] = Criterion.__args__
REDUCTIONS: tuple[str, ...] = Reduction.__args__
GRADIENT_CRITERIA = ("taylor", "taylor2", "taylor_mix", "vectorwise")


def needs_calibration(criterion: str) -> bool:
    """Whether ``criterion`` scores from calibration text (gradients or activations) or from weights alone."""
    return criterion in GRADIENT_CRITERIA or criterion in ACTIVATION


_PER_SAMPLE = {"taylor2", "taylor_mix"}


def score(
    model: nn.Module,
    structure: Structure,
    calibration: torch.Tensor | None = None,
    criterion: Criterion = "taylor",
    reduction: Reduction = "sum",
    batch_size: int | None = None,
    seed: int = 0,
    checkpointing: bool = True,
) -> dict[str, torch.Tensor]:
    """Score every element of every group (higher = more important).

    Args:
        model: the causal LM; its parameters are not changed.
        structure: the groups to score.
        calibration: ``[N, L]`` token ids; required by the gradient criteria.
        criterion: see the module docstring.
        reduction: how an element's per-slice scores combine.
        batch_size: calibration samples per forward/backward (``None``: all in one; per-sample
            criteria use 1).
        seed: for ``random``.
        checkpointing: recompute activations in the backward pass instead of keeping them
            (:func:`_checkpoint_plan`: ``Linear`` outputs kept within :data:`ACTIVATION_BUDGET`,
            only each layer's input beyond it); off: every layer keeps all its activations.

    Returns:
        Group name → float64 tensor of ``group.size`` scores.

    Raises:
        LlmpError: unknown criterion or reduction, or no calibration data for a gradient criterion.
    """
    if criterion not in CRITERIA:
        raise LlmpError(f"`criterion` must be one of {', '.join(CRITERIA)}; got {criterion!r}")
    if reduction not in REDUCTIONS:
        raise LlmpError(f"`reduction` must be one of {', '.join(REDUCTIONS)}; got {reduction!r}")
    if criterion == "random":
        generator = torch.Generator().manual_seed(seed)
        return {g.name: torch.rand(g.size, generator=generator, dtype=torch.float64) for g in structure.groups}
    if needs_calibration(criterion) and (calibration is None or calibration.numel() == 0):
        raise LlmpError(
            f"`criterion` {criterion!r} needs calibration tokens and `calibration` is empty: pass token ids "
            "(e.g. from llmp.data.calibration_samples), or use a data-free criterion (l1, l2, random)"
        )
    if criterion in ACTIVATION:
        from llmp import activations

        modules = list(activations.projections(structure).values())
        return activations.score(
            model, structure, activations.collect(model, modules, calibration, batch_size), criterion
        )
    params = dict(model.named_parameters())
    tracked = _tracked(structure, params)
    keys = _slice_keys(structure)
    if criterion in GRADIENT_CRITERIA:
        per_batch = 1 if criterion in _PER_SAMPLE else (batch_size or calibration.shape[0])
        tokens = min(per_batch, calibration.shape[0]) * calibration.shape[1]
        full, selective = _checkpoint_plan(model, structure, tokens) if checkpointing else ([], [])
        with _checkpointed(full), _checkpointed(selective, _keep_matmuls):
            sums, totals = _gradient_scores(model, params, tracked, keys, calibration, criterion, batch_size)
    else:
        sums, totals = _magnitude_scores(params, tracked, keys, criterion)
    return {g.name: _group_scores(g, sums, totals, params, reduction) for g in structure.groups}


def _tracked(structure: Structure, params: dict[str, nn.Parameter]) -> list[str]:
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


def _reduce_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum ``x`` over every dimension but ``dim``."""
    if x.dim() == 1:
        return x
    return x.sum(dim=[d for d in range(x.dim()) if d != dim])


def _salience(w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None, criterion: str) -> torch.Tensor:
    if criterion == "taylor":
        return (w * g).abs()
    if criterion == "taylor2":
        return w * w * f
    if criterion == "taylor_mix":
        return (w * g - 0.5 * w * w * f).abs()
    if criterion == "l1":
        return w.abs()
    return w * w  # l2


@contextmanager
def _grad_only_for(model: nn.Module, names: list[str]) -> Iterator[None]:
    params = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    wanted = set(names)
    for n, p in params.items():
        p.requires_grad_(n in wanted)
        p.grad = None
    model.eval()
    try:
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])
            p.grad = grads[n]
        model.train(was_training)


ACTIVATION_BUDGET = 256 << 20
"""Bytes of ``Linear`` outputs the calibration backward may keep beyond each layer's input, for a
model of up to four times as many bytes of weights; a bigger model may keep a tenth of its
weights' bytes (:data:`ACTIVATION_SHARE`). See :func:`_checkpoint_plan`."""
ACTIVATION_SHARE = 10
"""A model of more than four times :data:`ACTIVATION_BUDGET` may keep 1/this of its weights' bytes:
each byte kept saves the same recompute whatever the calibration length (about 2 × the projection's
input width flops per float), so the share trades time for memory the same way on every run. On
the 1.1B shape's paper run (10 × 64 tokens) a tenth made 10 of 17 checkpointed layers selective
instead of 5: a median 27.2 s against 29.3 (5 runs each, alternating) at 1.25× the weights
instead of 1.21× (in one process, alternating: 21.9–23.7 s against 23.7–27.3 s); the default
Taylor run (16 × 128) took the same 89 s at 1.48× instead of 1.41×. A half-precision model keeps
half the share (a 20th of its bytes): with a tenth, the 1.1B shape's bf16 `llmp prune` (Taylor,
16 × 128 tokens) peaked at 1.55× its weights instead of 1.50×."""

_aten = torch.ops.aten
_KEPT_OPS = frozenset((_aten.mm.default, _aten.addmm.default))
"""The products of ``nn.Linear`` (a 2-D input, or one flattened to 2-D)."""


def _keep_matmuls(ctx, op, *args, passed: frozenset[int] = frozenset(), **kwargs):
    """Selective checkpointing's policy: keep what the layer's ``Linear`` products return, except
    those of the weights whose data pointers are in ``passed``; recompute the rest (norms, rotary
    embeddings, attention, activations, residual sums).

    Attention is recomputed from the kept projections: a fraction of a layer's products for
    calibration lengths, and its output would cost as much memory as a projection's. ``passed``
    holds the layer's last ``Linear``, whose output only feeds the residual sum that becomes the
    layer's output: that sum is kept anyway, as the next layer's input, and the recompute stops
    before the product, since nothing after it saves a tensor for the backward (where something
    does, a post-norm, the product is recomputed: slower, not wrong)."""
    policy = torch.utils.checkpoint.CheckpointPolicy
    if op in _KEPT_OPS and args[-1].data_ptr() not in passed:
        return policy.MUST_SAVE
    return policy.PREFER_RECOMPUTE


def _linears(layer: nn.Module) -> list[nn.Linear]:
    return [m for m in layer.modules() if isinstance(m, nn.Linear)]


def _checkpoint_plan(model: nn.Module, structure: Structure, tokens: int) -> tuple[list, list]:
    """Decoder layers to checkpoint fully (only the input kept) and selectively (``Linear`` outputs
    kept too: the backward's recompute is elementwise work and attention only).

    The last layer is not checkpointed: its backward comes first, so its activations are freed
    before any other layer's are recomputed, and the peak is the same. Below it, layers from the
    top down are selective while what they keep, ``tokens`` × the summed output widths of the
    layer's ``Linear`` modules but the last (:func:`_keep_matmuls`), fits in the budget
    (:data:`ACTIVATION_BUDGET`; a tenth of the weights' bytes, a 20th in half precision, for a
    model of more than four times that); the rest are full. Layers below the first scored one are
    neither: they keep nothing for the backward."""
    layers = list(adapter_for(model).layers(model))[:-1]
    # Below the first scored layer nothing needs a gradient (unless a group spans every layer).
    spans_all = any(g.layer is None for g in structure.groups)
    first = 0 if spans_all else min((g.layer for g in structure.groups), default=0)
    layers = layers[first:]
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    # A small model's peak is mostly the runtime's own (~0.4 GiB): an absolute budget. A big one's
    # is its weights: a share of them, half of it in half precision, whose float32 score buffers
    # and runtime weigh twice as much next to its weights.
    precision = min(next(model.parameters()).element_size(), 4) / 4
    budget = ACTIVATION_BUDGET if weights <= 4 * ACTIVATION_BUDGET else int(weights * precision) // ACTIVATION_SHARE
    selective = []
    for layer in reversed(layers):
        linears = _linears(layer)
        if not linears:
            break
        cost = tokens * sum(m.out_features for m in linears[:-1]) * linears[0].weight.element_size()
        if cost > budget:
            break
        budget -= cost
        selective.append(layer)
    return [layer for layer in layers if all(layer is not s for s in selective)], selective


@contextmanager
def _checkpointed(layers: nn.ModuleList | list, policy=None) -> Iterator[None]:
    """Run every layer of ``layers`` under activation checkpointing (in eval mode too, unlike
    transformers' own switch, so dropout stays off): full, or selective by ``policy``
    (:func:`_keep_matmuls`, given the layer's last ``Linear`` as ``passed``)."""
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


class _Tap:
    """What the two halves of a scored ``nn.Linear`` share: its input, or the node that keeps it."""

    __slots__ = ("ctx", "x")

    def __init__(self):
        self.ctx = self.x = None

    def input(self) -> torch.Tensor:
        return self.x if self.x is not None else self.ctx.saved_tensors[0]


class _KeepInput(torch.autograd.Function):
    """Identity on a Linear's input ``x``; keeps ``x`` for the weight's gradient. Saved before the
    matmul runs, so a checkpointed recompute that needs nothing more stops before the matmul."""

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
    of a weight gradient, so ``weight.grad`` is never allocated or accumulated."""

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
def _scored_linears(modules: dict[str, nn.Linear], sink) -> Iterator[None]:
    """Run each ``modules[name]`` (an ``nn.Linear``, ``name`` its weight) so that its weight's
    gradient goes to ``sink(name, weight, x, dy)`` instead of ``weight.grad``."""
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


def _linear_weights(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` modules among ``names`` whose weight is the named parameter (the output head
    aside: :func:`calibration_loss` runs it on its own)."""
    head, found = model.get_output_embeddings(), {}
    for name in names:
        owner, _, leaf = name.rpartition(".")
        module = model.get_submodule(owner) if owner else None
        if leaf == "weight" and type(module) is nn.Linear and module is not head:
            found[name] = module
    return found


def _gradient_scores(model, params, tracked, keys, calibration, criterion, batch_size):
    n = calibration.shape[0]
    device = next(model.parameters()).device
    per_sample = criterion in _PER_SAMPLE
    step = 1 if per_sample else (n if batch_size is None else max(1, batch_size))
    sums: dict[tuple[str, int], torch.Tensor] = {}
    totals: dict[str, float] = defaultdict(float)
    fisher: dict[str, torch.Tensor] = {}
    gsum: dict[str, torch.Tensor] = {}
    # First-order scores of Linear weights come from (x, dy) in the backward (_ScoreWeight): one
    # gradient buffer per weight size, summed over batches only where there are several.
    linears = {} if per_sample else _linear_weights(model, tracked)
    buffers: dict[tuple, torch.Tensor] = {}
    pending: dict[str, torch.Tensor] = {}
    last = [False]

    def consume(name: str, p: torch.Tensor) -> None:
        # Called as soon as p's gradient for this sample is complete; frees it (second order).
        g = p.grad.detach().float()  # scores in float32 whatever the weights' dtype
        if criterion == "taylor2":
            contribution = (p.detach().float() * g).pow_(2).div_(n)
            for dim in keys.get(name, ()):
                part = _reduce_to(contribution, dim).double()
                sums[(name, dim)] = sums[(name, dim)] + part if (name, dim) in sums else part
            totals[name] += float(contribution.sum())
        else:  # taylor_mix: keep mean gradient and Fisher diagonal
            f = g * g / n
            fisher[name] = fisher[name] + f if name in fisher else f
            gsum[name] = gsum[name] + g / n if name in gsum else g / n
        p.grad = None

    scratch: dict[tuple, torch.Tensor] = {}

    def as_float(t: torch.Tensor, slot: str) -> torch.Tensor:
        # ``t`` in float32: itself, or a copy in one buffer per slot, as big as the biggest
        # weight. A fresh float32 copy of every bf16 weight and gradient faulted in new pages each
        # time (5 of the 1.1B shape's 15 s in the kernel).
        if t.dtype == torch.float32:
            return t
        key = (slot, t.device)
        if key not in scratch or scratch[key].numel() < t.numel():
            scratch.pop(key, None)
            scratch[key] = torch.empty(t.numel(), dtype=torch.float32, device=t.device)
        return scratch[key][: t.numel()].view(t.shape).copy_(t)

    def finish(name: str, p: torch.Tensor, g: torch.Tensor | None) -> None:
        # Final scores of one parameter from its summed gradient (first order, mix). ``g`` is
        # used up: the first-order criteria work in place on it.
        # Scores in float32 whatever the weights' dtype. The first-order criteria multiply the
        # float32 gradient by the weight as it is (a bf16/fp16 weight is promoted exactly, on the
        # fly): no float32 copy of it, 46 MB less for the 1.1B shape's biggest bf16 weight.
        first_order = criterion in ("taylor", "vectorwise")
        w = p.detach() if first_order else as_float(p.detach(), "weight")
        if g is None:  # unused by the forward
            g = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        else:
            g = as_float(g.detach(), "gradient")
        if criterion == "vectorwise":
            prod = g.mul_(w)
            for dim in keys.get(name, ()):
                sums[(name, dim)] = _reduce_to(prod, dim).abs().double()
            totals[name] = float(prod.abs_().sum())
        else:
            sal = g.mul_(w).abs_() if criterion == "taylor" else _salience(w, g, fisher.pop(name, None), criterion)
            for dim in keys.get(name, ()):
                sums[(name, dim)] = _reduce_to(sal, dim).double()
            totals[name] = float(sal.sum())
        p.grad = None

    def linear_gradient(name: str, weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
        key = (weight.numel(), weight.dtype, weight.device)  # gate/up and down share one
        if key not in buffers:
            buffers[key] = weight.new_empty(weight.numel())
        g = torch.mm(dy.t(), x, out=buffers[key].view(weight.shape))  # this batch's gradient of weight
        if not last[0]:
            pending[name] = g.float().clone() if name not in pending else pending[name].add_(g)
            return
        finish(name, weight, pending.pop(name).add_(g) if name in pending else g)

    starts = list(range(0, n, step))
    with _grad_only_for(model, tracked), _scored_linears(linears, linear_gradient):
        handles = []
        if per_sample:
            handles = [params[k].register_post_accumulate_grad_hook(lambda p, k=k: consume(k, p)) for k in tracked]
        try:
            quiet = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0  # one bar per job
            bar = tqdm(
                starts, desc=f"calibration ({criterion})", unit="batch", leave=False, disable=True if quiet else None
            )
            for start in bar:
                if start == starts[-1] and not per_sample:
                    # In the last backward each p.grad completes the sum: score and free it at once.
                    last[0] = True
                    handles = [
                        params[k].register_post_accumulate_grad_hook(lambda p, k=k: finish(k, p, p.grad))
                        for k in tracked
                        if k not in linears
                    ]
                batch = calibration[start : start + step].to(device)
                with mmap_threshold(FORWARD_THRESHOLD):
                    loss = calibration_loss(model, batch)
                if not torch.isfinite(loss):
                    raise LlmpError(f"calibration loss is {float(loss)}: the model or the data is broken")
                with mmap_threshold(BACKWARD_THRESHOLD):
                    (loss if per_sample else loss * (batch.shape[0] / n)).backward()
        finally:
            for handle in handles:
                handle.remove()
            release_free_heap()
        for name in tracked:
            if criterion == "taylor_mix":
                finish(name, params[name], gsum.pop(name, None))
            elif criterion != "taylor2" and name not in totals:
                finish(name, params[name], None)
    return sums, totals


LOSS_CHUNK_BYTES = 64 << 20
"""Float32 logits that exist at once in :func:`calibration_loss` (64 MiB: 341 tokens of SmolLM2's
49k vocabulary, 524 of Llama 2's 32k, 131 of Llama 3's 128k); at least 16 tokens.

The head's two products per chunk, ``[chunk, hidden] × [hidden, vocab]`` and back, run slower on
short chunks: on SmolLM2's head 99–106 GFLOP/s at 85 tokens against 149–166 at 315–630 (2 threads,
AMD EPYC). With 16 MiB (8 chunks of 85 tokens or fewer) SmolLM2's paper run (10 × 64 tokens)
scored in 3.42 s against 3.27 s with 64 MiB (2 chunks of 315; in one process, alternating four
times each), at a peak of 1.26 GiB against 1.30; the 1.1B shape's, 22.0 s against 21.9. A
half-precision head gets half of it (:func:`_loss_chunk`)."""


def calibration_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """The mean next-token loss of ``batch`` (``[B, L]`` ids), as ``model(..., labels=...).loss``
    but without all of its logits at once.

    The head runs on a few tokens at a time (:data:`LOSS_CHUNK_BYTES`) instead of keeping
    ``B·L × vocab`` floats (three copies: logits, log-softmax, their gradient; 0.4 GB for 10 × 64
    tokens of SmolLM2's 49k vocab, 12 GB for 64 × 128 tokens of Llama 3's 128k). Where the head's
    own weights need no gradient (it is not pruned), each chunk's gradient is made in the forward
    (:func:`llmp.head.head_loss`); otherwise each chunk runs under activation checkpointing.
    Models whose forward changes the logits after the head (Gemma 2's soft-capping, a logit
    scale) take the plain path.
    """
    head = plain_head(model)
    if head is None:
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    hidden = head_inputs(model, head, input_ids=batch)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = batch[:, 1:].reshape(-1).to(hidden.device)
    size = head.weight.element_size()
    total = head_loss(head, hidden, labels, _loss_chunk(labels.numel(), head.out_features, size))
    if total is None:
        chunk = _loss_chunk(labels.numel(), head.out_features, size, copies=3)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, labels.numel(), chunk):
            part = slice(start, start + chunk)
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_loss, head, hidden[part], labels[part], use_reentrant=False
            )
    return total / labels.numel()


def _loss_chunk(tokens: int, vocab: int, element_size: int = 4, copies: int = 1) -> int:
    """Tokens per chunk of :func:`calibration_loss`: as few chunks as :data:`LOSS_CHUNK_BYTES` of
    logits allow (at least 16 tokens each), of even sizes (SmolLM2's 630 in two chunks of 315, not
    341 and 289: the shorter chunk's products would run slower).

    ``copies``: float32 copies of a chunk's logits that exist at once (the fused loss: 1; autograd's
    cross-entropy, for a head that is scored: 3, the logits, their log-softmax and its gradient).
    A half-precision head also holds its logits in its own dtype (6 bytes a logit in bf16, fused),
    and has half the bytes: its peak stays next to its weights' size, as
    :func:`_checkpoint_plan`'s budget does."""
    per_logit = 4 * copies + (element_size if element_size < 4 else 0)
    most = max(16, LOSS_CHUNK_BYTES * min(element_size, 4) // 4 // (per_logit * vocab))
    chunks = -(-tokens // most)
    return -(-tokens // chunks)


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


@torch.no_grad()
def _magnitude_scores(params, tracked, keys, criterion):
    sums, totals = {}, {}
    for name in tracked:
        sal = _salience(params[name].detach().float(), None, None, criterion)
        for dim in keys.get(name, ()):
            sums[(name, dim)] = _reduce_to(sal, dim).double()
        totals[name] = float(sal.sum())
    return sums, totals


def _group_scores(group: Group, sums, totals, params, reduction: str) -> torch.Tensor:
    if group.kind is Kind.LAYERS:
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
    stacked = torch.stack(per_slice)
    if reduction == "sum":
        out = stacked.sum(0)
    elif reduction == "mean":
        out = stacked.mean(0)
    elif reduction == "max":
        out = stacked.max(0).values
    elif reduction == "prod":
        out = stacked.prod(0)
    else:  # first
        out = stacked[0]
    if not torch.isfinite(out).all():
        raise LlmpError(f"importance of group {group.name} is not finite; check the model weights and data")
    return out


def groups_element_parameters(groups: list[Group], model: nn.Module) -> dict[str, torch.Tensor]:
    """:func:`element_parameters` of each group, by name, walking the model's modules once (once
    per group took 0.07 s for SmolLM2's 44 groups)."""
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
