"""GPT-BigCode (SantaCoder, StarCoder, StarCoderBase): one fused ``c_attn``, multi-query attention,
LayerNorm, learned positions. The worked example of ``docs/adapters.md``: the whole API in one file.

One block (``transformer.h.i``)::

    x ─ ln_1 ─ c_attn ─ split q | k | v ─ attention ─ attn.c_proj ─(+x)─ ln_2 ─ c_fc ─ gelu ─ mlp.c_proj ─(+)

The rows of ``c_attn`` (``n`` query heads of ``d`` rows) are read in one of two ways::

    multi_query (StarCoder)   [q0 q1 .. q(n-1) | k | v]   split at (embed_dim, d, d): one KV head
    multi-head                [q0 k0 v0 | q1 k1 v1 | ..]  view [n, 3d]: head h owns rows [3dh, 3dh + 3d)

Head ``h`` writes through columns ``[dh, dh + d)`` of ``attn.c_proj``. The forward splits at
``attn.embed_dim`` and views by ``attn.num_heads``, so :meth:`GPTBigCodeAdapter.sync` sets both
from the weights. Hidden channels are refused: LayerNorm subtracts the mean over all channels,
so removing channels that are zero in the masked model changes what the others compute.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.structure.adapters.base import Adapter, set_config_fields, uniform_shape
from llmp.structure.groups import Group, Kind, Slice


class GPTBigCodeAdapter(Adapter):
    family = "gpt_bigcode"
    model_types = ("gpt_bigcode",)
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS)
    layers_path = "transformer.h"
    layernorm = True
    hidden_writers = ("attn.c_proj", "mlp.c_proj")  # zeroed (weights and biases), a layer passes its input on

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        attn, p = self.layers(model)[i].attn, f"transformer.h.{i}.attn"
        d = attn.head_dim
        n = attn.c_proj.in_features // d
        if not attn.multi_query:  # multi-head: each head is a KV group, its q, k, v rows side by side
            slices = [Slice(f"{p}.c_attn.{w}", 0, 3 * d) for w in ("weight", "bias")]
            slices.append(Slice(f"{p}.c_proj.weight", 1, d, writes=True))
            return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, n, tuple(slices))
        if Kind.QUERY_HEADS in kinds:  # query head h: rows [hd, hd + d), ahead of the shared k and v
            slices = [Slice(f"{p}.c_attn.{w}", 0, d) for w in ("weight", "bias")]
            slices.append(Slice(f"{p}.c_proj.weight", 1, d, writes=True))
            return Group(f"layers.{i}.query_heads", Kind.QUERY_HEADS, i, n, tuple(slices))
        # The one KV group of multi-query attention is every row; it is never removed whole.
        slices = [Slice(f"{p}.c_attn.{w}", 0, (n + 2) * d) for w in ("weight", "bias")]
        slices.append(Slice(f"{p}.c_proj.weight", 1, n * d, writes=True))
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, 1, tuple(slices))

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        block, p = self.layers(model)[i], f"transformer.h.{i}.mlp"
        slices = (
            Slice(f"{p}.c_fc.weight", 0, 1),
            Slice(f"{p}.c_fc.bias", 0, 1),
            Slice(f"{p}.c_proj.weight", 1, 1, writes=True),
        )
        return Group(f"layers.{i}.mlp", Kind.MLP, i, block.mlp.c_fc.out_features, slices)

    def sync(self, model: PreTrainedModel) -> None:
        layers = self.layers(model)
        for i, block in enumerate(layers):
            attn = block.attn
            attn.layer_idx = i  # the KV cache is indexed by it
            attn.num_heads = attn.c_proj.in_features // attn.head_dim  # the multi-head view [n, 3d]
            attn.embed_dim = attn.c_proj.in_features  # the multi-query split (embed_dim, d, d)
            attn.num_key_value_groups = attn.num_heads // attn.kv_heads if attn.multi_query else 1
        model.config.n_layer = len(layers)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for block in self.layers(model):
            heads = block.attn.c_proj.in_features // block.attn.head_dim
            kv_heads = 1 if block.attn.multi_query else heads
            shapes.append({"heads": heads, "kv_heads": kv_heads, "mlp": block.mlp.c_fc.out_features})
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        # The config derives head_dim = n_embd / n_head: only MLP-only pruning gives a plain config.
        shape = uniform_shape(self.layer_shapes(model))
        if shape is None or shape["heads"] != model.config.n_head:
            return False
        return set_config_fields(model.config, n_inner=shape["mlp"])
