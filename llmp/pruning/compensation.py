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
    for group in structure.groups:
        elements = plan.get(group.name, [])
        if not elements:
            continue
        name = owners[group.name]
        module, s = model.get_submodule(name), stats[name]
        (writes,) = [sl for sl in group.slices if sl.writes]
        removed = writes.indices(torch.as_tensor(sorted(elements)))
        keep = torch.ones(module.in_features, dtype=torch.bool)
        keep[removed] = False
        kept = keep.nonzero().squeeze(1)
        w = module.weight.detach().double()
        bias = module.bias.detach().double() if module.bias is not None else w.new_zeros(module.out_features)
        mean = s.mean.to(w.device)
        if mode == "bias":
            refits.append(Refit(name, bias + w[:, removed] @ mean[removed]))
            continue
        if mode != "lstsq":
            raise LlmpError(f"`compensate` must be none, bias or lstsq; got {mode!r}")
        if s.gram is None:
            raise LlmpError("lstsq compensation needs the inputs' Gram matrix (collect(..., gram=True))")
        c_kk, c_kr = s.covariance(kept, kept).to(w.device), s.covariance(kept, removed).to(w.device)
        c_kk.diagonal().add_(ridge * float(c_kk.diagonal().mean()) + 1e-12)
        # W_K' = W_K + W_R Σ_RK Σ_KK⁻¹ (solve Σ_KK Xᵀ = Σ_KR W_Rᵀ, Σ symmetric)
        rhs = c_kr @ w[:, removed].T
        factor, info = torch.linalg.cholesky_ex(c_kk)  # Σ_KK + λI is positive definite: half LU's work
        correction = (torch.cholesky_solve(rhs, factor) if int(info) == 0 else torch.linalg.solve(c_kk, rhs)).T
        new_w = w[:, kept] + correction
        refits.append(Refit(name, bias + w @ mean - new_w @ mean[kept], new_w))
    return refits


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
