"""Importance: one score per group element, from weights, calibration gradients or activations.

::

    criteria.py       the criteria, one object each, in one registry (what each needs, its maths)
    score.py          score(): dispatch to the criterion's engine, reduce slices to elements
    gradients.py      the gradient engine (GradientScorer), one method per autograd event
    taps.py           a scored Linear: its weight gradient to the engine, never to .grad
    checkpointing.py  which layers recompute their activations in the backward
    loss.py           the calibration loss, the head run a few tokens at a time
    activations.py    the output projections' input statistics (flap, wanda, compensation)
    settings.py       ScoringSettings: the engine's memory policy, passed down
"""

from llmp.importance.criteria import (
    ACTIVATION,
    CRITERIA,
    REDUCTIONS,
    Criterion,
    CriterionSpec,
    Reduction,
    default_for,
    needs_calibration,
)
from llmp.importance.loss import calibration_loss
from llmp.importance.score import score
from llmp.importance.settings import ScoringSettings

__all__ = [
    "ACTIVATION",
    "CRITERIA",
    "REDUCTIONS",
    "Criterion",
    "CriterionSpec",
    "Reduction",
    "ScoringSettings",
    "calibration_loss",
    "default_for",
    "needs_calibration",
    "score",
]
