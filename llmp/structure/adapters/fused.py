"""What BLOOM, Falcon and GPT-NeoX share: one fused ``query_key_value`` projection, ``dense`` out,
a ``dense_h_to_4h`` → act → ``dense_4h_to_h`` MLP, and LayerNorm (with bias) everywhere.

The fused projection's rows are read through a view, and that view is the index map: BLOOM and
GPT-NeoX view it as ``[heads, 3, head_dim]`` (head ``h`` owns rows ``[3dh, 3dh + 3d)``), Falcon
as ``[kv_groups, q_per_group + 2, head_dim]``. Each family adapter turns its view into slices.

Hidden channels are refused: LayerNorm subtracts the mean over *all* channels, so a model with
channels removed cannot compute what the model with those channels zeroed computes (the zeros
still count in the mean and variance, and LayerNorm's bias makes them non-zero again downstream).
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PreTrainedModel

from llmp.structure.adapters.base import Adapter
from llmp.structure.groups import Group, Kind, Slice


class FusedQKVAdapter(Adapter):
    """Discovery shared by the fused-QKV LayerNorm families; subclasses map the heads."""

    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS)
    layernorm = True
    attention: ClassVar[str]  # attribute of a layer holding query_key_value and dense

    @property
    def hidden_writers(self) -> tuple[str, ...]:  # zeroed (weights and biases), a layer passes its input on
        return (f"{self.attention}.dense", "mlp.dense_4h_to_h")

    def attn(self, model: PreTrainedModel, i: int) -> nn.Module:
        return getattr(self.layers(model)[i], self.attention)

    def head_slices(self, model: PreTrainedModel, i: int, width: int, **index) -> list[Slice]:
        """Fused ``query_key_value`` rows (weight, bias) of ``width`` per element, laid out by ``index``."""
        attn, p = self.attn(model, i), f"{self.layers_path}.{i}.{self.attention}"
        slices = [Slice(f"{p}.query_key_value.weight", 0, width, **index)]
        if attn.query_key_value.bias is not None:
            slices.append(Slice(f"{p}.query_key_value.bias", 0, width, **index))
        return slices

    def dense_slice(self, model: PreTrainedModel, i: int, width: int) -> Slice:
        return Slice(f"{self.layers_path}.{i}.{self.attention}.dense.weight", 1, width, writes=True)

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        mlp, p = self.layers(model)[i].mlp, f"{self.layers_path}.{i}.mlp"
        slices = [Slice(f"{p}.dense_h_to_4h.weight", 0, 1), Slice(f"{p}.dense_4h_to_h.weight", 1, 1, writes=True)]
        if mlp.dense_h_to_4h.bias is not None:
            slices.append(Slice(f"{p}.dense_h_to_4h.bias", 0, 1))
        return Group(f"layers.{i}.mlp", Kind.MLP, i, mlp.dense_h_to_4h.out_features, tuple(slices))

    def mlp_width(self, model: PreTrainedModel, i: int) -> int:
        return self.layers(model)[i].mlp.dense_h_to_4h.out_features
