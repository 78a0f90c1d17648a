"""The equivalence check: physically pruning a structure must compute what masking it computes.

The pruner runs it before pruning a family found by automatic discovery; the tests run it on
every adapter. It sits after surgery in the data flow, so discovery does not import surgery.
"""

from __future__ import annotations

import copy

import torch
from transformers import PreTrainedModel

from llmp import surgery
from llmp.errors import LlmpError
from llmp.structure import Adapter, Kind, Structure
from llmp.structure.auto import DOCS
from llmp.structure.mapping import ALL_KINDS


def random_plan(structure: Structure, seed: int = 0) -> dict[str, list[int]]:
    """A removal from every group, of a different size in every layer (as a real plan may be)."""
    g = torch.Generator().manual_seed(seed)
    plan, seen = {}, set()
    for group in structure.groups:
        first = group.kind not in seen and group.layer is not None
        seen.add(group.kind)
        if first and len(structure.of_kind(group.kind)) > 1:
            continue  # the first layer keeps everything: counts differ across layers, as in real plans
        if group.kind is Kind.LAYERS:
            if group.size > 1:
                plan[group.name] = [int(torch.randint(0, group.size, (1,), generator=g))]
            continue
        if group.block_size < 2:
            continue
        per_block = int(torch.randint(1, group.block_size, (1,), generator=g))
        plan[group.name] = sorted(
            b * group.block_size + int(e)
            for b in range(group.blocks)
            for e in torch.randperm(group.block_size, generator=g)[:per_block]
        )
    return plan


def _max_error(model, structure, plan, adapter, inputs) -> tuple[float, float] | str:
    pruned, masked = copy.deepcopy(model).float(), copy.deepcopy(model).float()
    try:
        with torch.no_grad():
            surgery.mask(masked, structure, plan, adapter)
            surgery.apply(pruned, structure, plan, adapter)
            a = pruned(input_ids=inputs, use_cache=False).logits
            b = masked(input_ids=inputs, use_cache=False).logits
    except Exception as err:
        return f"{type(err).__name__}: {err}"
    return float((a - b).abs().max()), float(b.abs().max())


@torch.no_grad()
def verify(
    model: PreTrainedModel,
    structure: Structure,
    adapter: Adapter,
    samples: int = 2,
    seq_len: int = 8,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    seed: int = 0,
) -> None:
    """Refuse ``structure`` unless a random removal, applied, computes what masking it computes.

    Two float32 copies of ``model``: one physically pruned, one with the same elements masked;
    their logits on ``samples`` random sequences must agree within ``atol + rtol * max|logit|``.

    Raises:
        LlmpError: the pruned copy differs or fails to run; names the kinds and modules at fault.
    """
    plan = random_plan(structure, seed)
    if not plan:
        return
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    inputs = torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(seed)).to(device)
    result = _max_error(model, structure, plan, adapter, inputs)
    if not isinstance(result, str) and result[0] <= atol + rtol * result[1]:
        return
    failures = []
    kinds = sorted({g.kind for g in structure.groups}, key=ALL_KINDS.index)
    for kind in kinds if len(kinds) > 1 else kinds[:1]:
        groups = structure.of_kind(kind)
        sub_plan = {g.name: plan[g.name] for g in groups if g.name in plan}
        sub = Structure(structure.family, groups)
        res = _max_error(model, sub, sub_plan, adapter, inputs) if len(kinds) > 1 else result
        if isinstance(res, str) or res[0] > atol + rtol * res[1]:
            modules = sorted(
                {s.param.rpartition(".")[0] for g in groups for s in g.slices} | {m for g in groups for m in g.modules}
            )
            detail = res if isinstance(res, str) else f"max |Δlogit| {res[0]:.3g} vs max |logit| {res[1]:.3g}"
            failures.append(
                f"{kind.value} ({detail}; groups {', '.join(g.name for g in groups[:3])}; modules {', '.join(modules[:4])})"
            )
    model_type = getattr(model.config, "model_type", None)
    raise LlmpError(
        f"automatic discovery mapped `{model_type}` ({type(model).__name__}), but the equivalence check failed: "
        f"the pruned model does not compute what the masked model does for {'; '.join(failures) or 'the plan'}. "
        f"llmp refuses to prune it; write an adapter for this family in one file (see {DOCS})."
    )
