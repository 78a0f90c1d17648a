"""Gradient-free pruning from the inputs of the output projections: criteria and compensation.

Every head / KV group and MLP channel writes into the residual stream through the input columns
of one output projection (``o_proj``, ``down_proj``: the group's ``writes`` slice). A forward over
the calibration text (no backward) records, per input channel ``j`` of those projections, the
token count, ``Σx_j`` and ``Σx_j²`` (and for ``lstsq`` the whole ``XᵀX``):

=============  ===============================================  =========================
criterion      per input channel ``j`` of the output projection  from
=============  ===============================================  =========================
``flap``       ``Var(x_j) · ‖W[:, j]‖²`` (fluctuation, WIFV)     FLAP (An et al., 2024)
``wanda``      ``‖x_j‖₂ · Σ_i |W[i, j]|``                          Wanda-sp (FLAP's form)
=============  ===============================================  =========================

summed over an element's channels (a head owns ``head_dim`` of them). Compensation keeps what the
removed channels contributed on average:

- ``bias``: ``b += W[:, R] · mean(x_R)`` (FLAP's baseline bias), the expected output of the
  removed columns ``R`` moves into the projection's bias.
- ``lstsq``: the kept columns ``K`` are refit to the dense output on the calibration inputs
  (centred ridge regression), and the bias takes the mean:
  ``W_K' = W_K + W_R Σ_RK (Σ_KK + λI)⁻¹``, ``b += W μ − W_K' μ_K``, with ``λ`` the mean of
  ``diag Σ_KK`` (:data:`RIDGE` 1.0). Chosen by measurement, not by analogy: SparseGPT's 1%
  dampening overfits the few thousand calibration tokens (SmolLM2-135M, 20% of MLP channels,
  64 × 128 C4 tokens, WikiText-2 PPL: λ = 0.01 → 98.3, 1.0 → 93.2, 3.0 → 94.3; bias alone 99.7;
  ``python bench/criteria.py --runs flap:lstsq:0.01,flap:lstsq:1.0,flap:lstsq:3.0``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from llmp.errors import LlmpError
from llmp.structure import Group, Kind, Structure, adapter_for

RIDGE = 1.0
"""λ of the ``lstsq`` refit, as a fraction of the mean input variance (see the module docstring)."""


@dataclass
class InputStats:
    """Running sums over the tokens seen by one linear module's input channels (float64)."""

    count: int
    sum: torch.Tensor
    sum_squares: torch.Tensor
    gram: torch.Tensor | None = None  # Σ x xᵀ, for lstsq

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        return (self.sum_squares / max(self.count, 1) - self.mean**2).clamp_min(0)

    @property
    def norm(self) -> torch.Tensor:
        return self.sum_squares.sqrt()

    def covariance(self, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
        """The inputs' covariance, or its ``rows`` × ``cols`` block (index tensors), made in one
        allocation of the block's size."""
        mean, n = self.mean, max(self.count, 1)
        if rows is None or cols is None:
            return torch.addr(self.gram, mean, mean, beta=1 / n, alpha=-1)
        block = self.gram[rows[:, None], cols]
        return block.addr_(mean[rows], mean[cols], beta=1 / n, alpha=-1)

    def add(self, x: torch.Tensor) -> None:
        # Sums over one batch in float32 (no float64 copy of the activations), across batches in float64.
        x = x.reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.sum += x.sum(0).double()
        self.sum_squares += (x * x).sum(0).double()
        if self.gram is not None:
            self.gram += x.T @ x  # float32 product summed into float64: no float64 copy of it


def projections(structure: Structure) -> dict[str, str]:
    """Group name → the module whose input columns are the group's ``writes`` slice.

    Raises:
        LlmpError: a group of another kind than heads / MLP channels, or a ``writes`` slice that
            is not the input side of one ``nn.Linear`` weight.
    """
    found = {}
    for group in structure.groups:
        if group.kind not in (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP):
            raise LlmpError(
                f"the activation criteria and compensation work on heads and MLP channels (`scope` block); "
                f"got a group of {group.kind.value}: use criterion taylor and `compensate` none there"
            )
        writes = [s for s in group.slices if s.writes]
        if len(writes) != 1 or not writes[0].param.endswith(".weight") or writes[0].dim != 1:
            raise LlmpError(
                f"group {group.name}: its output is not the input columns of one linear weight, so the "
                "activation criteria and compensation cannot be used for this family"
            )
        found[group.name] = writes[0].param.removesuffix(".weight")
    return found


@contextmanager
def recording(model: nn.Module, modules: list[str], gram: bool = False) -> Iterator[dict[str, InputStats]]:
    """Record :class:`InputStats` of each of ``modules``' inputs during the forwards run inside."""
    stats, handles = {}, []
    for name in dict.fromkeys(modules):
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise LlmpError(f"{name} is a {type(module).__name__}, not a linear layer: its inputs cannot be recorded")
        n = module.in_features
        zeros = torch.zeros(n, dtype=torch.float64, device=module.weight.device)
        stats[name] = InputStats(0, zeros.clone(), zeros.clone(), zeros.new_zeros(n, n) if gram else None)
        handles.append(module.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0].detach())))
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def collect(
    model: nn.Module, modules: list[str], calibration: torch.Tensor, batch_size: int | None = None, gram: bool = False
) -> dict[str, InputStats]:
    """Input statistics of ``modules`` over a forward of ``calibration`` (``[N, L]`` token ids)."""
    require_calibration(calibration)
    was_training = model.training
    model.eval()
    # Nothing after the last recorded layer is needed: stop there (no logits for every token).
    adapter = adapter_for(model)
    prefix = adapter.layers_path + "."
    owners = [int(name.removeprefix(prefix).partition(".")[0]) for name in modules if name.startswith(prefix)]
    stop = adapter.layers(model)[max(owners)].register_forward_hook(_stop) if owners else None
    try:
        with recording(model, modules, gram) as stats:
            run_batches(model, calibration, batch_size)
    finally:
        model.train(was_training)
        if stop is not None:
            stop.remove()
    return stats


class Stop(Exception):
    """Raised by a hook once the forward has given what is needed: :func:`run_batches` ends it there."""


def _stop(*_args) -> None:
    raise Stop


def run_batches(model: nn.Module, calibration: torch.Tensor, batch_size: int | None) -> None:
    """Forward ``calibration`` in batches of ``batch_size`` (``None``: one), each ended early by a
    hook raising :class:`Stop`."""
    device = model.get_input_embeddings().weight.device
    step = calibration.shape[0] if batch_size is None else max(1, batch_size)
    for start in range(0, calibration.shape[0], step):
        try:
            model(input_ids=calibration[start : start + step].to(device), use_cache=False)
        except Stop:
            pass


def require_calibration(calibration: torch.Tensor | None) -> None:
    """Raises:
    LlmpError: no calibration tokens."""
    if calibration is None or calibration.numel() == 0:
        raise LlmpError(
            "the activation criteria (flap, wanda) and compensation need calibration tokens and `calibration` "
            "is empty: pass token ids (e.g. from llmp.data.calibration_samples)"
        )


def channel_scores(weight: torch.Tensor, stats: InputStats, criterion: str) -> torch.Tensor:
    """Score of every input channel of a linear ``weight`` ``[out, in]`` (float64)."""
    w = weight.detach().double()
    if criterion == "flap":
        return stats.variance * w.pow(2).sum(0)
    if criterion == "wanda":
        return stats.norm * w.abs().sum(0)
    raise LlmpError(f"unknown activation criterion {criterion!r}; expected flap or wanda")


def group_scores(group: Group, channels: torch.Tensor) -> torch.Tensor:
    """Per-element scores of ``group`` from its output projection's per-channel scores."""
    (writes,) = [s for s in group.slices if s.writes]
    index = writes.indices(torch.arange(group.size))
    return channels[index].view(group.size, writes.width).sum(1)


def score(
    model: nn.Module, structure: Structure, stats: dict[str, InputStats], criterion: str
) -> dict[str, torch.Tensor]:
    """Group name → float64 scores of its elements (higher = more important)."""
    owners = projections(structure)
    return {
        g.name: group_scores(
            g, channel_scores(model.get_submodule(owners[g.name]).weight, stats[owners[g.name]], criterion)
        )
        for g in structure.groups
    }


@dataclass
class Refit:
    """What compensation writes into one output projection after surgery."""

    module: str
    bias: torch.Tensor  # the whole new bias (float64)
    weight: torch.Tensor | None = None  # lstsq: the kept columns, refit (float64)


@torch.no_grad()
def compensation(
    model: nn.Module, structure: Structure, plan: dict[str, list[int]], stats: dict[str, InputStats], mode: str
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
        module, s = model.get_submodule(name), stats[owners[group.name]]
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
        c_kk.diagonal().add_(RIDGE * float(c_kk.diagonal().mean()) + 1e-12)
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
