"""Family adapters, registered by one explicit call each."""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.structure.adapters.baichuan import BaichuanAdapter
from llmp.structure.adapters.base import Adapter
from llmp.structure.adapters.bloom import BloomAdapter
from llmp.structure.adapters.falcon import FalconAdapter
from llmp.structure.adapters.gemma import GemmaAdapter
from llmp.structure.adapters.gpt2 import GPT2Adapter
from llmp.structure.adapters.gpt_bigcode import GPTBigCodeAdapter
from llmp.structure.adapters.gpt_neox import GPTNeoXAdapter
from llmp.structure.adapters.llama import LlamaAdapter
from llmp.structure.adapters.moe import MoeAdapter
from llmp.structure.adapters.opt import OPTAdapter
from llmp.structure.adapters.phi3 import Phi3Adapter

_ADAPTERS: dict[str, type[Adapter]] = {}


def register(adapter: type[Adapter]) -> None:
    """Make ``adapter`` handle its ``model_types``."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


register(LlamaAdapter)
register(Phi3Adapter)
register(OPTAdapter)
register(GPT2Adapter)
register(GemmaAdapter)
register(BloomAdapter)
register(BaichuanAdapter)
register(FalconAdapter)
register(GPTNeoXAdapter)
register(GPTBigCodeAdapter)
register(MoeAdapter)


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


EXPERT_COUNTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
"""Config fields that give a model routed experts (Qwen/OLMoE/gpt-oss, Mixtral/Granite, DeepSeek, others)."""


def expert_count(fields: dict) -> int | None:
    """The routed experts per layer a config (as a dict) declares, if any."""
    counts = [fields.get(f) for f in EXPERT_COUNTS]
    return next((n for n in counts if isinstance(n, int) and n > 1), None)


UNLIKE_THE_SUPPORTED = {
    "gpt_oss": "its router and experts have biases, and its experts run a clamped SwiGLU on interleaved gate/up rows",
    "deepseek_v3": "it routes by sigmoid scores with a correction bias and grouped top-k, beside shared experts and "
    "latent attention",
    "llama4": "it routes top-1 by a sigmoid that scales the expert's input, and interleaves MoE and dense layers",
}
"""What a known MoE family does that the supported ones (softmax top-k routers, fused SwiGLU
experts without biases) do not: the part of the mechanism an adapter for it would add."""


def moe_problem(model_type: str | None, fields: dict) -> str | None:
    """Why llmp refuses a mixture-of-experts family it has no adapter for (``None``: not refused)."""
    if model_type in _ADAPTERS or expert_count(fields) is None:
        return None
    why = UNLIKE_THE_SUPPORTED.get(model_type, "automatic discovery does not map routed experts")
    return (
        f"`{model_type}` is a mixture-of-experts model, and llmp prunes the experts of "
        f"{', '.join(MoeAdapter.model_types)} only (softmax top-k routers, fused SwiGLU experts); for "
        f"{model_type}, {why}. Use one of those families, or write an adapter for this one "
        "(docs/adapters.md, docs/moe.md)"
    )


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter for ``model``'s family; for a family llmp does not know, automatic discovery.

    The :class:`~llmp.structure.auto.AutoAdapter` traces the model and refuses (with the modules
    it could not map) what it cannot map with certainty; :func:`llmp.prune` checks what it maps.

    Raises:
        LlmpError: the model has no decoder layers to discover.
    """
    model_type = getattr(model.config, "model_type", None)
    problem = moe_problem(model_type, model.config.to_dict())
    if problem:
        raise LlmpError(problem)
    if model_type not in _ADAPTERS:
        from llmp.structure.auto import AutoAdapter  # auto imports adapters.base, whose package is this one

        return AutoAdapter(known=tuple(supported_model_types()))
    return _ADAPTERS[model_type]()
