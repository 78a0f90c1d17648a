"""Expert pruning: the lowest-scored fraction of every mixture-of-experts layer's experts, layer
by layer on the calibration text.

The calibration hidden states enter layer 0; each MoE layer in turn runs on its inputs while its
router and experts are watched (:mod:`llmp.importance.experts`), loses its lowest-scored experts,
and runs again, pruned, so that the next layer sees the pruned model's states (the order of the
other layer-by-layer drivers). Every MoE layer loses the same count, ``round(experts × E)``, so
that the folder keeps one expert count and plain transformers, vLLM and llama.cpp load it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import PreTrainedModel

from llmp import surgery
from llmp.errors import LlmpError
from llmp.importance import activations
from llmp.importance.experts import recording
from llmp.pruning.config import PruneConfig
from llmp.pruning.layercalls import compute_dtype, computing, layer_inputs, run_layer
from llmp.pruning.layerwise import Layers
from llmp.pruning.steps import Timings, count_parameters, step_record
from llmp.record import Step
from llmp.structure import Kind, Structure, adapter_for
from llmp.structure.adapters import expert_count, moe_problem
from llmp.structure.adapters.moe import sparse_block


def experts_removed(config: PruneConfig, n: int) -> int:
    """How many of a layer's ``n`` experts ``config.experts`` removes.

    Raises:
        LlmpError: none, or all of them.
    """
    k = round(config.experts * n)
    if not 0 < k < n:
        raise LlmpError(
            f"`experts` {config.experts} removes {k} of the {n} experts of each MoE layer; choose a fraction "
            f"that removes between 1 and {n - 1} (e.g. {round(1 / n, 3)} to {round((n - 1) / n, 3)})"
        )
    return k


def check_experts(model: PreTrainedModel, config: PruneConfig) -> None:
    """Refuse ``experts`` for a model without MoE layers or a fraction that removes none or all.

    Raises:
        LlmpError: naming the argument, the value and what to do instead.
    """
    if not config.experts:
        return
    adapter = adapter_for(model)
    if Kind.EXPERTS not in adapter.kinds:
        raise LlmpError(
            f"`experts` {config.experts}: this {getattr(model.config, 'model_type', '?')} model has no "
            "mixture-of-experts layers; use `ratio` (heads, MLP channels, layers)"
        )
    for group in adapter.discover(model, (Kind.EXPERTS,)).groups:
        experts_removed(config, group.size)


def check_experts_config(config: PruneConfig, fields: dict | None) -> None:
    """Before any weight is read: an unknown mixture-of-experts family, or ``experts`` for a model
    without experts or a fraction that removes none or all, refused from config.json (``fields``;
    ``None``: not readable cheaply, checked after loading instead).

    Raises:
        LlmpError: naming the family or the argument.
    """
    if fields is None:
        return
    model_type = fields.get("model_type")
    problem = moe_problem(model_type, fields)
    if problem:
        raise LlmpError(problem)
    if not config.experts:
        return
    n = expert_count(fields)
    if n is None:
        raise LlmpError(
            f"`experts` {config.experts}: this {model_type} model has no mixture-of-experts layers; use `ratio` "
            "(heads, MLP channels, layers)"
        )
    experts_removed(config, n)


@torch.no_grad()
def prune_experts(
    model: PreTrainedModel,
    config: PruneConfig,
    calibration: torch.Tensor,
    agree: Callable[[dict[str, list[int]]], dict[str, list[int]]] | None = None,
    layers_io: Layers | None = None,
) -> Step:
    """Remove ``config.experts`` of every MoE layer's experts in place (module docstring); the
    :class:`~llmp.record.Step` of it. ``agree`` as in :func:`llmp.prune`; ``layers_io``: where
    the layers' weights live (streamed: read before their turn, written after)."""
    activations.require_calibration(calibration)
    adapter, io = adapter_for(model), layers_io or Layers()
    structure = adapter.discover(model, (Kind.EXPERTS,))
    groups = {g.layer: g for g in structure.groups}
    last, compute, timings = max(groups), compute_dtype(model), Timings()
    before, plan, routing = count_parameters(model), {}, {}
    inputs = layer_inputs(model, calibration, config.batch_size, compute)
    layers = adapter.layers(model)
    for i, layer in enumerate(layers if io.visits_all else layers[: last + 1]):
        io.load(i)
        with computing(layer, compute):
            group = groups.get(i)
            if group is not None:
                with timings.phase("scoring_s"), recording(sparse_block(layer)) as stats:
                    run_layer(layer, inputs, whole=True)
                scores = stats.score(config.expert_criterion)
                routing[group.name] = [round(float(f), 6) for f in stats.score("frequency")]
                order = sorted(range(group.size), key=lambda e: (float(scores[e]), e))  # ties: the lower index goes
                mine = {group.name: sorted(order[: experts_removed(config, group.size)])}
                mine = agree(mine) if agree is not None else mine
                with timings.phase("surgery_s"):
                    surgery.apply(model, Structure(structure.family, [group]), mine, adapter)
                plan.update(mine)
            if i < last:
                inputs = run_layer(layer, inputs)
        io.release(i)
    record = step_record(model, config, plan, before, 1, timings.seconds, [])
    record.kinds, record.routing = [Kind.EXPERTS.value], routing
    return record
