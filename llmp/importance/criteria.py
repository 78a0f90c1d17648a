"""The criteria: one object each, registered in :data:`CRITERIA`, the one place a criterion is added.

(``w`` a weight, ``g`` the gradient of the mean calibration loss, ``F`` the mean of per-sample
squared gradients, the Fisher approximation of the Hessian diagonal, ``x`` an output projection's
input channel):

=============  =====================================  ===========
criterion      per weight, summed over an element      needs
=============  =====================================  ===========
``taylor``     ``|w·g|``                               gradients
``taylor2``    ``w²·F`` (second-order Taylor term)     gradients (per sample)
``taylor_mix`` ``|w·g − ½·w²·F|``                       gradients (per sample)
``vectorwise`` ``|Σ_row w·g|`` (signs cancel in a row)  gradients
``flap``       ``Var(x)·‖w‖²`` of the output projection    activations
``wanda``      ``‖x‖·|w|`` of the output projection        activations
``l1``/``l2``  ``|w|`` / ``w²``                          nothing
``random``     uniform noise                            nothing
=============  =====================================  ===========

Each criterion declares what it ``needs``; whether a run reads calibration text, the choices of
``criterion`` and the per-model default (:func:`default_for`) follow from that.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

Needs = Literal["nothing", "activations", "gradients"]


def reduce_to(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum ``x`` over every dimension but ``dim``."""
    if x.dim() == 1:
        return x
    return x.sum(dim=[d for d in range(x.dim()) if d != dim])


class CriterionSpec:
    """What a criterion computes and what it needs. Per-weight criteria give a salience per weight
    (:meth:`salience`), summed over each element's slices (:meth:`reduce`) and over the whole
    parameter (:meth:`total`, for whole layers)."""

    name: ClassVar[str]
    needs: ClassVar[Needs]
    per_sample: ClassVar[bool] = False
    """scored from each sample's own gradient (one sample per backward)"""

    def salience(self, w: torch.Tensor, g: torch.Tensor | None, f: torch.Tensor | None) -> torch.Tensor:
        """Per-weight salience; may work in place on ``g``, which the caller gives up."""
        raise NotImplementedError

    def reduce(self, salience: torch.Tensor, dim: int) -> torch.Tensor:
        return reduce_to(salience, dim)

    def total(self, salience: torch.Tensor) -> float:
        """The whole parameter's salience; called after every :meth:`reduce`."""
        return float(salience.sum())


class Taylor(CriterionSpec):
    name, needs = "taylor", "gradients"

    def salience(self, w, g, f):
        return g.mul_(w).abs_()  # the float32 gradient times the weight as it is (promoted exactly)


class Vectorwise(CriterionSpec):
    name, needs = "vectorwise", "gradients"

    def salience(self, w, g, f):
        return g.mul_(w)  # signed: the sum over a row is taken before the absolute value

    def reduce(self, salience, dim):
        return reduce_to(salience, dim).abs()

    def total(self, salience):  # called after reduce: the signed products are no longer needed
        return float(salience.abs_().sum())


class Taylor2(CriterionSpec):
    """Summed per sample: ``w²·F = Σ_s (w·g_s)² / n``, so no Fisher diagonal is ever held."""

    name, needs, per_sample = "taylor2", "gradients", True

    def sample_salience(self, w: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
        return (w * g).pow_(2).div_(n)


class TaylorMix(CriterionSpec):
    name, needs, per_sample = "taylor_mix", "gradients", True

    def salience(self, w, g, f):
        return (w * g - 0.5 * w * w * f).abs()


class L1(CriterionSpec):
    name, needs = "l1", "nothing"

    def salience(self, w, g, f):
        return w.abs()


class L2(CriterionSpec):
    name, needs = "l2", "nothing"

    def salience(self, w, g, f):
        return w * w


class Random(CriterionSpec):
    name, needs = "random", "nothing"

    def scores(self, sizes: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return {name: torch.rand(size, generator=generator, dtype=torch.float64) for name, size in sizes.items()}


class ActivationCriterion(CriterionSpec):
    """Scores an output projection's input channels from their statistics
    (:class:`llmp.importance.activations.InputStats`); an element sums its channels."""

    needs = "activations"

    def channel_scores(self, weight: torch.Tensor, stats) -> torch.Tensor:
        raise NotImplementedError


class Flap(ActivationCriterion):
    """FLAP's fluctuation (An et al., 2024): ``Var(x_j) · ‖W[:, j]‖²``."""

    name = "flap"

    def channel_scores(self, weight, stats):
        return stats.variance * weight.detach().double().pow(2).sum(0)


class Wanda(ActivationCriterion):
    """Wanda-sp in FLAP's form: ``‖x_j‖₂ · Σ_i |W[i, j]|``."""

    name = "wanda"

    def channel_scores(self, weight, stats):
        return stats.norm * weight.detach().double().abs().sum(0)


CRITERIA: dict[str, CriterionSpec] = {
    c.name: c for c in (Taylor(), Taylor2(), TaylorMix(), Vectorwise(), Flap(), Wanda(), L1(), L2(), Random())
}
"""Every criterion by name, in the order ``--help`` lists them."""

Criterion = Literal[tuple(CRITERIA)]  # the choices of `criterion`, derived from the registry
Reduction = Literal["sum", "mean", "max", "prod", "first"]
REDUCTIONS: tuple[str, ...] = Reduction.__args__
ACTIVATION: tuple[str, ...] = tuple(n for n, c in CRITERIA.items() if c.needs == "activations")
"""Criteria from calibration activations, without gradients."""


def needs_calibration(criterion: str) -> bool:
    """Whether ``criterion`` scores from calibration text (gradients or activations) or from weights alone."""
    return CRITERIA[criterion].needs != "nothing"


def default_for(activation_ready: bool) -> str:
    """The criterion of an unset ``criterion``: the activation criterion where every pruned group
    writes through the input columns of one linear layer (forward only, and its statistics serve
    the least-squares refit too), else first-order Taylor (gradients reach every kind)."""
    return "flap" if activation_ready else "taylor"
