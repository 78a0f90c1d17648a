"""``PruneConfig``: what to remove and how to choose it, checked once when it is made.

The user's fields stay as written; :meth:`PruneConfig.resolved` returns a new config with the
unset fields decided for a model (what the record keeps). Layer ranges (``"A:B"``) are parsed
here and checked against a model by :func:`layer_ranges`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from llmp import importance
from llmp.errors import LlmpError, raise_all
from llmp.importance import ACTIVATION, CRITERIA, Criterion, Reduction, ScoringSettings, needs_calibration
from llmp.importance.activations import projections
from llmp.importance.experts import ExpertCriterion
from llmp.structure import Kind, adapter_for
from llmp.targets import TARGET_ALIGN, Target
from llmp.validate import literal_problems

DEFAULT_RATIO = 0.2
Scope = Literal["block", "channel", "layer"]
Attention = Literal["query", "kv", "none"]


@dataclass
class PruneConfig:
    """What to remove and how to choose it (each field's docstring is its ``--help`` text).

    Unset ``criterion``, ``compensate`` and ``layerwise`` take the defaults measured best
    (docs/pruning.md), decided per model by :meth:`resolved`.
    """

    ratio: float | None = None
    """fraction of all model parameters to remove, in [0, 1) (unset: 0.2, or 0 with `experts`)"""
    experts: float = 0.0
    """fraction of the experts of every mixture-of-experts layer to remove, the lowest-scored by
    expert_criterion (the same count in every layer, so plain transformers loads the result); alone
    it prunes nothing else; with `ratio`, the other kinds then remove that fraction of the original
    model's parameters on top"""
    expert_channels: float = 0.0
    """fraction of the MLP channels of every expert to remove (the same count from each, so the
    experts keep one width), after `experts`; scored by what each channel writes: its routed,
    gate-weighted activation energy times its down_proj column's squared norm"""
    expert_criterion: ExpertCriterion = "reap"
    """how experts are scored, from one calibration forward: reap (mean gate × output norm over the
    tokens routed to the expert), frequency, router_weight, activation_norm; see llmp.importance.experts"""
    scope: Scope = "block"
    """block (attention heads and MLP channels inside layers), channel (hidden channels of the
    whole model) or layer (whole decoder layers)"""
    attention: Attention = "none"
    """in block scope: remove query heads evenly inside each KV group (query), whole KV groups
    (kv; the same as heads for MHA), or no heads (none: MLP only)"""
    mlp: bool = True
    """in block scope, remove MLP channels"""
    layers: str | None = None
    """A:B range of layers (0-based, B excluded) that may be pruned, for heads, MLP channels and
    whole layers; unset: every layer but the first and the last, which are the most sensitive"""
    attn_layers: str | None = None
    """range for heads alone (overrides layers)"""
    mlp_layers: str | None = None
    """range for MLP channels alone (overrides layers)"""
    criterion: Criterion | None = None
    """importance criterion: taylor, taylor2, taylor_mix, vectorwise (calibration gradients), flap,
    wanda (calibration activations, no gradients), l1, l2, random (weights only); see
    llmp.importance; unset: flap for heads and MLP channels, taylor for hidden channels and layers"""
    reduction: Reduction = "sum"
    """how one element's slice scores combine"""
    ranking: Literal["layer", "global"] = "layer"
    """layer (each group's own lowest-scored elements, as many as the allocation gives it) or global
    (one ranking over all layers)"""
    allocation: Literal["uniform", "depth", "sensitivity", "search"] = "uniform"
    """how many elements each layer loses (layer ranking, block scope): uniform (the same fraction
    everywhere), depth (deeper layers more), sensitivity (layers that change their input least
    more), search (an evolutionary search judged by KL to the dense model's logits; needs flap or
    wanda layer by layer, in memory); see llmp.allocation"""
    search_seconds: float = 600.0
    """allocation search: stop starting generations after this many seconds"""
    search_generations: int | None = None
    """allocation search: stop after this many generations (unset: only search_seconds bounds it)"""
    min_keep: float = 0.0
    """fraction of every group always kept (at least one head per KV group)"""
    round_to: int = 1
    """kept MLP / hidden channels are a multiple of this"""
    compensate: Literal["none", "bias", "lstsq"] | None = None
    """after removing heads / MLP channels, keep their mean output as a bias of the output
    projection (bias, FLAP's), or also refit the kept columns by ridge least squares on the
    calibration inputs (lstsq); see llmp.pruning.compensation; unset: lstsq with flap and wanda, else none"""
    ridge: float = 1.0
    """lstsq's ridge λ, as a multiple of the kept inputs' mean variance: larger stays closer to the
    kept weights, smaller fits the calibration text closer"""
    layout: Literal["heterogeneous", "uniform"] = "heterogeneous"
    """heterogeneous, or uniform (the same counts in every layer: a plain Hugging Face config)"""
    target: Target = "any"
    """where the model will run, which keeps the pruning inside what that engine loads: gguf
    (llama.cpp via `llmp export --format gguf`: kept MLP/hidden channels a multiple of 32, so q8_0
    takes every matrix), vllm (vLLM's DeciLM via `llmp export --format decilm`: the same query heads
    in every layer, so attention none; channels a multiple of 64), hf (plain transformers: layout
    uniform), any (llmp.load_pruned; llama.cpp too for Llama-layout families)"""
    steps: int = 1
    """prune in this many steps, re-scoring between them"""
    layerwise: bool | None = None
    """activation criteria: score, prune and compensate one decoder layer at a time, each on the
    outputs of the layers already pruned (SparseGPT/FLAP order; what --stream does); off: every
    layer scored on the dense model in one forward; unset: on for flap and wanda in one step"""
    batch_size: int | None = None
    """calibration samples per forward/backward; unset: all in one, the fastest, and then no summed
    gradient of every weight is kept between batches (first-order criteria)"""
    checkpointing: bool = True
    """recompute activations in the calibration backward instead of keeping them: the top layers
    keep their projections' outputs within a budget (llmp.importance.ScoringSettings) and recompute
    only elementwise work and attention, the others keep only their input (off: faster, more memory)"""
    seed: int = 0
    """for sampling and the random criterion"""

    def __post_init__(self) -> None:
        raise_all(self.problems())  # a config that exists is valid

    def resolved(self, model: PreTrainedModel) -> PruneConfig:
        """A new config with everything decided for ``model`` (what the record keeps); this one is
        left as the user wrote it:

        - ``criterion``: :func:`llmp.importance.default_for` whether the activation criteria can
          score every pruned group (heads and MLP channels of families with ``nn.Linear``
          projections), else taylor (hidden channels, layers, GPT-2's ``Conv1D``);
        - ``compensate``: lstsq with an activation criterion, unless a uniform layout could then
          not declare its biases to plain transformers (a family without ``bias_flags``); else none;
        - ``layerwise``: on for an activation criterion in one step;
        - ``target``'s envelope: hf takes a uniform layout, gguf and vllm round kept channels to
          their alignment (:data:`llmp.targets.TARGET_ALIGN`).
        """
        adapter = adapter_for(model)
        layout = "uniform" if self.target == "hf" else self.layout
        round_to = math.lcm(self.round_to, TARGET_ALIGN.get(self.target, 1))
        criterion, compensate, layerwise = self.criterion, self.compensate, self.layerwise
        if criterion is None:
            criterion = importance.default_for(self.scope == "block" and _activation_ready(model, self))
        by_activations = CRITERIA[criterion].needs == "activations"
        if compensate is None:
            flags = adapter.bias_flags
            declarable = layout == "heterogeneous" or (flags and all(hasattr(model.config, f) for f in flags))
            compensate = "lstsq" if by_activations and declarable else "none"
        if layerwise is None:
            layerwise = by_activations and self.steps == 1
        return dataclasses.replace(
            self,
            ratio=self.fraction,
            criterion=criterion,
            compensate=compensate,
            layerwise=layerwise,
            layout=layout,
            round_to=round_to,
        )

    @property
    def moe(self) -> bool:
        """Whether experts or their channels are asked for (a pass of their own, before the rest)."""
        return bool(self.experts or self.expert_channels)

    @property
    def fraction(self) -> float:
        """``ratio`` as set, or its default: 0.2, or 0 when only experts are asked for."""
        if self.ratio is not None:
            return self.ratio
        return 0.0 if self.moe else DEFAULT_RATIO

    def problems(self) -> list[str]:
        """What is wrong without looking at a model, one message per argument (raised on construction)."""
        problems = literal_problems(self) + self._ratio_problems()
        if self.steps < 1:
            problems.append(f"`steps` must be >= 1; got {self.steps}")
        if not self.ridge > 0:
            problems.append(f"`ridge` must be > 0 (a multiple of the mean input variance, e.g. 1.0); got {self.ridge}")
        if not 0.0 <= self.min_keep < 1.0:
            problems.append(f"`min_keep` must be in [0, 1) (a fraction of every group); got {self.min_keep}")
        if self.round_to < 1:
            problems.append(f"`round_to` must be >= 1 (1: no rounding; e.g. 8, 64, 128); got {self.round_to}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"`batch_size` must be >= 1 (calibration samples per forward); got {self.batch_size}")
        if self.seed < 0:
            problems.append(f"`seed` must be >= 0; got {self.seed}")
        if "uniform" in (self.layout, "uniform" if self.target == "hf" else None) and (
            self.ranking == "global" or self.layers or self.attn_layers or self.mlp_layers
        ):
            asked = (
                "`layout` uniform" if self.layout == "uniform" else "`target` hf (plain transformers: layout uniform)"
            )
            problems.append(f"{asked} prunes every layer alike: it takes no layer ranges and no global ranking")
        if self.scope != "block" and self.criterion in ACTIVATION:
            problems.append(
                f"`criterion` {self.criterion} scores heads and MLP channels only: use it with `scope` block "
                f"(got {self.scope!r}), or a criterion such as taylor"
            )
        if self.scope != "block" and self.compensate not in (None, "none"):
            problems.append(
                f"`compensate` {self.compensate} works on heads and MLP channels only: use it with `scope` block "
                f"(got {self.scope!r}), or `compensate` none"
            )
        if self.layerwise is True and self.criterion not in (None, *ACTIVATION):
            problems.append(
                f"`layerwise` scores each layer from its activations: `criterion` must be one of "
                f"{', '.join(ACTIVATION)}; got {self.criterion!r}"
            )
        if self.layerwise is True and self.steps != 1:
            problems.append(f"`layerwise` prunes in one pass; `steps` must be 1, got {self.steps}")
        if self.target == "vllm" and self.scope == "block" and self.attention != "none":
            problems.append(
                f"`target` vllm keeps the query heads of every layer (vLLM's DeciLM has one head count for all "
                f"layers), so it prunes no heads: use `attention` none (MLP channels), `scope` channel or "
                f"`scope` layer; got `attention` {self.attention}"
            )
        problems += self._allocation_problems()
        if self.scope == "block" and self.attention == "none" and not self.mlp:
            problems.append("`scope` block with `attention` none and `mlp` off has nothing to prune")
        for name in ("layers", "attn_layers", "mlp_layers"):
            if getattr(self, name) is not None:
                try:
                    parse_range(getattr(self, name), None)
                except LlmpError as err:
                    problems.append(str(err))
        return problems

    def _ratio_problems(self) -> list[str]:
        problems, moe = [], self.moe
        if moe and not 0.0 <= self.fraction < 1.0:
            problems.append(
                f"`ratio` must be in [0, 1) with `experts` (0: experts only; a fraction of all parameters); got {self.ratio}"
            )
        elif not moe and not 0.0 < self.fraction < 1.0:
            problems.append(
                f"`ratio` must be between 0 and 1, both excluded (a fraction of all parameters, e.g. 0.2); got {self.ratio}"
            )
        if not 0.0 <= self.experts < 1.0:
            problems.append(
                f"`experts` must be in [0, 1) (a fraction of every MoE layer's experts, e.g. 0.5); got {self.experts}"
            )
        if not 0.0 <= self.expert_channels < 1.0:
            problems.append(
                f"`expert_channels` must be in [0, 1) (a fraction of every expert's channels, e.g. 0.25); "
                f"got {self.expert_channels}"
            )
        return problems

    def _allocation_problems(self) -> list[str]:
        if self.search_seconds <= 0:
            return [f"`search_seconds` must be > 0; got {self.search_seconds}"]
        if self.search_generations is not None and self.search_generations < 1:
            return [
                f"`search_generations` must be >= 1 (unset: bounded by search_seconds); got {self.search_generations}"
            ]
        if self.allocation == "uniform":
            return []
        asked = f"`allocation` {self.allocation}"
        if self.scope != "block":
            return [f"{asked} shares heads and MLP channels between layers: use `scope` block (got {self.scope!r})"]
        if self.ranking == "global":
            return [f"{asked} sets each layer's count; `ranking` global ranks all layers at once: use `ranking` layer"]
        if "uniform" in (self.layout, "uniform" if self.target == "hf" else None):
            return [f"{asked} gives layers different counts; a uniform layout (or `target` hf) needs the same"]
        if self.allocation == "search" and (
            self.criterion not in (None, *ACTIVATION) or self.layerwise is False or self.steps != 1
        ):
            return [
                f"{asked} prunes each candidate layer from its activations: use an activation criterion "
                f"({', '.join(ACTIVATION)}) layer by layer in one step (got criterion {self.criterion!r}, "
                f"layerwise {self.layerwise!r}, steps {self.steps})"
            ]
        return []

    @property
    def search(self):
        """The allocation search's settings (:class:`llmp.allocation.SearchSettings`)."""
        from llmp.allocation.evolution import SearchSettings

        return SearchSettings(seconds=self.search_seconds, generations=self.search_generations, seed=self.seed)

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration text (the criterion's gradients or activations, or
        compensation; an unset criterion is flap or taylor, which both do)."""
        if self.criterion is None:
            return True
        return needs_calibration(self.criterion) or self.compensate not in (None, "none")

    @property
    def kinds(self) -> tuple[Kind, ...]:
        if self.scope == "channel":
            return (Kind.HIDDEN,)
        if self.scope == "layer":
            return (Kind.LAYERS,)
        kinds = {"query": (Kind.QUERY_HEADS,), "kv": (Kind.KV_GROUPS,), "none": ()}[self.attention]
        return kinds + ((Kind.MLP,) if self.mlp else ())

    @property
    def scoring(self) -> ScoringSettings:
        """The gradient engine's settings this config asks for."""
        return ScoringSettings(checkpointing=self.checkpointing)


def _activation_ready(model: PreTrainedModel, config: PruneConfig) -> bool:
    """Whether the activation criteria can score this model's groups of ``config``'s kinds."""
    try:
        modules = projections(adapter_for(model).discover(model, config.kinds)).values()
    except LlmpError:
        return False
    return all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in modules)


def parse_range(text: str, n_layers: int | None, name: str = "layers") -> range:
    """``"A:B"`` → ``range(A, B)``; an empty side means the start or end of the model.

    Raises:
        LlmpError: malformed, empty, or beyond the model's ``n_layers``.
    """
    start, sep, stop = str(text).partition(":")
    try:
        a = int(start) if start.strip() else 0
        b = int(stop) if stop.strip() else n_layers
    except ValueError:
        b = a = None
    if not sep or a is None or (b is not None and (a < 0 or a >= b)):
        raise LlmpError(f"`{name}` must look like A:B with 0 <= A < B (e.g. 4:30); got {text!r}")
    if n_layers is not None and b > n_layers:
        raise LlmpError(f"`{name}` {text} goes beyond the model, which has {n_layers} layers (0:{n_layers})")
    return range(a, b if b is not None else a + 1)


def layer_ranges(config: PruneConfig, n: int) -> dict[Kind, range]:
    default_attn = f"1:{n - 1}" if n > 2 else f"0:{n}"
    attn = config.attn_layers or config.layers or default_attn
    mlp = config.mlp_layers or config.layers or default_attn
    if config.layout == "uniform":
        attn = mlp = f"0:{n}"
    ranges = {
        Kind.QUERY_HEADS: parse_range(attn, n, "attn_layers"),
        Kind.MLP: parse_range(mlp, n, "mlp_layers"),
        Kind.LAYERS: parse_range(config.layers or f"0:{n}", n),
    }
    ranges[Kind.KV_GROUPS] = ranges[Kind.QUERY_HEADS]
    return ranges
