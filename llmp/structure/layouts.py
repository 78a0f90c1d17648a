"""What one traced fact means, for :mod:`llmp.structure.mapping`: an index layout as
:class:`Slice` objects, an attribute's or config field's name and value as a count, a module as
an RMSNorm.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from llmp.structure.groups import Slice


def attr_rule(name: str, value, n: int, n_kv: int, d: int) -> str | None:
    """Which head count an int attribute named ``name`` holds, if its name and value agree."""
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    low = name.lower()
    kv = "kv" in low or "key_value" in low
    if ("group" in low or "rep" in low) and value == n // n_kv:
        return "groups"
    if "head" in low and kv and value == n_kv and "dim" not in low:
        return "kv_heads"
    if "head" in low and not kv and value == n and "dim" not in low and "size" not in low:
        return "heads"
    if kv and ("dim" in low or "size" in low) and value == n_kv * d:
        return "kv_x_dim"
    if any(s in low for s in ("all_head", "inner_dim", "q_size", "attn_dim")) and value == n * d:
        return "heads_x_dim"
    return None


def config_rules(config, n_layers: int) -> dict[str, list[str]]:
    """The config's int fields that hold the layer count (``layers``) or the hidden size (``hidden``)."""
    rules: dict[str, list[str]] = {}
    for name, value in config.to_dict().items():
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        low = name.lower()
        if "layer" in low and value == n_layers and not low.startswith("max"):
            rules.setdefault("layers", []).append(name)
        elif low in ("hidden_size", "n_embd", "d_model", "dim"):
            rules.setdefault("hidden", []).append(name)
    return rules


def make_slices(param: str, dim: int, per_element: list[list[int]], writes: bool) -> list[Slice] | None:
    """Slices whose ``indices(e)`` are exactly ``per_element[e]``, or ``None`` if no regular layout.

    Each element's indices split into runs of consecutive indices; every element must have runs of
    the same widths. Run ``k`` becomes one slice: ``offset + e * stride`` when its starts are evenly
    spaced, a ``starts`` table otherwise (heads permuted by a gather).
    """
    runs = []
    for idx in per_element:
        idx = sorted(idx)
        r = []
        for x in idx:
            if r and x == r[-1][0] + r[-1][1]:
                r[-1][1] += 1
            else:
                r.append([x, 1])
        runs.append(r)
    if not runs or any([w for _, w in r] != [w for _, w in runs[0]] for r in runs) or not runs[0]:
        return None
    slices = []
    for k, (_, width) in enumerate(runs[0]):
        starts = [r[k][0] for r in runs]
        step = starts[1] - starts[0] if len(starts) > 1 else width
        if all(b - a == step for a, b in itertools.pairwise(starts)) and step >= 0:
            stride = None if step == width or len(starts) == 1 else step
            slices.append(Slice(param, dim, width, starts[0], stride, writes))
        else:
            slices.append(Slice(param, dim, width, 0, None, writes, starts=tuple(starts)))
    return slices


def dedupe(slices: list[Slice]) -> list[Slice]:
    """One slice per index set (tied weights appear as reader and writer): the writing one wins."""
    out: dict[tuple, Slice] = {}
    for s in slices:
        key = (s.param, s.dim, s.width, s.offset, s.stride, getattr(s, "starts", None))
        if key not in out or s.writes:
            out[key] = s
    return list(out.values())


@torch.no_grad()
def rms_form(module: nn.Module, size: int) -> tuple[str, str] | None:
    """``("w" | "1+w", eps attribute)`` if ``module`` computes an RMSNorm, else ``None``."""
    weight = getattr(module, "weight", None)
    params = list(module.parameters())
    if not isinstance(weight, torch.Tensor) or weight.shape != (size,) or len(params) != 1:
        return None
    eps_name = next(
        (n for n in ("variance_epsilon", "eps", "epsilon") if isinstance(getattr(module, n, None), float)), None
    )
    if eps_name is None:
        return None
    eps = getattr(module, eps_name)
    x = torch.randn(2, 3, size, generator=torch.Generator().manual_seed(0)).to(weight)
    try:
        y = module(x)
    except Exception:
        return None
    if not isinstance(y, torch.Tensor):
        return None
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    for form, gain in (("w", weight.float()), ("1+w", 1 + weight.float())):
        if torch.allclose(y.float(), normed * gain, atol=1e-4, rtol=1e-3):
            return form, eps_name
    return None
