"""Falcon (``FalconForCausalLM``): fused QKV in three layouts, parallel attention + MLP.

One decoder layer (``transformer.h.i``), parallel form::

    x ─┬ ln_attn (or input_layernorm) ─ query_key_value ─ rope/alibi attention ─ dense ─┐
       ├ ln_mlp  (or the same norm)   ─ dense_h_to_4h ─ gelu ─ dense_4h_to_h ──────────(+)─(+x)
       └────────────────────────────────────────────────────────────────────────────────┘

The rows of ``query_key_value`` (head size ``d``) are laid out as the forward views them:

    new_decoder_architecture (40B/180B)  [kv_groups, q_per_group + 2, d]: q0 q1 .. k v | q.. k v
    multi_query (7B)                     [q0 .. q_{n-1}, k, v]: one key/value head for all
    neither (falcon-rw, MHA)             [heads, 3, d]: q k v per head, like BLOOM

``KV_GROUPS`` removes a KV group with its query heads (whole heads for MHA; multi-query has one
KV head, which stays). ``QUERY_HEADS`` removes query heads evenly inside each KV group: in the
grouped layout query head ``e`` starts at row ``e*d + (e // q_per_group) * 2d`` (the gap skips each
group's k and v rows). ``head_dim`` is kept; per-layer ``num_heads``/``num_kv_heads`` follow the
weights and the config keeps its head counts (the rotary size derives from them). Falcon-RW's
ALiBi is handled like BLOOM's (:mod:`llmp.structure.adapters.alibi`). Hidden channels are refused
(LayerNorm, see :mod:`llmp.structure.adapters.fused`).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.structure.adapters import alibi
from llmp.structure.adapters.base import set_config_fields
from llmp.structure.adapters.fused import FusedQKVAdapter
from llmp.structure.groups import Group, Kind


class FalconAdapter(FusedQKVAdapter):
    family = "falcon"
    model_types = ("falcon",)
    layers_path = "transformer.h"
    attention = "self_attention"

    def heads(self, model: PreTrainedModel, i: int) -> tuple[int, int, int]:
        """``(query heads, KV heads, head size)`` of layer ``i``, read from the weights."""
        attn = self.attn(model, i)
        d = attn.head_dim
        n_q = attn.dense.in_features // d
        if model.config.new_decoder_architecture:
            return n_q, (attn.query_key_value.out_features // d - n_q) // 2, d
        return n_q, 1 if model.config.multi_query else n_q, d

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        n_q, n_kv, d = self.heads(model, i)
        per = n_q // n_kv
        grouped = model.config.new_decoder_architecture
        if Kind.QUERY_HEADS in kinds and per > 1:
            layout = {"gap": 2 * d, "gap_every": per} if grouped else {}
            slices = [*self.head_slices(model, i, d, **layout), self.dense_slice(model, i, d)]
            return Group(f"layers.{i}.query_heads", Kind.QUERY_HEADS, i, n_q, tuple(slices), blocks=n_kv)
        if grouped:  # a KV group is one contiguous run: its query heads, k, v
            slices = self.head_slices(model, i, (per + 2) * d)
        elif n_kv == 1 and n_q > 1:  # multi-query: the only KV group is every row
            slices = self.head_slices(model, i, (n_q + 2) * d)
        else:  # MHA, [heads, 3, d]
            slices = self.head_slices(model, i, 3 * d)
        slices.append(self.dense_slice(model, i, per * d))
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, n_kv, tuple(slices))

    def note_removal(self, model: PreTrainedModel, group: Group, elements: list[int]) -> None:
        if not model.config.alibi or group.kind not in (Kind.KV_GROUPS, Kind.QUERY_HEADS):
            return
        n_q, n_kv, _ = self.heads(model, group.layer)
        per = n_q // n_kv if group.kind is Kind.KV_GROUPS else 1
        heads = [e * per + j for e in elements for j in range(per)]
        config = model.config
        alibi.note_heads_removed(config, len(self.layers(model)), config.num_attention_heads, group.layer, heads)

    def layers_kept(self, model: PreTrainedModel, keep: list[int], n_before: int) -> None:
        alibi.note_layers_kept(model.config, n_before, model.config.num_attention_heads, keep)

    def sync(self, model: PreTrainedModel) -> None:
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            attn = layer.self_attention
            n_q, n_kv, d = self.heads(model, i)
            attn.num_heads = layer.num_heads = n_q
            attn.num_kv_heads = n_kv
            attn.num_key_value_groups = n_q // n_kv  # read by transformers' attention functions (>= 5.2x)
            attn.hidden_size = attn.split_size = n_q * d
            attn.layer_idx = i
        model.config.num_hidden_layers = len(layers)
        if model.config.alibi:
            alibi.install([layer.self_attention for layer in layers], model.config, model.transformer.num_heads)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for i in range(len(self.layers(model))):
            n_q, n_kv, _ = self.heads(model, i)
            shapes.append({"heads": n_q, "kv_heads": n_kv, "mlp": self.mlp_width(model, i)})
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        # FalconConfig derives the head size from hidden_size / num_attention_heads, so only the
        # MLP width (ffn_hidden_size) can change in a plain Falcon checkpoint.
        config, shapes = model.config, self.layer_shapes(model)
        if config.new_decoder_architecture:
            n_kv = config.num_kv_heads
        else:
            n_kv = 1 if config.multi_query else config.num_attention_heads
        intact = {"heads": config.num_attention_heads, "kv_heads": n_kv}
        if not shapes or any(s != {**intact, "mlp": shapes[0]["mlp"]} for s in shapes):
            return False
        if config.alibi and not alibi.is_identity(config, config.num_attention_heads):
            return False
        return set_config_fields(config, ffn_hidden_size=shapes[0]["mlp"])
