"""Baichuan-7B / 13B (remote code, ``model_type`` ``baichuan``): Llama's layout with q, k, v packed
into one ``W_pack``; 13B swaps rotary embeddings for ALiBi.

One decoder layer (``model.layers.i``)::

    x ─ input_layernorm ─ W_pack ─ [q | k | v] ─ rope (7B) / alibi (13B) attention ─ o_proj ─(+x)─┐
      ┌────────────────────────────────────────────────────────────────────────────────────────┘
      └ post_attention_layernorm ─┬ gate_proj ┐
                                  └ up_proj ──┴ silu(g)*u ─ down_proj ─(+)

``W_pack`` is the concatenation ``[3 * H]`` (``H`` = heads × head_dim), read back by
``unflatten(-1, (3, H))``: head ``h`` owns rows ``hd``, ``H + hd`` and ``2H + hd`` (``d`` each),
and ``o_proj`` columns ``[hd, hd + d)``. Baichuan is multi-head: heads are ``KV_GROUPS``.

The attention reads ``self.hidden_size`` as its own width (``H``), which the adapter sets per
layer; ``head_dim`` comes from ``config.hidden_size / num_attention_heads``, so the config keeps
those two at their original values (also after hidden-channel pruning, where the true width is
``model.embed_tokens.embedding_dim``). RMSNorm makes hidden-channel pruning exact (as for Llama),
except with Baichuan 2's ``NormHead``, which normalises ``lm_head`` rows over all channels: refused.
ALiBi (13B: no ``rotary_emb`` in the attention) is handled by :mod:`llmp.structure.adapters.alibi`.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from llmp.structure.adapters import alibi
from llmp.structure.adapters.base import Adapter, Unsupported, set_config_fields, uniform_shape
from llmp.structure.groups import Group, Kind, Slice


class BaichuanAdapter(Adapter):
    family = "baichuan"
    model_types = ("baichuan",)
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS)
    hidden_norms = ("input_layernorm", "post_attention_layernorm")
    hidden_readers = ("self_attn.W_pack", "mlp.gate_proj", "mlp.up_proj")
    hidden_writers = ("self_attn.o_proj", "mlp.down_proj")

    @staticmethod
    def uses_alibi(model: PreTrainedModel) -> bool:
        layers = model.model.layers
        return bool(layers) and not hasattr(layers[0].self_attn, "rotary_emb")

    def check_kinds(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> None:
        if Kind.HIDDEN in kinds and type(model.lm_head) is not nn.Linear:
            raise Unsupported(
                f"hidden-channel pruning (`scope` channel) is not supported for this baichuan model: its "
                f"`lm_head` is a {type(model.lm_head).__name__} (Baichuan 2 normalises each output row over all "
                "channels), so removed channels cannot reproduce the zeroed ones. Use `scope` block or layer."
            )

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        attn, p = self.layers(model)[i].self_attn, f"model.layers.{i}.self_attn"
        d, width = attn.head_dim, attn.W_pack.out_features // 3
        slices = [Slice(f"{p}.W_pack.weight", 0, d, offset=k * width) for k in range(3)]
        slices.append(Slice(f"{p}.o_proj.weight", 1, d, writes=True))
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, width // d, tuple(slices))

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        layer, p = self.layers(model)[i], f"model.layers.{i}.mlp"
        slices = (
            Slice(f"{p}.gate_proj.weight", 0, 1),
            Slice(f"{p}.up_proj.weight", 0, 1),
            Slice(f"{p}.down_proj.weight", 1, 1, writes=True),
        )
        return Group(f"layers.{i}.mlp", Kind.MLP, i, layer.mlp.gate_proj.out_features, slices)

    def note_removal(self, model: PreTrainedModel, group: Group, elements: list[int]) -> None:
        if group.kind is Kind.KV_GROUPS and self.uses_alibi(model):
            n_heads = model.model.n_head
            alibi.note_heads_removed(model.config, len(self.layers(model)), n_heads, group.layer, elements)

    def layers_kept(self, model: PreTrainedModel, keep: list[int], n_before: int) -> None:
        if self.uses_alibi(model):
            alibi.note_layers_kept(model.config, n_before, model.model.n_head, keep)

    def sync(self, model: PreTrainedModel) -> None:
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            attn.hidden_size = attn.W_pack.out_features // 3
            attn.num_heads = attn.hidden_size // attn.head_dim
            if hasattr(attn, "layer_idx"):
                attn.layer_idx = i
        model.config.num_hidden_layers = len(layers)
        if self.uses_alibi(model):
            alibi.install([layer.self_attn for layer in layers], model.config, model.model.n_head)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for layer in self.layers(model):
            heads = layer.self_attn.W_pack.out_features // 3 // layer.self_attn.head_dim
            shapes.append({"heads": heads, "kv_heads": heads, "mlp": layer.mlp.gate_proj.out_features})
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        # head_dim derives from hidden_size / num_attention_heads: only the MLP width may change.
        config, shape = model.config, uniform_shape(self.layer_shapes(model))
        heads = config.num_attention_heads
        if shape is None or shape["heads"] != heads or model.model.embed_tokens.embedding_dim != config.hidden_size:
            return False
        return set_config_fields(config, intermediate_size=shape["mlp"])
