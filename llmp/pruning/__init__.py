"""Pruning: the drivers that take a model from dense to pruned, and what they share.

::

    config.py        PruneConfig: what to remove, checked once when made; layer ranges
    preflight.py     the checks every driver runs before any work
    oneshot.py       prune(): score the whole model, plan, apply, in one or more steps
    layerwise.py     one decoder layer at a time from its activations (in memory)
    layercalls.py    calling one decoder layer by itself (its inputs, its outputs, its dtype)
    streamed.py      the same, read from and written to disk (a model bigger than memory)
    compensation.py  what removed heads / channels contributed, kept in the output projection
    steps.py         removal targets, timings, the record (its one maker), replay
"""

from llmp.pruning.config import PruneConfig, layer_ranges, parse_range
from llmp.pruning.oneshot import prune
from llmp.pruning.preflight import preflight
from llmp.pruning.steps import RunInput, count_parameters, replay, unpruned_record
from llmp.pruning.streamed import prune_streamed

__all__ = [
    "PruneConfig",
    "RunInput",
    "count_parameters",
    "layer_ranges",
    "parse_range",
    "preflight",
    "prune",
    "prune_streamed",
    "replay",
    "unpruned_record",
]
