"""The GPT-2 layout: ``Conv1D`` projections, fused ``c_attn``, LayerNorm, learned positions.

``Conv1D`` stores its weight as ``[in, out]`` (transposed from ``nn.Linear``), so an output unit is
a *column* of the weight (dim 1) and an input unit a *row* (dim 0). ``c_attn`` holds q|k|v side by
side, each ``E = n_heads·d`` wide::

    c_attn.weight  [hidden, 3E]   cols [0, E) q  |  [E, 2E) k  |  [2E, 3E) v      head h: h·d + {0, E, 2E}
    attn.c_proj    [E, hidden]    rows [h·d, h·d + d) written by head h
    mlp.c_fc       [hidden, 4·hidden]  col c  ─ gelu ─  mlp.c_proj [4·hidden, hidden] row c

The forward splits ``c_attn``'s output at ``attn.split_size`` and shapes it with ``Conv1D.nf``;
:meth:`GPT2Adapter.sync` sets both from the weights (``llmp.surgery`` only knows ``nn.Linear``).

Refused: hidden channels, for the LayerNorm reason given in :mod:`llmp.structure.adapters.opt`.
Removing layers is exact (pre-LayerNorm blocks). With ``scale_attn_by_inverse_layer_idx`` the
attention of layer ``i`` is scaled by ``1/(i + 1)``; a kept layer that moves from ``i`` to ``j``
has its query columns multiplied by ``(j + 1)/(i + 1)`` so the renumbered model computes the same.
"""

from __future__ import annotations

from transformers import PreTrainedModel
from transformers.pytorch_utils import Conv1D

from llmp.structure.adapters.base import Adapter, set_config_fields, uniform_shape
from llmp.structure.groups import Group, Kind, Slice


class GPT2Adapter(Adapter):
    family = "gpt2"
    model_types = ("gpt2",)
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS)
    layers_path = "transformer.h"
    layernorm = True

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        # Multi-head attention: every head is its own KV group (named like Llama's for one vocabulary).
        attn, p = self.layers(model)[i].attn, f"transformer.h.{i}.attn"
        d, e = attn.head_dim, attn.c_proj.weight.shape[0]
        slices = [Slice(f"{p}.c_proj.weight", 0, d, writes=True)]
        for offset in (0, e, 2 * e):  # q, k, v
            slices += [Slice(f"{p}.c_attn.weight", 1, d, offset=offset), Slice(f"{p}.c_attn.bias", 0, d, offset=offset)]
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, e // d, tuple(slices))

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        block, p = self.layers(model)[i], f"transformer.h.{i}.mlp"
        slices = (
            Slice(f"{p}.c_fc.weight", 1, 1),
            Slice(f"{p}.c_fc.bias", 0, 1),
            Slice(f"{p}.c_proj.weight", 0, 1, writes=True),
        )
        return Group(f"layers.{i}.mlp", Kind.MLP, i, block.mlp.c_fc.weight.shape[1], slices)

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        block, p = self.layers(model)[i], f"transformer.h.{i}"
        parts = ["attn", "mlp"] + (["crossattention"] if hasattr(block, "crossattention") else [])
        return [f"{p}.{part}.c_proj.{name}" for part in parts for name in ("weight", "bias")]

    def layers_kept(self, model: PreTrainedModel, keep: list[int], n_before: int) -> None:
        if model.config.scale_attn_by_inverse_layer_idx:  # layer `old` becomes `new`: rescale its queries
            for new, old in enumerate(keep):
                attn = self.layers(model)[old].attn
                e = attn.c_proj.weight.shape[0]
                attn.c_attn.weight.data[:, :e] *= (new + 1) / (old + 1)
                attn.c_attn.bias.data[:e] *= (new + 1) / (old + 1)

    def sync(self, model: PreTrainedModel) -> None:
        config = model.config
        for module in model.modules():
            if isinstance(module, Conv1D):
                module.nx, module.nf = module.weight.shape
        layers = self.layers(model)
        for i, block in enumerate(layers):
            attn = block.attn
            attn.layer_idx = i
            attn.split_size = attn.c_proj.weight.shape[0]  # q|k|v split of c_attn's output
            attn.num_heads = attn.split_size // attn.head_dim
            attn.scaling = attn.head_dim**-0.5 if config.scale_attn_weights else 1.0
            if config.scale_attn_by_inverse_layer_idx:
                attn.scaling /= float(i + 1)
        config.n_layer = len(layers)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for block in self.layers(model):
            heads = block.attn.c_proj.weight.shape[0] // block.attn.head_dim
            shapes.append({"heads": heads, "kv_heads": heads, "mlp": block.mlp.c_fc.weight.shape[1]})
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        # GPT-2 derives head_dim = n_embd / n_head, so only MLP-only pruning gives a plain config.
        shape = uniform_shape(self.layer_shapes(model))
        if shape is None or shape["heads"] != model.config.n_head:
            return False
        return set_config_fields(model.config, n_inner=shape["mlp"])
