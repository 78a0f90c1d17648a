"""The checks every driver runs before any work: one-shot, layer by layer, streamed and the callback.

::

    config (checked when made) ─► resolved for the model ─► layer ranges fit the model
        ─► KV groups not asked of an MQA model ─► target's engine takes this family
        ─► a searched allocation scored from activations
        ─► an automatically discovered family computes, pruned, what it computes masked

A streamed model is a skeleton on ``meta``: its shapes serve every check. (Automatic discovery
traces real tensors, so a streamed model needs a family adapter: :func:`llmp.pruning.streamed.open_skeleton`
refuses the others by name.)
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.pruning.config import PruneConfig, layer_ranges
from llmp.pruning.experts import check_experts
from llmp.structure import Kind, adapter_for
from llmp.targets import EXPORT_FAMILIES, MOE_GGUF_FAMILIES, TARGET_ALIGN
from llmp.verify import verify


def preflight(model: PreTrainedModel, config: PruneConfig) -> PruneConfig:
    """``config`` resolved for ``model`` (:meth:`PruneConfig.resolved`), after every check that
    refuses the run before anything is scored or written.

    Raises:
        LlmpError: layer ranges beyond the model, KV groups of an MQA model, a ``target`` whose
            engine does not load this family, or an automatically discovered family whose
            pruned model does not compute what its masked model computes.
    """
    config = config.resolved(model)
    adapter = adapter_for(model)
    layer_ranges(config, len(adapter.layers(model)))
    _refuse_mqa_kv(model, config)
    check_experts(model, config)
    _refuse_target(model, config)
    if config.allocation == "search" and not config.layerwise:
        raise LlmpError(
            "`allocation` search prunes each candidate layer from its activations, but this model's groups "
            f"are scored by {config.criterion}: use `criterion` flap or wanda, or another allocation"
        )
    if adapter.automatic:  # a family llmp has not seen: check its map first
        verify(model, adapter.discover(model, config.kinds), adapter)
    return config


def _refuse_target(model: PreTrainedModel, config: PruneConfig) -> None:
    family = getattr(model.config, "model_type", None)
    if config.target == "gguf" and family in MOE_GGUF_FAMILIES:
        return  # llmp.export.gguf_moe writes llama.cpp's own MoE architectures
    if config.target in TARGET_ALIGN and family not in EXPORT_FAMILIES:
        raise LlmpError(
            f"`target` {config.target}: llmp exports the Llama layout ({', '.join(EXPORT_FAMILIES)}) to llama.cpp "
            f"and vLLM, and this model is a {family!r}; use `target` any (llmp.load_pruned) or hf"
        )


def _refuse_mqa_kv(model: PreTrainedModel, config: PruneConfig) -> None:
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
