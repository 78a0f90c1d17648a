"""BLOOM (``BloomForCausalLM``): fused QKV viewed per head, ALiBi, LayerNorm after the embeddings.

One decoder layer (``transformer.h.i``)::

    x ─ input_layernorm ─ query_key_value ─ view [heads, 3, d] ─ alibi attention ─ dense ─(+x)─┐
      ┌──────────────────────────────────────────────────────────────────────────────────────┘
      └ post_attention_layernorm ─ dense_h_to_4h ─ gelu ─ dense_4h_to_h ─(+)

Head ``h`` owns fused rows ``[3dh, 3dh + 3d)`` (its q, k and v, in that order) and ``dense``
columns ``[dh, dh + d)``. BLOOM is multi-head: removing a head removes its key and value too, so
heads are ``KV_GROUPS`` (``QUERY_HEADS`` asks for the same thing).

ALiBi: the model builds one bias from ``config.n_head`` for all layers; a pruned layer picks its
kept heads' rows (:mod:`llmp.structure.adapters.alibi`), so ``n_head`` and ``hidden_size`` stay the
original values and only per-layer attributes change. Hidden channels are refused (LayerNorm, see
:mod:`llmp.structure.adapters.fused`), and so is layer removal when
``apply_residual_connection_post_layernorm`` is set (a zeroed layer would not pass its input on).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.structure.adapters import alibi
from llmp.structure.adapters.base import Unsupported
from llmp.structure.adapters.fused import FusedQKVAdapter
from llmp.structure.groups import Group, Kind


class BloomAdapter(FusedQKVAdapter):
    family = "bloom"
    model_types = ("bloom",)
    layers_path = "transformer.h"
    attention = "self_attention"

    def check_kinds(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> None:
        super().check_kinds(model, kinds)
        if Kind.LAYERS in kinds and model.config.apply_residual_connection_post_layernorm:
            raise Unsupported(
                "layer pruning (`scope` layer) is not supported for this bloom model: with "
                "`apply_residual_connection_post_layernorm` the residual is the normalised input, so a "
                "removed layer would not pass its input on. Use `scope` block."
            )

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        attn = self.attn(model, i)
        d, n = attn.head_dim, attn.query_key_value.out_features // (3 * attn.head_dim)
        slices = [*self.head_slices(model, i, 3 * d), self.dense_slice(model, i, d)]
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, n, tuple(slices))

    def note_removal(self, model: PreTrainedModel, group: Group, elements: list[int]) -> None:
        if group.kind is Kind.KV_GROUPS:
            alibi.note_heads_removed(model.config, len(self.layers(model)), model.config.n_head, group.layer, elements)

    def layers_kept(self, model: PreTrainedModel, keep: list[int], n_before: int) -> None:
        alibi.note_layers_kept(model.config, n_before, model.config.n_head, keep)

    def sync(self, model: PreTrainedModel) -> None:
        layers = self.layers(model)
        for i, block in enumerate(layers):
            attn = block.self_attention
            heads = attn.dense.in_features // attn.head_dim
            attn.num_heads = block.num_heads = heads
            # hidden_size is the attention width here (BLOOM's tensor-parallel path slices it).
            attn.hidden_size = attn.split_size = heads * attn.head_dim
            attn.layer_idx = i
        model.config.num_hidden_layers = len(layers)
        alibi.install([block.self_attention for block in layers], model.config, model.transformer.num_heads)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for i, block in enumerate(self.layers(model)):
            heads = block.self_attention.dense.in_features // block.self_attention.head_dim
            shapes.append({"heads": heads, "kv_heads": heads, "mlp": self.mlp_width(model, i)})
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        # BloomConfig has no field for the MLP width (always 4 × hidden) nor for a head size other
        # than hidden / n_head, and pruned heads need their original ALiBi slopes: only a model
        # whose heads and MLPs are all intact (layers may be gone) is a plain BLOOM checkpoint.
        config = model.config
        full = {"heads": config.n_head, "kv_heads": config.n_head, "mlp": 4 * config.hidden_size}
        return all(s == full for s in self.layer_shapes(model)) and alibi.is_identity(config, config.n_head)
