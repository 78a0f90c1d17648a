"""Where a pruned model runs: each engine's envelope, and which engines a pruned model fits.

Pruning reads the envelope (``PruneConfig.target``), saving records the engines a folder fits,
and export refuses what falls outside: one home for the facts all three share.
"""

from __future__ import annotations

from typing import Literal

Target = Literal["any", "gguf", "vllm", "hf"]
TARGET_ALIGN = {"gguf": 32, "vllm": 64}
"""Kept MLP / hidden channels are a multiple of this per target: q8_0's block of 32 values; 64
keeps vLLM's shards of up to 8 GPUs whole multiples of 8."""
DECILM_ARCHITECTURE = "DeciLMForCausalLM"
"""What ``llmp export --format decilm`` writes: a folder for vLLM, which llmp reads no further."""
EXPORT_FAMILIES = ("llama", "mistral", "qwen2")
"""The families :mod:`llmp.export` writes (the Llama layout)."""
MOE_GGUF_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe")
"""Mixture-of-experts families :mod:`llmp.export.gguf_moe` writes, with one expert count for all layers."""


def export_problems(config, export: str | None) -> list[str]:
    """What makes a pruning ``config`` (a :class:`~llmp.PruneConfig`) fail its ``export`` afterwards:
    known before pruning, so said before the work, not after it."""
    per_layer_heads = config.scope == "block" and config.attention != "none"
    uniform = config.layout == "uniform" or config.target in ("vllm", "hf")
    if export == "decilm" and per_layer_heads and not uniform:
        return [
            f"`export` decilm needs the same query heads in every layer, and `attention` {config.attention} prunes "
            "them per layer: add `target` vllm (prunes no heads), or `layout` uniform, or export gguf instead"
        ]
    return []


def engines_for(family: str | None, layer_shapes: list[dict], plain: bool) -> list[str]:
    """Where a model of ``family`` with these per-layer counts runs (the report's "loads in")."""
    engines = ["llmp.load_pruned"] + (["transformers"] if plain else [])
    if family in MOE_GGUF_FAMILIES and plain:
        engines.append("llama.cpp (llmp export --format gguf)")
    if family in EXPORT_FAMILIES:
        engines.append("llama.cpp (llmp export --format gguf)")
        if len({s["heads"] for s in layer_shapes}) <= 1:
            engines.append("vLLM (llmp export --format decilm)")
    return engines
