"""GPT-NeoX (``GPTNeoXForCausalLM``: Pythia, GPT-NeoX-20B, StableLM-alpha): fused QKV per head,
partial rotary, parallel residual, LayerNorm with biases.

One decoder layer (``gpt_neox.layers.i``), parallel residual form::

    x ─┬ input_layernorm ─ query_key_value ─ view [heads, 3d] ─ rope(first rotary_ndims) ─ attn ─ dense ─┐
       ├ post_attention_layernorm ─ dense_h_to_4h ─ gelu ─ dense_4h_to_h ───────────────────────────────(+)─(+x)
       └────────────────────────────────────────────────────────────────────────────────────────────────┘

The forward views the fused output as ``(..., -1, 3 * head_size)`` and chunks it into q, k, v, so
head ``h`` owns rows ``[3dh, 3dh + 3d)`` and ``dense`` columns ``[dh, dh + d)``; the head count
comes from the weights (the ``-1``) and the rotary part of each head is unchanged, so only the
weights change. GPT-NeoX is multi-head: heads are ``KV_GROUPS``. The config keeps its head count
(the head size and rotary size derive from it). Hidden channels are refused (LayerNorm, see
:mod:`llmp.structure.adapters.fused`).
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.structure.adapters.base import set_config_fields
from llmp.structure.adapters.fused import FusedQKVAdapter
from llmp.structure.groups import Group, Kind


class GPTNeoXAdapter(FusedQKVAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    attention = "attention"

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        attn = self.attn(model, i)
        d = attn.head_size
        slices = [*self.head_slices(model, i, 3 * d), self.dense_slice(model, i, d)]
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, attn.dense.in_features // d, tuple(slices))

    def sync(self, model: PreTrainedModel) -> None:
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            layer.attention.layer_idx = i
        model.config.num_hidden_layers = len(layers)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for i, layer in enumerate(self.layers(model)):
            heads = layer.attention.dense.in_features // layer.attention.head_size
            shapes.append({"heads": heads, "kv_heads": heads, "mlp": self.mlp_width(model, i)})
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        # GPTNeoXConfig derives the head size from hidden_size / num_attention_heads: only the
        # MLP width (intermediate_size) can change in a plain GPT-NeoX checkpoint.
        config, shapes = model.config, self.layer_shapes(model)
        heads = config.num_attention_heads
        if not shapes or any(s != {"heads": heads, "kv_heads": heads, "mlp": shapes[0]["mlp"]} for s in shapes):
            return False
        return set_config_fields(config, intermediate_size=shapes[0]["mlp"])
