"""Expert importance, from one calibration forward of a mixture-of-experts layer (no gradients).

Per expert ``j`` of a layer, over the calibration tokens ``x`` (``g_j(x)``: the weight the router
gives ``j`` after its top-k and renormalisation, as the model applies it; ``f_j(x)``: the expert's
output)::

    frequency        share of tokens routed to j
    router_weight    mean over all tokens of softmax(router logits)_j
    activation_norm  mean over the tokens routed to j of ‖f_j(x)‖₂
    reap             mean over the tokens routed to j of g_j(x)·‖f_j(x)‖₂   (REAP, Lasby et al. 2025)

``reap`` is the default: it is what an expert adds to the layer's output when it is chosen, which
neither how often it is chosen nor its gate alone says; REAP measured it ahead of frequency- and
merge-based criteria on generative tasks. llmp has no real MoE small enough to measure it here.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from llmp.structure.adapters.moe import router

ExpertCriterion = Literal["reap", "frequency", "router_weight", "activation_norm"]
EXPERT_CRITERIA: tuple[str, ...] = ("reap", "frequency", "router_weight", "activation_norm")


@dataclass
class ExpertStats:
    """Sums over the calibration tokens of one MoE layer, one entry per expert (float64)."""

    tokens: int
    routed: torch.Tensor  # tokens routed to the expert
    probability: torch.Tensor  # Σ softmax(logits)_j over all tokens
    norm: torch.Tensor  # Σ ‖f_j(x)‖ over routed tokens
    weighted_norm: torch.Tensor  # Σ g_j(x)·‖f_j(x)‖ over routed tokens

    @classmethod
    def empty(cls, n: int) -> ExpertStats:
        zeros = [torch.zeros(n, dtype=torch.float64) for _ in range(4)]
        return cls(0, *zeros)

    def score(self, criterion: str) -> torch.Tensor:
        """Higher is more important; an expert no token chose scores 0 under every criterion but ``router_weight``."""
        per_routed = self.routed.clamp(min=1)
        if criterion == "frequency":
            return self.routed / max(self.tokens, 1)
        if criterion == "router_weight":
            return self.probability / max(self.tokens, 1)
        if criterion == "activation_norm":
            return self.norm / per_routed
        if criterion == "reap":
            return self.weighted_norm / per_routed
        raise ValueError(f"unknown expert criterion {criterion!r}; one of {', '.join(EXPERT_CRITERIA)}")


@torch.no_grad()
def _expert_outputs(experts: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert ``e``'s output for the rows ``x`` (the fused layout: [gate; up] rows, then down)."""
    gate, up = nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


@contextmanager
def recording(block: nn.Module) -> Iterator[ExpertStats]:
    """Accumulate :class:`ExpertStats` of the sparse MoE ``block`` over every forward inside the block."""
    gate = router(block)
    n = gate.weight.shape[0]
    stats = ExpertStats.empty(n)

    def on_router(_module, _args, output) -> None:
        logits = output[0].reshape(-1, n)
        stats.probability += torch.softmax(logits.double(), dim=-1).sum(0).cpu()
        stats.tokens += logits.shape[0]

    def experts(module, args, _output) -> None:
        hidden, index, weights = args[:3]
        for e in index.unique().tolist():
            if not 0 <= e < n:
                continue
            rows, slot = torch.where(index == e)
            norms = _expert_outputs(module, e, hidden[rows]).double().norm(dim=-1)
            stats.routed[e] += len(rows)
            stats.norm[e] += norms.sum().cpu()
            stats.weighted_norm[e] += (weights[rows, slot].double() * norms).sum().cpu()

    handles = [gate.register_forward_hook(on_router), block.experts.register_forward_hook(experts)]
    try:
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@dataclass
class ChannelStats:
    """Per expert, over the tokens routed to it, of ``u = g_j(x)·a(x)`` (the gate-weighted inputs of
    its ``down_proj``): ``energy`` ``Σ u_c²`` [experts, width], float64, and with ``gram`` the
    uncentred ``Σ u uᵀ`` [experts, width, width], float32 (the least-squares refit's)."""

    energy: torch.Tensor
    gram: torch.Tensor | None = None


@contextmanager
def channel_recording(block: nn.Module, gram: bool = False) -> Iterator[ChannelStats]:
    """Accumulate :class:`ChannelStats` over every forward inside the MoE ``block``.

    A channel's energy times the squared norm of its ``down_proj`` column is its mean squared
    contribution to the layer's output: FLAP's fluctuation and Wanda's ``|W|·‖X‖`` score channels
    the same way, by what they write.
    """
    experts = block.experts
    n, width = experts.down_proj.shape[0], experts.down_proj.shape[2]
    stats = ChannelStats(torch.zeros(n, width, dtype=torch.float64))
    if gram:
        stats.gram = torch.zeros(n, width, width, dtype=torch.float32)

    def hook(module, args, _output) -> None:
        hidden, index, weights = args[:3]
        for e in index.unique().tolist():
            if not 0 <= e < n:
                continue
            rows, slot = torch.where(index == e)
            gate, up = nn.functional.linear(hidden[rows], module.gate_up_proj[e]).chunk(2, dim=-1)
            u = (module.act_fn(gate) * up * weights[rows, slot, None]).float()
            stats.energy[e] += u.double().pow(2).sum(0).cpu()
            if stats.gram is not None:
                stats.gram[e] += (u.T @ u).cpu()

    handle = experts.register_forward_hook(hook)
    try:
        yield stats
    finally:
        handle.remove()


def channel_scores(block: nn.Module, stats: ChannelStats) -> torch.Tensor:
    """``[experts, width]``: each channel's energy times its ``down_proj`` column's squared norm."""
    columns = block.experts.down_proj.detach().double().pow(2).sum(1).cpu()
    return stats.energy * columns


def refit_down(block: nn.Module, stats: ChannelStats, keep: torch.Tensor, ridge: float) -> torch.Tensor:
    """Each expert's ``down_proj`` on its kept channels ``keep`` [experts, kept], refit by ridge
    least squares to what the whole expert wrote on its routed tokens (as
    :mod:`llmp.pruning.compensation`'s ``lstsq``, uncentred: experts have no bias):
    ``W_K' = W_K + W_R Σ_RK (Σ_KK + λI)⁻¹``, λ = ``ridge`` × mean diag Σ_KK. Returns [experts, hidden, kept]."""
    down = block.experts.down_proj.detach()
    out = []
    for e in range(down.shape[0]):
        k = keep[e].cpu()
        r = torch.ones(down.shape[2], dtype=torch.bool)
        r[k] = False
        sigma = stats.gram[e].double()
        s_kk, s_kr = sigma[k][:, k], sigma[k][:, r]
        s_kk.diagonal().add_(ridge * float(s_kk.diagonal().mean()) + 1e-12)
        w = down[e].double().cpu()
        correction = torch.linalg.solve(s_kk, s_kr @ w[:, r].T).T  # W_R Σ_RK Σ_KK⁻¹ (Σ symmetric)
        out.append((w[:, k] + correction).to(down.dtype))
    return torch.stack(out).to(down.device)
