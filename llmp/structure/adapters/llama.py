"""The Llama layout: LLaMA-1/2/3/3.1, Vicuna, TinyLlama, SmolLM2, and Mistral / Qwen2 (q/k/v biases).

One decoder layer::

    x ─ input_layernorm ─┬ q_proj ┐                   ┌ o_proj ─(+x)─ post_attention_layernorm ─┬ gate_proj ┐
                         ├ k_proj ├ rope, attention ──┘                                          └ up_proj ──┴ silu(g)*u ─ down_proj ─(+)
                         └ v_proj ┘

Query head h reads key/value head ``h // (n_q / n_kv)``: the heads of one KV group are consecutive
rows of ``q_proj``, and removing query heads must keep the same count in every KV group, or the
attention kernel (which derives the grouping from ``num_key_value_groups``) pairs them wrongly.
"""

from __future__ import annotations

from typing import ClassVar

from transformers import PreTrainedModel

from llmp.structure.adapters.base import Adapter, set_config_fields, uniform_shape
from llmp.structure.groups import Group, Kind, Slice


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS)
    hidden_norms = ("input_layernorm", "post_attention_layernorm")
    hidden_readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
    hidden_writers = ("self_attn.o_proj", "mlp.down_proj")
    bias_flags: ClassVar[dict[str, tuple[str, ...]]] = {
        "attention_bias": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"),
        "mlp_bias": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    }

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        attn, p = self.layers(model)[i].self_attn, f"model.layers.{i}.self_attn"
        d = attn.head_dim
        n_q, n_kv = attn.q_proj.out_features // d, attn.k_proj.out_features // d
        per_group = n_q // n_kv
        if Kind.QUERY_HEADS in kinds and per_group > 1:
            slices = [Slice(f"{p}.q_proj.weight", 0, d), Slice(f"{p}.o_proj.weight", 1, d, writes=True)]
            if attn.q_proj.bias is not None:
                slices.append(Slice(f"{p}.q_proj.bias", 0, d))
            return Group(f"layers.{i}.query_heads", Kind.QUERY_HEADS, i, n_q, tuple(slices), blocks=n_kv)
        # Whole KV groups; with MHA (one query head per KV head) this is plain head pruning.
        qw = per_group * d
        slices = [
            Slice(f"{p}.q_proj.weight", 0, qw),
            Slice(f"{p}.k_proj.weight", 0, d),
            Slice(f"{p}.v_proj.weight", 0, d),
            Slice(f"{p}.o_proj.weight", 1, qw, writes=True),
        ]
        for name, width in (("q_proj", qw), ("k_proj", d), ("v_proj", d)):
            if getattr(attn, name).bias is not None:
                slices.append(Slice(f"{p}.{name}.bias", 0, width))
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, n_kv, tuple(slices))

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        mlp, p = self.layers(model)[i].mlp, f"model.layers.{i}.mlp"
        slices = [
            Slice(f"{p}.gate_proj.weight", 0, 1),
            Slice(f"{p}.up_proj.weight", 0, 1),
            Slice(f"{p}.down_proj.weight", 1, 1, writes=True),
        ]
        slices += [Slice(f"{p}.{n}.bias", 0, 1) for n in ("gate_proj", "up_proj") if getattr(mlp, n).bias is not None]
        return Group(f"layers.{i}.mlp", Kind.MLP, i, mlp.gate_proj.out_features, tuple(slices))

    def sync(self, model: PreTrainedModel) -> None:
        config = model.config
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            attn.layer_idx = i
            attn.num_key_value_groups = attn.q_proj.out_features // attn.k_proj.out_features
        config.num_hidden_layers = len(layers)
        if layers:
            config.head_dim = layers[0].self_attn.head_dim
        set_config_fields(config, hidden_size=model.model.embed_tokens.embedding_dim)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for layer in self.layers(model):
            attn, d = layer.self_attn, layer.self_attn.head_dim
            shapes.append(
                {
                    "heads": attn.q_proj.out_features // d,
                    "kv_heads": attn.k_proj.out_features // d,
                    "mlp": layer.mlp.gate_proj.out_features,
                }
            )
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        shape = uniform_shape(self.layer_shapes(model))
        if shape is None:
            return False
        return set_config_fields(
            model.config,
            hidden_size=model.model.embed_tokens.embedding_dim,
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv_heads"],
            intermediate_size=shape["mlp"],
        )
