"""Layer-by-layer pruning for the activation criteria, in memory or streamed from disk.

The calibration tokens go through the embeddings once; their hidden states enter decoder layer 0.
Each layer then in turn: runs on its inputs while its output projections' input statistics are
recorded (:mod:`llmp.activations`), is scored, loses its planned elements, is compensated, and
runs again, pruned, so that its output (the next layer's input) is the pruned model's, as in
SparseGPT and FLAP. Only one layer's activations and statistics exist at a time.

``ranking="layer"`` needs one pass: how many elements each group loses follows from the sizes and
the target alone (:func:`llmp.plan.layer_counts`). ``ranking="global"`` needs two: the first
scores every layer (on the dense model's activations, nothing removed), the plan is made over all
of them, and the second applies it layer by layer with compensation from the pruned activations.

Streamed (:func:`llmp.streamed.prune_streamed`), the model is a skeleton on the ``meta`` device: the embeddings,
final norm and head are read first, each layer's weights are read from the safetensors files when
its turn comes and written out, pruned, as their own shard before the next is read. Memory is one
layer's weights plus the calibration activations, whatever the depth.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedModel

from llmp import activations, surgery
from llmp.importance import groups_element_parameters
from llmp.plan import PlanSettings, choose, layer_counts, make_plan
from llmp.record import PruningRecord
from llmp.structure import Structure, adapter_for


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
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


@torch.no_grad()
def _run(layer: nn.Module, inputs: list) -> list:
    """The next layer's inputs: this layer's hidden states for every batch, with the same rest."""
    outputs = []
    for hidden, args, kwargs in inputs:
        out = layer(hidden, *args, **kwargs)
        outputs.append((out[0] if isinstance(out, tuple) else out, args, kwargs))
    return outputs


class Layers:
    """Where a layer's weights live: in memory (nothing to do) or on disk
    (:class:`llmp.streamed.StreamedLayers`)."""

    visits_all = False
    """Every layer must be loaded and released, those after the last pruned one too (to be written)."""

    def load(self, i: int) -> None:
        """Make layer ``i``'s weights real."""

    def release(self, i: int, final: bool = True) -> None:
        """Layer ``i`` is done: pruned and run (``final``), or only scored (first pass of global ranking)."""


def prune_layerwise(
    model: PreTrainedModel,
    config,
    calibration: torch.Tensor,
    layers_io: Layers | None = None,
    agree: Callable[[dict[str, list[int]]], dict[str, list[int]]] | None = None,
    reference_params: int | None = None,
) -> PruningRecord:
    """Prune ``model`` one decoder layer at a time (see the module docstring); ``config`` a
    :class:`llmp.PruneConfig` with an activation criterion.

    ``agree`` receives the plan before it is applied (global ranking: the whole plan; layer
    ranking: each layer's part) and returns the plan to apply (distributed callers broadcast);
    ``reference_params`` as in :func:`llmp.prune`.

    Raises:
        LlmpError: no calibration tokens (the settings are checked by ``config.check``).
    """
    from llmp.pruner import count_parameters, declare_biases, layer_ranges, note_biases, run_record, step_record

    config = config.resolved(model)
    config.check()
    activations.require_calibration(calibration)
    layers_io = layers_io or Layers()
    adapter = adapter_for(model)
    layers = adapter.layers(model)
    ranges = layer_ranges(config, len(layers))
    structure = adapter.discover(model, config.kinds)
    groups = [g for g in structure.groups if g.layer in ranges[g.kind]]
    total = count_parameters(model)
    reference = total if reference_params is None else reference_params
    target = round(config.ratio * reference - (reference - total))
    params = groups_element_parameters(groups, model)
    settings = PlanSettings(config.ranking, config.min_keep, config.round_to)
    owners = activations.projections(Structure(structure.family, groups))
    device = model.get_input_embeddings().weight.device
    compute = torch.float32 if device.type == "cpu" else model.get_input_embeddings().weight.dtype
    gram = config.compensate == "lstsq"
    timings = {"scoring_s": 0.0, "planning_s": 0.0, "surgery_s": 0.0}

    last = max((g.layer for g in groups), default=-1)
    t0 = time.perf_counter()
    plan: dict[str, list[int]] | None = None
    if config.ranking == "global":  # pass 1: scores of every layer on the dense activations
        scores, inputs = {}, layer_inputs(model, calibration, config.batch_size, compute)
        for i, layer in enumerate(layers[: last + 1]):
            layers_io.load(i)
            mine = [g for g in groups if g.layer == i]
            with _computing(layer, compute), activations.recording(model, [owners[g.name] for g in mine]) as stats:
                inputs = _run(layer, inputs)
            scores.update(activations.score(model, Structure(structure.family, mine), stats, config.criterion))
            layers_io.release(i, final=False)
        plan = make_plan(groups, scores, params, target, settings)
        plan = agree(plan) if agree is not None else plan
        counts = None
    else:
        counts = layer_counts(groups, params, target, settings)
    timings["planning_s"] += time.perf_counter() - t0

    inputs = layer_inputs(model, calibration, config.batch_size, compute)
    applied: dict[str, list[int]] = {}
    biases: list[str] = []
    for i, layer in enumerate(layers):
        if i > last and not layers_io.visits_all:
            break  # the layers after the last pruned one need nothing
        layers_io.load(i)
        mine = [g for g in groups if g.layer == i]
        with _computing(layer, compute):
            if mine:
                t1 = time.perf_counter()
                part = Structure(structure.family, mine)
                need_stats = plan is None or config.compensate != "none"
                stats = {}
                if need_stats:
                    with activations.recording(model, [owners[g.name] for g in mine], gram) as stats:
                        _run(layer, inputs)
                if plan is None:
                    scores = activations.score(model, part, stats, config.criterion)
                    mine_plan = {g.name: choose(g, scores[g.name], counts.get(g.name, 0)) for g in mine}
                    mine_plan = agree(mine_plan) if agree is not None else mine_plan
                else:
                    mine_plan = {g.name: plan.get(g.name, []) for g in mine}
                mine_plan = {k: v for k, v in mine_plan.items() if v}
                t2 = time.perf_counter()
                refits = activations.compensation(model, part, mine_plan, stats, config.compensate)
                surgery.apply(model, part, mine_plan, adapter)
                biases += note_biases(model, adapter, activations.install(model, refits), config, declare=False)
                applied.update(mine_plan)
                t3 = time.perf_counter()
                timings["scoring_s"] += t2 - t1
                timings["surgery_s"] += t3 - t2
            if i < last:
                inputs = _run(layer, inputs)  # the next layer's inputs, from this pruned layer
        layers_io.release(i)

    biases += declare_biases(model, adapter, config)  # after the last layer: its groups knew no such biases
    step = step_record(model, config, applied, total, 1, timings, biases)
    return run_record(model, config, total, [step], timings)


@contextmanager
def _computing(layer: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """Run a layer in ``dtype`` (float32 on CPU) and give its weights back their own dtype after."""
    stored = {p.dtype for p in layer.parameters() if p.is_floating_point()}
    if stored != {dtype}:
        layer.to(dtype)
    try:
        yield
    finally:
        if len(stored) == 1 and stored != {dtype}:
            layer.to(next(iter(stored)))
