"""What a family adapter tells llmp about one model family."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from llmp.structure.groups import Group, Kind, Structure


def set_config_fields(config, **fields) -> bool:
    """Set several config fields at once if the result passes the config's own validation.

    transformers validates each assignment (``hidden_size % num_attention_heads == 0`` for
    Llama), which a pruned model may not meet; then the config keeps its old values (a skeleton
    :func:`llmp.load_pruned` reshapes from the weights) and this returns ``False``.
    """
    old = {k: config.__dict__.get(k) for k in fields}
    config.__dict__.update(fields)
    try:
        validate = getattr(config, "validate", None)
        if validate is not None:
            validate()
    except Exception:  # transformers' StrictDataclassClassValidationError and friends
        config.__dict__.update(old)
        return False
    return True


class Adapter(ABC):
    """All knowledge of one model family: its module names and how its structures couple.

    Subclasses list the ``model_types`` they handle and implement discovery (which slices go
    together) and :meth:`sync` (which attributes the forward reads must follow the new shapes).
    """

    family: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]]
    kinds: ClassVar[tuple[Kind, ...]]
    automatic: ClassVar[bool] = False
    """Found by tracing, not written for the family: the pruner checks its map first (:mod:`llmp.verify`)."""

    @abstractmethod
    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        """The decoder layers, in order."""

    @abstractmethod
    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        """The groups of the requested kinds."""

    @abstractmethod
    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        """Names of the parameters through which layer ``i`` writes into the residual stream."""

    @abstractmethod
    def remove_layers(self, model: PreTrainedModel, drop: list[int]) -> None:
        """Delete decoder layers ``drop`` (and their per-layer config entries)."""

    @abstractmethod
    def sync(self, model: PreTrainedModel) -> None:
        """Make every attribute and config field the forward reads agree with the weights."""

    @abstractmethod
    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        """Per-layer counts (heads, KV heads, MLP channels) read from the weights."""

    @abstractmethod
    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        """Write the (equal) per-layer counts into the config so plain loaders rebuild them.

        Returns whether the config accepted them (see :func:`set_config_fields`).
        """

    @abstractmethod
    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        """Compensate normalisations for the hidden channels removed (``old`` → ``new``)."""

    def note_removal(self, model: PreTrainedModel, group: Group, elements: list[int]) -> None:  # noqa: B027
        """Called by :func:`llmp.surgery.apply` before ``elements`` of ``group`` are sliced away.

        For state the weights alone cannot tell afterwards, such as which original heads a layer
        keeps (their ALiBi slopes, see :mod:`llmp.structure.adapters.alibi`). Default: nothing.
        """
