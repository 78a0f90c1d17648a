"""The pruning pipeline as one library call: discover → score → plan → apply, in steps.

Example::

    model, tokenizer = llmp.load_model("smollm2-135m")
    calib = llmp.data.calibration_samples("c4.jsonl", tokenizer, 10, 64)
    record = llmp.prune(model, PruneConfig(ratio=0.2), calib)
    record.achieved_ratio  # 0.2003
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Literal

import torch
from transformers import PreTrainedModel

from llmp import activations, importance, surgery
from llmp.errors import LlmpError, raise_all
from llmp.plan import PlanSettings, make_plan
from llmp.record import PruningRecord, Step
from llmp.structure import Group, Kind, adapter_for
from llmp.structure.adapters.base import BIASES_KEY
from llmp.verify import verify

Scope = Literal["block", "channel", "layer"]
Attention = Literal["query", "kv", "none"]
Target = Literal["any", "gguf", "vllm", "hf"]
# Kept MLP / hidden channels per target: q8_0's block of 32 values; 64 keeps vLLM's shards of up
# to 8 GPUs whole multiples of 8.
TARGET_ALIGN = {"gguf": 32, "vllm": 64}
EXPORT_FAMILIES = ("llama", "mistral", "qwen2")  # what llmp.export writes (llmp.export.source)


@dataclass
class PruneConfig:
    """What to remove and how to choose it (each field's docstring is its ``--help`` text).

    Unset ``criterion``, ``compensate`` and ``layerwise`` take the defaults measured best
    (docs/pruning.md), decided per model by :meth:`resolved`.
    """

    ratio: float = 0.2
    """fraction of all model parameters to remove, in [0, 1)"""
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
    criterion: importance.Criterion | None = None
    """importance criterion: taylor, taylor2, taylor_mix, vectorwise (calibration gradients), flap,
    wanda (calibration activations, no gradients), l1, l2, random (weights only); see
    llmp.importance; unset: flap for heads and MLP channels, taylor for hidden channels and layers"""
    reduction: importance.Reduction = "sum"
    """how one element's slice scores combine"""
    ranking: Literal["layer", "global"] = "layer"
    """layer (the same fraction in every layer) or global (one ranking over all layers)"""
    min_keep: float = 0.0
    """fraction of every group always kept (at least one head per KV group)"""
    round_to: int = 1
    """kept MLP / hidden channels are a multiple of this"""
    compensate: Literal["none", "bias", "lstsq"] | None = None
    """after removing heads / MLP channels, keep their mean output as a bias of the output
    projection (bias, FLAP's), or also refit the kept columns by ridge least squares on the
    calibration inputs (lstsq); see llmp.activations; unset: lstsq with flap and wanda, else none"""
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
    keep their projections' outputs (256 MiB of them; a tenth of the weights above 1 GiB, a 20th
    in half precision) and recompute only elementwise work and attention, the others keep only
    their input (off: faster, more memory)"""
    seed: int = 0
    """for sampling and the random criterion"""

    def __post_init__(self) -> None:
        if self.target == "hf":
            self.layout = "uniform"
        if self.target in TARGET_ALIGN and isinstance(self.round_to, int) and self.round_to >= 1:
            self.round_to = math.lcm(self.round_to, TARGET_ALIGN[self.target])
        self.check()

    def resolved(self, model: PreTrainedModel) -> PruneConfig:
        """This config with its unset fields decided for ``model`` (what the record keeps):

        - ``criterion``: flap where every pruned group writes through the input columns of one
          linear layer (heads and MLP channels of the families with ``nn.Linear`` projections),
          else taylor (hidden channels, layers, GPT-2's ``Conv1D``);
        - ``compensate``: lstsq with flap or wanda, unless a uniform layout could then not declare
          its biases to plain transformers (a family without ``bias_flags``); else none;
        - ``layerwise``: on for flap and wanda in one step.
        """
        adapter = adapter_for(model)
        criterion, compensate, layerwise = self.criterion, self.compensate, self.layerwise
        if criterion is None:
            criterion = "flap" if self.scope == "block" and _activation_ready(model, self) else "taylor"
        if compensate is None:
            flags = adapter.bias_flags
            declarable = self.layout == "heterogeneous" or (flags and all(hasattr(model.config, f) for f in flags))
            compensate = "lstsq" if criterion in importance.ACTIVATION and declarable else "none"
        if layerwise is None:
            layerwise = criterion in importance.ACTIVATION and self.steps == 1
        return dataclasses.replace(self, criterion=criterion, compensate=compensate, layerwise=layerwise)

    def check(self) -> None:
        """Validate what can be checked without a model (done on construction; again after a change).

        Raises:
            LlmpError: every problem found, in one message.
        """
        problems = []
        if not 0.0 <= self.ratio < 1.0:
            problems.append(f"`ratio` must be in [0, 1) (a fraction of all parameters); got {self.ratio}")
        hints = typing.get_type_hints(PruneConfig)
        choices = {
            name: literal_choices(hints[name])
            for name in ("scope", "attention", "criterion", "reduction", "ranking", "compensate", "layout", "target")
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed and not (getattr(self, name) is None and name in _UNSET_OK):
                problems.append(f"`{name}` must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        if self.steps < 1:
            problems.append(f"`steps` must be >= 1; got {self.steps}")
        if not 0.0 <= self.min_keep < 1.0:
            problems.append(f"`min_keep` must be in [0, 1) (a fraction of every group); got {self.min_keep}")
        if self.round_to < 1:
            problems.append(f"`round_to` must be >= 1 (1: no rounding; e.g. 8, 64, 128); got {self.round_to}")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"`batch_size` must be >= 1 (calibration samples per forward); got {self.batch_size}")
        if self.seed < 0:
            problems.append(f"`seed` must be >= 0; got {self.seed}")
        if self.layout == "uniform" and (
            self.ranking == "global" or self.layers or self.attn_layers or self.mlp_layers
        ):
            problems.append("`layout` uniform prunes every layer alike: it takes no layer ranges and no global ranking")
        if self.scope != "block" and self.criterion in importance.ACTIVATION:
            problems.append(
                f"`criterion` {self.criterion} scores heads and MLP channels only: use it with `scope` block "
                f"(got {self.scope!r}), or a criterion such as taylor"
            )
        if self.scope != "block" and self.compensate not in (None, "none"):
            problems.append(
                f"`compensate` {self.compensate} works on heads and MLP channels only: use it with `scope` block "
                f"(got {self.scope!r}), or `compensate` none"
            )
        if self.layerwise is True and self.criterion not in (None, *importance.ACTIVATION):
            problems.append(
                f"`layerwise` scores each layer from its activations: `criterion` must be one of "
                f"{', '.join(importance.ACTIVATION)}; got {self.criterion!r}"
            )
        if self.layerwise is True and self.steps != 1:
            problems.append(f"`layerwise` prunes in one pass; `steps` must be 1, got {self.steps}")
        if self.target == "vllm" and self.scope == "block" and self.attention != "none":
            problems.append(
                f"`target` vllm keeps the query heads of every layer (vLLM's DeciLM has one head count for all "
                f"layers), so it prunes no heads: use `attention` none (MLP channels), `scope` channel or "
                f"`scope` layer; got `attention` {self.attention}"
            )
        if self.scope == "block" and self.attention == "none" and not self.mlp:
            problems.append("`scope` block with `attention` none and `mlp` off has nothing to prune")
        for name in ("layers", "attn_layers", "mlp_layers"):
            if getattr(self, name) is not None:
                try:
                    parse_range(getattr(self, name), None)
                except LlmpError as err:
                    problems.append(str(err))
        raise_all(problems)

    @property
    def needs_calibration(self) -> bool:
        """Whether pruning reads calibration text (the criterion's gradients or activations, or
        compensation; an unset criterion is flap or taylor, which both do)."""
        if self.criterion is None:
            return True
        return importance.needs_calibration(self.criterion) or self.compensate not in (None, "none")

    @property
    def kinds(self) -> tuple[Kind, ...]:
        if self.scope == "channel":
            return (Kind.HIDDEN,)
        if self.scope == "layer":
            return (Kind.LAYERS,)
        kinds = {"query": (Kind.QUERY_HEADS,), "kv": (Kind.KV_GROUPS,), "none": ()}[self.attention]
        return kinds + ((Kind.MLP,) if self.mlp else ())


_UNSET_OK = ("criterion", "compensate")  # decided per model by PruneConfig.resolved


def _activation_ready(model: PreTrainedModel, config: PruneConfig) -> bool:
    """Whether the activation criteria can score this model's groups of ``config``'s kinds."""
    try:
        modules = activations.projections(adapter_for(model).discover(model, config.kinds)).values()
    except LlmpError:
        return False
    return all(isinstance(model.get_submodule(name), torch.nn.Linear) for name in modules)


def literal_choices(hint) -> tuple:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) type hint allows."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return next((literal_choices(arg) for arg in typing.get_args(hint) if typing.get_origin(arg) is Literal), ())


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


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prune(
    model: PreTrainedModel,
    config: PruneConfig,
    calibration: torch.Tensor | None = None,
    agree: Callable[[dict[str, list[int]]], dict[str, list[int]]] | None = None,
    reference_params: int | None = None,
) -> PruningRecord:
    """Prune ``model`` in place and return the record of it (settings, counts, shapes, timings).

    Each of ``record.steps`` holds its ``plan`` and ``kinds``: :func:`replay` repeats the same
    removals on another copy of the original model without scoring.

    Args:
        model: the causal LM, pruned in place.
        config: what to remove.
        calibration: ``[N, L]`` token ids for the gradient criteria.
        agree: called with each step's plan before it is applied; returns the plan to apply.
            Distributed callers broadcast rank 0's plan here so every rank removes the same.
        reference_params: the size ``config.ratio`` is a fraction of (default: ``model``'s own).
            An iterative schedule passes the original model's, so the ratio stays "of the
            original", and only what is still missing is removed.

    Raises:
        LlmpError: invalid settings, unsupported family, or a target the structures cannot meet.
    """
    config.check()
    config = config.resolved(model)
    config.check()
    adapter = adapter_for(model)
    layer_ranges(config, len(adapter.layers(model)))  # validates the ranges against the model before any work
    _refuse_mqa_kv(model, config)
    _refuse_target(model, config)
    if adapter.automatic:  # a family llmp has not seen: check its map first
        verify(model, adapter.discover(model, config.kinds), adapter)
    if config.layerwise:
        from llmp.sequential import prune_layerwise

        return prune_layerwise(model, config, calibration, agree=agree, reference_params=reference_params)
    total = count_parameters(model)
    reference = total if reference_params is None else reference_params
    already, goal = reference - total, config.ratio * reference  # parameters removed before, and in the end
    steps, timings = [], {"scoring_s": 0.0, "planning_s": 0.0, "surgery_s": 0.0}
    for step in range(1, config.steps + 1):
        cumulative = round(already + (goal - already) * step / config.steps)
        target = cumulative - (reference - count_parameters(model))
        t0 = time.perf_counter()
        structure = adapter.discover(model, config.kinds)
        ranges = layer_ranges(config, len(adapter.layers(model)))
        groups = [g for g in structure.groups if g.layer is None or g.layer in ranges[g.kind]]
        structure.groups = groups
        stats = _activation_stats(model, structure, calibration, config)
        if config.criterion in importance.ACTIVATION:
            scores = activations.score(model, structure, stats, config.criterion)
        else:
            scores = importance.score(
                model,
                structure,
                calibration,
                config.criterion,
                config.reduction,
                config.batch_size,
                config.seed,
                config.checkpointing,
            )
        t1 = time.perf_counter()
        params = importance.groups_element_parameters(groups, model)
        allowed = {g.name: _layer_mask(g, ranges[Kind.LAYERS]) for g in groups if g.kind is Kind.LAYERS}
        settings = PlanSettings(config.ranking, config.min_keep, config.round_to)
        plan = make_plan(groups, scores, params, target, settings, allowed)
        if agree is not None:
            plan = agree(plan)
        t2 = time.perf_counter()
        before = count_parameters(model)
        refits = activations.compensation(model, structure, plan, stats, config.compensate)
        surgery.apply(model, structure, plan, adapter)
        gained = note_biases(model, adapter, activations.install(model, refits), config)
        t3 = time.perf_counter()
        seconds = {"scoring_s": t1 - t0, "planning_s": t2 - t1, "surgery_s": t3 - t2}
        for key, value in seconds.items():
            timings[key] += value
        steps.append(step_record(model, config, plan, before, step, seconds, gained))
    return run_record(model, config, total, steps, timings)


def step_record(model, config: PruneConfig, plan, before: int, step: int, seconds: dict, biases: list[str]) -> Step:
    """The :class:`Step` of ``plan`` just applied to ``model`` (``before``: its parameters before)."""
    return Step(
        kinds=[str(k) for k in config.kinds],
        plan={name: [int(e) for e in v] for name, v in plan.items() if len(v)},
        params_before=before,
        params_after=count_parameters(model),
        step=step,
        removed={name: len(v) for name, v in plan.items()},
        layer_shapes=adapter_for(model).layer_shapes(model),
        timings={k: round(v, 4) for k, v in seconds.items()},
        biases=biases or None,
    )


def run_record(model, config: PruneConfig, total: int, steps: list[Step], timings: dict) -> PruningRecord:
    """The :class:`PruningRecord` of ``steps`` taking ``model`` from ``total`` parameters to its size now."""
    adapter = adapter_for(model)
    return PruningRecord(
        family=adapter.family,
        params_before=total,
        params_after=count_parameters(model),
        layer_shapes=adapter.layer_shapes(model),
        settings=asdict(config),
        hidden_size=model.config.hidden_size,
        num_layers=len(adapter.layers(model)),
        steps=steps,
        timings={k: round(v, 4) for k, v in timings.items()},
    )


def _refuse_target(model: PreTrainedModel, config: PruneConfig) -> None:
    """Raises:
    LlmpError: ``target`` gguf or vllm for a family that llmp does not export."""
    family = getattr(model.config, "model_type", None)
    if config.target in TARGET_ALIGN and family not in EXPORT_FAMILIES:
        raise LlmpError(
            f"`target` {config.target}: llmp exports the Llama layout ({', '.join(EXPORT_FAMILIES)}) to llama.cpp "
            f"and vLLM, and this model is a {family!r}; use `target` any (llmp.load_pruned) or hf"
        )


def _refuse_mqa_kv(model: PreTrainedModel, config: PruneConfig) -> None:
    """Raises:
    LlmpError: KV groups asked of a model whose every layer in range has a single key/value head."""
    if Kind.KV_GROUPS not in config.kinds:
        return
    adapter = adapter_for(model)
    ranges = layer_ranges(config, len(adapter.layers(model)))
    groups = [g for g in adapter.discover(model, config.kinds).of_kind(Kind.KV_GROUPS) if g.layer in ranges[g.kind]]
    if groups and all(g.size <= 1 for g in groups):
        raise LlmpError(
            f"`attention='kv'` cannot prune this {adapter.family} model: every layer in range has a single "
            "key/value head (MQA), and removing it would remove all of the layer's attention; use "
            "`attention='query'` (query heads) or `attention='none'`"
        )


def _activation_stats(model, structure, calibration, config: PruneConfig) -> dict:
    """The output projections' input statistics, when the criterion or the compensation needs them."""
    if config.criterion not in importance.ACTIVATION and config.compensate == "none":
        return {}
    modules = list(activations.projections(structure).values())
    return activations.collect(model, modules, calibration, config.batch_size, gram=config.compensate == "lstsq")


def note_biases(
    model: PreTrainedModel, adapter, gained: list[str], config: PruneConfig, declare: bool = True
) -> list[str]:
    """Record in the config which layer modules compensation gave a bias (the loader rebuilds
    them); with ``declare``, a uniform model also gets them declared (:func:`declare_biases`).

    Returns every module that gained a bias, declared zeros included (what :func:`replay` re-adds).
    """
    if not gained:
        return []
    _remember_biases(model, adapter, gained)
    return sorted(set(gained) | set(declare_biases(model, adapter, config) if declare else ()))


def _remember_biases(model: PreTrainedModel, adapter, modules: Iterable[str]) -> None:
    """Add ``modules`` (full names) to the config's :data:`BIASES_KEY`, as names inside a layer."""
    prefix = adapter.layers_path + "."
    names = {name.removeprefix(prefix).partition(".")[2] for name in modules}
    setattr(model.config, BIASES_KEY, sorted(names | set(getattr(model.config, BIASES_KEY, None) or ())))


def declare_biases(model: PreTrainedModel, adapter, config: PruneConfig) -> list[str]:
    """A uniform model's compensation biases, declared the plain-transformers way (zero biases
    beside them, see :meth:`Adapter.plain_biases`); returns the modules given a zero bias."""
    if config.layout != "uniform" or not getattr(model.config, BIASES_KEY, None):
        return []
    before = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    adapter.plain_biases(model)
    after = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m.bias is not None}
    return sorted(after - before)


def replay(model: PreTrainedModel, steps: Iterable[Step]) -> None:
    """Repeat recorded pruning steps (a :class:`PruningRecord`'s ``steps``) on ``model``, without scoring.

    ``model`` must be the model the steps were first applied to (same original shapes): this is
    how a checkpoint's pruned shapes are rebuilt before its weights are loaded.

    Raises:
        LlmpError: a step names groups the model does not have (another model, or another order).
    """
    adapter = adapter_for(model)
    for step in steps:
        structure = adapter.discover(model, tuple(Kind(k) for k in step.kinds))
        plan = {name: list(v) for name, v in step.plan.items()}
        surgery.apply(model, structure, plan, adapter)
        for name in step.biases or ():  # compensation's biases: their values come with the weights
            module = model.get_submodule(name)
            if module.bias is None:
                module.bias = torch.nn.Parameter(module.weight.new_zeros(module.out_features))
        _remember_biases(model, adapter, step.biases or ())


def _layer_mask(group: Group, allowed: range) -> torch.Tensor:
    return torch.tensor([i in allowed for i in range(group.size)])
