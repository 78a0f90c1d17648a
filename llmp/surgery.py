"""Surgery: physically remove planned elements, or mask them (the reference the removal must equal)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.plan import Plan
from llmp.structure import Adapter, Kind, Structure

"""Group name → indices of the elements to remove."""


def _params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())


@torch.no_grad()
def apply(model: PreTrainedModel, structure: Structure, plan: Plan, adapter: Adapter) -> None:
    """Remove the planned elements from ``model`` in place: weights are sliced, not masked.

    Every slice of a group loses the indices of the removed elements; then the adapter brings
    attributes the forward reads (head counts, layer indices, config) in line with the weights.
    """
    check_plan(structure, plan)
    params = _params(model)
    drop: dict[tuple[str, int], list[torch.Tensor]] = defaultdict(list)
    hidden_before = model.config.hidden_size
    hidden_removed = 0
    for group in structure.groups:
        elements = plan.get(group.name, [])
        if not elements or group.kind is Kind.LAYERS:
            continue
        if group.kind is Kind.EXPERT_CHANNELS:  # per-expert gathers of shared 3-D tensors
            adapter.cut_expert_channels(model, group, sorted(elements))
            continue
        adapter.note_removal(model, group, sorted(elements))
        index = torch.as_tensor(sorted(elements), dtype=torch.long)
        for s in group.slices:
            drop[(s.param, s.dim)].append(s.indices(index))
        if group.kind is Kind.HIDDEN:
            hidden_removed += len(elements)
    for (name, dim), parts in drop.items():
        param = params[name]
        size = param.shape[dim]
        keep = torch.ones(size, dtype=torch.bool)
        keep[torch.cat(parts)] = False
        param.data = param.data.index_select(dim, keep.nonzero().squeeze(1).to(param.device))
        param.grad = None
    sync_module_sizes(model)
    if hidden_removed:
        adapter.rescale_hidden(model, hidden_before, hidden_before - hidden_removed)
    for group in structure.of_kind(Kind.LAYERS):
        if plan.get(group.name):
            adapter.remove_layers(model, sorted(plan[group.name]))
    adapter.sync(model)


def check_plan(structure: Structure, plan: Plan) -> None:
    """Reject removals the model cannot run with.

    Raises:
        LlmpError: unknown group, index out of range or repeated, a whole group removed, or blocks
            (query heads of one KV group) losing different numbers of elements.
    """
    groups = {g.name: g for g in structure.groups}
    problems = []
    for name, elements in plan.items():
        group = groups.get(name)
        if group is None:
            problems.append(f"the plan names group {name!r}, which the model does not have")
            continue
        if len(set(elements)) != len(elements) or any(not 0 <= e < group.size for e in elements):
            problems.append(f"group {name}: element indices must be distinct and in [0, {group.size}); got {elements}")
            continue
        per_block = [sum(1 for e in elements if e // group.block_size == b) for b in range(group.blocks)]
        if len(set(per_block)) > 1:
            problems.append(f"group {name}: every KV group must lose the same number of query heads; got {per_block}")
        elif per_block[0] >= group.block_size:
            problems.append(
                f"group {name}: removing all {group.block_size} elements of a block leaves nothing to compute"
            )
    if problems:
        raise LlmpError("; ".join(problems))


def sync_module_sizes(model: nn.Module) -> None:
    """Record the new weight shapes in the torch modules' own size attributes."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
        elif isinstance(module, nn.Embedding):
            module.num_embeddings, module.embedding_dim = module.weight.shape


@torch.no_grad()
def mask(model: PreTrainedModel, structure: Structure, plan: Plan, adapter: Adapter) -> None:
    """Zero what the planned elements write into the residual stream (shapes unchanged).

    The result is the function that :func:`apply` must reproduce with the smaller model.
    """
    params = _params(model)
    for group in structure.groups:
        elements = plan.get(group.name, [])
        if not elements:
            continue
        if group.kind is Kind.LAYERS:
            for i in elements:
                for name in adapter.layer_writes(model, i):
                    params[name].zero_()
            continue
        if group.kind is Kind.EXPERTS:  # a zero expert would still take its share of the routing
            adapter.mask_experts(model, group, elements)
            continue
        if group.kind is Kind.EXPERT_CHANNELS:
            adapter.cut_expert_channels(model, group, sorted(elements), mask=True)
            continue
        index = torch.as_tensor(sorted(elements), dtype=torch.long)
        for s in group.slices:
            if s.writes:
                params[s.param].index_fill_(s.dim, s.indices(index), 0.0)
