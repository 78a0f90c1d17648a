"""Family adapters, registered by one explicit call each."""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.structure.adapters.base import Adapter
from llmp.structure.adapters.llama import LlamaAdapter

_ADAPTERS: dict[str, type[Adapter]] = {}


def register(adapter: type[Adapter]) -> None:
    """Make ``adapter`` handle its ``model_types``."""
    for model_type in adapter.model_types:
        _ADAPTERS[model_type] = adapter


register(LlamaAdapter)


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def adapter_for(model: PreTrainedModel) -> Adapter:
    """The adapter for ``model``'s family.

    Raises:
        LlmpError: the model's family has no adapter.
    """
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _ADAPTERS:
        raise LlmpError(
            f"unsupported architecture `{model_type}` ({type(model).__name__}); supported model "
            f"types: {', '.join(supported_model_types())}. See docs/adapters.md to add a family."
        )
    return _ADAPTERS[model_type]()
