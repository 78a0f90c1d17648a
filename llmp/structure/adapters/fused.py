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

from llmp.errors import LlmpError
from llmp.structure.adapters.base import Adapter
from llmp.structure.groups import Group, Kind, Slice, Structure


class FusedQKVAdapter(Adapter):
    """Discovery shared by the fused-QKV LayerNorm families; subclasses map the heads."""

    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS)
    layers_path: ClassVar[str]  # e.g. "transformer.h"
    attention: ClassVar[str]  # attribute of a layer holding query_key_value and dense

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.get_submodule(self.layers_path)

    def attn(self, model: PreTrainedModel, i: int) -> nn.Module:
        return getattr(self.layers(model)[i], self.attention)

    def check_kinds(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> None:
        """Refuse what this family cannot remove exactly.

        Raises:
            LlmpError: hidden channels were asked for (see the module docstring).
        """
        if Kind.HIDDEN in kinds:
            raise LlmpError(
                f"hidden-channel pruning (`scope` channel) is not supported for {self.family}: its LayerNorm "
                "subtracts the mean over all channels, so removed channels cannot reproduce the model with "
                "those channels zeroed. Use `scope` block (attention heads, MLP channels) or `scope` layer."
            )

    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        self.check_kinds(model, kinds)
        groups: list[Group] = []
        for i in range(len(self.layers(model))):
            if Kind.KV_GROUPS in kinds or Kind.QUERY_HEADS in kinds:
                groups.append(self.attention_group(model, i, kinds))
            if Kind.MLP in kinds:
                groups.append(self._mlp_group(model, i))
        if Kind.LAYERS in kinds:
            n = len(self.layers(model))
            modules = tuple(f"{self.layers_path}.{i}" for i in range(n))
            groups.append(Group("layers", Kind.LAYERS, None, n, modules=modules))
        return Structure(self.family, groups)

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        """The heads (or KV groups) of layer ``i``: fused rows + ``dense`` columns."""
        raise NotImplementedError

    def head_slices(self, model: PreTrainedModel, i: int, width: int, **index) -> list[Slice]:
        """Fused ``query_key_value`` rows (weight, bias) of ``width`` per element, laid out by ``index``."""
        attn, p = self.attn(model, i), f"{self.layers_path}.{i}.{self.attention}"
        slices = [Slice(f"{p}.query_key_value.weight", 0, width, **index)]
        if attn.query_key_value.bias is not None:
            slices.append(Slice(f"{p}.query_key_value.bias", 0, width, **index))
        return slices

    def dense_slice(self, model: PreTrainedModel, i: int, width: int) -> Slice:
        return Slice(f"{self.layers_path}.{i}.{self.attention}.dense.weight", 1, width, writes=True)

    def _mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        mlp, p = self.layers(model)[i].mlp, f"{self.layers_path}.{i}.mlp"
        slices = [Slice(f"{p}.dense_h_to_4h.weight", 0, 1), Slice(f"{p}.dense_4h_to_h.weight", 1, 1, writes=True)]
        if mlp.dense_h_to_4h.bias is not None:
            slices.append(Slice(f"{p}.dense_h_to_4h.bias", 0, 1))
        return Group(f"layers.{i}.mlp", Kind.MLP, i, mlp.dense_h_to_4h.out_features, tuple(slices))

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        """``dense`` and ``dense_4h_to_h`` (weights and biases): zeroed, the layer passes its input on."""
        layer, p = self.layers(model)[i], f"{self.layers_path}.{i}"
        names = []
        for name, module in (
            (f"{self.attention}.dense", self.attn(model, i).dense),
            ("mlp.dense_4h_to_h", layer.mlp.dense_4h_to_h),
        ):
            names.append(f"{p}.{name}.weight")
            if module.bias is not None:
                names.append(f"{p}.{name}.bias")
        return names

    def remove_layers(self, model: PreTrainedModel, drop: list[int]) -> None:
        n = len(self.layers(model))
        keep = [i for i in range(n) if i not in set(drop)]
        parent, _, name = self.layers_path.rpartition(".")
        setattr(model.get_submodule(parent), name, nn.ModuleList(self.layers(model)[i] for i in keep))
        self.layers_kept(model, keep, n)

    def layers_kept(self, model: PreTrainedModel, keep: list[int], n_before: int) -> None:
        """Per-layer bookkeeping after layer removal (ALiBi heads). Default: nothing."""

    def mlp_width(self, model: PreTrainedModel, i: int) -> int:
        return self.layers(model)[i].mlp.dense_h_to_4h.out_features

    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        self.check_kinds(model, (Kind.HIDDEN,))
