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
from llmp.importance.experts import channel_recording, channel_scores, recording, refit_down
from llmp.pruning.config import PruneConfig
from llmp.pruning.layercalls import compute_dtype, computing, layer_inputs, run_layer
from llmp.pruning.layerwise import Layers
from llmp.pruning.steps import Timings, count_parameters, step_record
from llmp.record import Step
from llmp.structure import Kind, Structure, adapter_for
from llmp.structure.adapters import expert_count, moe_problem
from llmp.structure.adapters.moe import sparse_block


def removed_of(fraction: float, n: int, flag: str, what: str) -> int:
    """How many of ``n`` elements (experts of a layer, channels of an expert) ``fraction`` removes.

    Raises:
        LlmpError: none, or all of them.
    """
    k = round(fraction * n)
    if not 0 < k < n:
        raise LlmpError(
            f"`{flag}` {fraction} removes {k} of the {n} {what}; choose a fraction that removes between 1 and "
            f"{n - 1} (e.g. {round(1 / n, 3)} to {round((n - 1) / n, 3)})"
        )
    return k


def channels_removed(config: PruneConfig, width: int) -> int:
    """How many of an expert's ``width`` channels ``config.expert_channels`` removes: the closest
    count that keeps a multiple of ``round_to`` (``--target gguf``: 32, q8_0's block)."""
    k = removed_of(config.expert_channels, width, "expert_channels", "channels of each expert")
    step = config.round_to
    if step > 1 and (width - k) % step:
        kept = max(step, round((width - k) / step) * step)
        k = removed_of(
            (width - kept) / width, width, "expert_channels", f"channels of each expert (kept a multiple of {step})"
        )
    return k


def experts_removed(config: PruneConfig, n: int) -> int:
    """How many of a layer's ``n`` experts ``config.experts`` removes (see :func:`removed_of`)."""
    return removed_of(config.experts, n, "experts", "experts of each MoE layer")


def _asked(config: PruneConfig) -> list[tuple[str, float]]:
    """The expert flags set: (name, fraction)."""
    return [(flag, v) for flag, v in (("experts", config.experts), ("expert_channels", config.expert_channels)) if v]


def no_experts(flag: str, value: float, model_type) -> LlmpError:
    return LlmpError(
        f"`{flag}` {value}: this {model_type} model has no mixture-of-experts layers; use `ratio` "
        "(heads, MLP channels, layers)"
    )


def check_experts(model: PreTrainedModel, config: PruneConfig) -> None:
    """Refuse ``experts`` for a model without MoE layers or a fraction that removes none or all.

    Raises:
        LlmpError: naming the argument, the value and what to do instead.
    """
    asked = _asked(config)
    if not asked:
        return
    adapter = adapter_for(model)
    if Kind.EXPERTS not in adapter.kinds:
        raise no_experts(*asked[0], getattr(model.config, "model_type", "?"))
    for group in adapter.discover(model, (Kind.EXPERT_CHANNELS,)).groups:
        if config.experts:
            experts_removed(config, group.blocks)
        if config.expert_channels:
            channels_removed(config, group.block_size)


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
    asked = _asked(config)
    if not asked:
        return
    n = expert_count(fields)
    if n is None:
        raise no_experts(*asked[0], model_type)
    if config.experts:
        experts_removed(config, n)
    width = fields.get("moe_intermediate_size") or fields.get("intermediate_size")
    if config.expert_channels and isinstance(width, int):
        removed_of(config.expert_channels, width, "expert_channels", "channels of each expert")


@torch.no_grad()
def prune_experts(
    model: PreTrainedModel,
    config: PruneConfig,
    calibration: torch.Tensor,
    agree: Callable[[dict[str, list[int]]], dict[str, list[int]]] | None = None,
    layers_io: Layers | None = None,
) -> list[Step]:
    """Remove ``config.experts`` of every MoE layer's experts, then ``config.expert_channels`` of
    each kept expert's channels, in place (module docstring), in one pass over the layers; one
    :class:`~llmp.record.Step` per kind, in that order (replay repeats them in turn). ``agree`` as
    in :func:`llmp.prune`; ``layers_io``: where the layers' weights live (streamed: read before
    their turn, written after)."""
    activations.require_calibration(calibration)
    adapter, io = adapter_for(model), layers_io or Layers()
    moe = [i for i, layer in enumerate(adapter.layers(model)) if sparse_block(layer) is not None]
    last, compute, timings = moe[-1], compute_dtype(model), Timings()
    before, plans, routing = count_parameters(model), {Kind.EXPERTS: {}, Kind.EXPERT_CHANNELS: {}}, {}
    inputs = layer_inputs(model, calibration, config.batch_size, compute)
    layers = adapter.layers(model)
    removed = dict.fromkeys(plans, 0)
    for i, layer in enumerate(layers if io.visits_all else layers[: last + 1]):
        io.load(i)
        with computing(layer, compute):
            if i in moe and config.experts:
                n = count_parameters(model)
                mine, routing[f"layers.{i}.experts"] = _experts_of_layer(model, i, config, inputs, timings, agree)
                plans[Kind.EXPERTS].update(mine)
                removed[Kind.EXPERTS] += n - count_parameters(model)
            if i in moe and config.expert_channels:
                n = count_parameters(model)
                plans[Kind.EXPERT_CHANNELS].update(_channels_of_layer(model, i, config, inputs, timings, agree))
                removed[Kind.EXPERT_CHANNELS] += n - count_parameters(model)
            if i < last:
                inputs = run_layer(layer, inputs)
        io.release(i)
    return _steps(model, config, plans, removed, routing, before, timings)


def _experts_of_layer(model, i: int, config: PruneConfig, inputs, timings: Timings, agree) -> tuple[dict, list]:
    """Score layer ``i``'s experts on ``inputs``, remove the lowest; (its plan, the routing shares)."""
    adapter = adapter_for(model)
    layer, group = adapter.layers(model)[i], adapter.expert_group(model, i)
    with timings.phase("scoring_s"), recording(sparse_block(layer)) as stats:
        run_layer(layer, inputs, whole=True)
    scores = stats.score(config.expert_criterion)
    order = sorted(range(group.size), key=lambda e: (float(scores[e]), e))  # ties: the lower index goes
    mine = {group.name: sorted(order[: experts_removed(config, group.size)])}
    mine = agree(mine) if agree is not None else mine
    with timings.phase("surgery_s"):
        surgery.apply(model, Structure(adapter.family, [group]), mine, adapter)
    return mine, [round(float(f), 6) for f in stats.score("frequency")]


def _channels_of_layer(model, i: int, config: PruneConfig, inputs, timings: Timings, agree) -> dict:
    """Score layer ``i``'s (kept) experts' channels on ``inputs``; each expert loses its lowest."""
    adapter = adapter_for(model)
    layer, group = adapter.layers(model)[i], adapter.expert_channel_group(model, i)
    block, refit = sparse_block(layer), config.compensate == "lstsq"
    with timings.phase("scoring_s"), channel_recording(block, gram=refit) as stats:
        run_layer(layer, inputs, whole=True)
    scores = channel_scores(block, stats)
    width = group.block_size
    k = channels_removed(config, width)
    lowest = scores.argsort(dim=1, stable=True)[:, :k]
    mine = {group.name: sorted(int(e * width + c) for e in range(group.blocks) for c in lowest[e])}
    mine = agree(mine) if agree is not None else mine
    with timings.phase("surgery_s"):
        gone = torch.zeros(group.blocks, width, dtype=torch.bool)
        gone.view(-1)[torch.as_tensor(mine[group.name], dtype=torch.long)] = True
        keep = (~gone).nonzero()[:, 1].reshape(group.blocks, -1)
        new_down = refit_down(block, stats, keep, config.ridge) if refit else None
        surgery.apply(model, Structure(adapter.family, [group]), mine, adapter)
        if new_down is not None:
            block.experts.down_proj.data = new_down
    return mine


def _steps(model, config: PruneConfig, plans: dict, removed: dict, routing: dict, before: int, timings) -> list[Step]:
    """The pass's steps: experts, then expert channels, each with the parameters it removed."""
    steps, params = [], before
    for number, (kind, plan) in enumerate(((k, p) for k, p in plans.items() if p), 1):
        step = step_record(model, config, plan, params, number, timings.seconds, [])
        step.kinds, step.params_after = [kind.value], params - removed[kind]
        step.routing = (routing or None) if kind is Kind.EXPERTS else None
        steps.append(step)
        params = step.params_after
    return steps
