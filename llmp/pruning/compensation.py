"""Compensation: what the removed heads / MLP channels contributed, kept in the output projection.

From the same input statistics as the activation criteria (:mod:`llmp.importance.activations`):

- ``bias``: ``b += W[:, R] · mean(x_R)`` (FLAP's baseline bias): the expected output of the
  removed columns ``R`` moves into the projection's bias.
- ``lstsq``: the kept columns ``K`` are refit to the dense output on the calibration inputs
  (centred ridge regression), and the bias takes the mean:
  ``W_K' = W_K + W_R Σ_RK (Σ_KK + λI)⁻¹``, ``b += W μ − W_K' μ_K``, with ``λ`` the config's ``ridge``
  times the mean of ``diag Σ_KK``. A large ridge pulls the refit toward the original weights:
  SparseGPT's 1% dampening overfits a few thousand calibration tokens
  (``docs/benchmarks/criteria.md``).

:func:`compensation` computes the new weights before surgery, from the full weights;
:func:`install` writes them after it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from llmp.errors import LlmpError
from llmp.importance.activations import InputStats, projections
from llmp.structure import Structure


@dataclass
class Refit:
    """What compensation writes into one output projection after surgery."""

    module: str
    bias: torch.Tensor  # the whole new bias (float64)
    weight: torch.Tensor | None = None  # lstsq: the kept columns, refit (float64)


@torch.no_grad()
def compensation(
    model: nn.Module,
    structure: Structure,
    plan: dict[str, list[int]],
    stats: dict[str, InputStats],
    mode: str,
    ridge: float = 1.0,
) -> list[Refit]:
    """The bias (and for ``lstsq`` weight) of every output projection that loses columns in ``plan``.

    Computed before surgery, from the full weights; :func:`install` puts them in after it.
    """
    if mode == "none":
        return []
    owners = projections(structure)
    refits = []
    uses = Counter(owners[g.name] for g in structure.groups if plan.get(g.name))
    for group in structure.groups:
        elements = plan.get(group.name, [])
        if not elements:
            continue
        name = owners[group.name]
        uses[name] -= 1
        module, s = model.get_submodule(name), stats[name]
        (writes,) = [sl for sl in group.slices if sl.writes]
        removed = writes.indices(torch.as_tensor(sorted(elements)))
        keep = torch.ones(module.in_features, dtype=torch.bool)
        keep[removed] = False
        kept = keep.nonzero().squeeze(1)
        if mode == "bias":
            w = module.weight.detach().double()
            mean = s.mean.to(w.device)
            refits.append(Refit(name, _bias(module) + w[:, removed] @ mean[removed]))
            continue
        if mode != "lstsq":
            raise LlmpError(f"`compensate` must be none, bias or lstsq; got {mode!r}")
        if s.gram is None:
            raise LlmpError("lstsq compensation needs the inputs' Gram matrix (collect(..., gram=True))")
        refits.append(Refit(name, *_ridge_refit(module, s, kept, removed, ridge, release=uses[name] == 0)))
    return refits


def _bias(module: nn.Linear) -> torch.Tensor:
    weight = module.weight
    return (
        module.bias.detach().double()
        if module.bias is not None
        else weight.new_zeros(weight.shape[0], dtype=torch.float64)
    )


def _ridge_refit(
    module: nn.Linear, stats: InputStats, kept, removed, ridge: float, release: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(bias, weight) of ``lstsq``: ``W_K' = W_K + W_R Σ_RK Σ_KK⁻¹`` (solve ``Σ_KK Xᵀ = Σ_KR W_Rᵀ``,
    Σ symmetric). Memory: the whole Gram goes once its blocks are taken (``release``: no later refit
    of this module reads it; statistics serve nothing after surgery), and Σ_KK once it is factored,
    so at most two float64 kept × kept matrices live at once, and the float64 weight only after."""
    device = module.weight.device
    c_kk = stats.covariance(kept, kept).to(device)
    c_kr = stats.covariance(kept, removed).to(device)
    if release:
        stats.gram = None
    w, bias = module.weight.detach().double(), _bias(module)
    c_kk.diagonal().add_(ridge * float(c_kk.diagonal().mean()) + 1e-12)
    factor, info = torch.linalg.cholesky_ex(c_kk)  # Σ_KK + λI is positive definite: half LU's work
    if int(info) == 0:
        del c_kk  # needed again only to solve without the factor
    rhs = c_kr @ w[:, removed].T
    del c_kr
    correction = torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(c_kk, rhs)
    del rhs, factor
    new_w = w[:, kept].add_(correction.T)
    del correction
    mean = stats.mean.to(w.device)
    return bias + w @ mean - new_w @ mean[kept], new_w


def install(model: nn.Module, refits: list[Refit]) -> list[str]:
    """Write ``refits`` into their (already pruned) modules; a module without a bias gets one.

    Returns the names of the modules that gained a bias.
    """
    gained = []
    for refit in refits:
        module = model.get_submodule(refit.module)
        dtype, device = module.weight.dtype, module.weight.device
        if refit.weight is not None:
            module.weight.data = refit.weight.to(dtype=dtype, device=device)
        if module.bias is None:
            module.bias = nn.Parameter(torch.empty(module.out_features, dtype=dtype, device=device))
            gained.append(refit.module)
        module.bias.data = refit.bias.to(dtype=dtype, device=device)
    return gained
