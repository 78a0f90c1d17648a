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

from torch import nn
from transformers import PreTrainedModel

from llmp.structure.adapters.base import Adapter, set_config_fields
from llmp.structure.groups import Group, Kind, Slice, Structure


class LlamaAdapter(Adapter):
    family = "llama"
    model_types = ("llama", "mistral", "qwen2")
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS)

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.layers

    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        groups: list[Group] = []
        for i, layer in enumerate(self.layers(model)):
            if Kind.KV_GROUPS in kinds or Kind.QUERY_HEADS in kinds:
                groups.append(self._attention_group(layer, i, kinds))
            if Kind.MLP in kinds:
                groups.append(self._mlp_group(layer, i))
        if Kind.HIDDEN in kinds:
            groups.append(self._hidden_group(model))
        if Kind.LAYERS in kinds:
            groups.append(self._layer_group(model))
        return Structure(self.family, groups)

    def _attention_group(self, layer: nn.Module, i: int, kinds: tuple[Kind, ...]) -> Group:
        attn, p = layer.self_attn, f"model.layers.{i}.self_attn"
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

    def _mlp_group(self, layer: nn.Module, i: int) -> Group:
        mlp, p = layer.mlp, f"model.layers.{i}.mlp"
        slices = [
            Slice(f"{p}.gate_proj.weight", 0, 1),
            Slice(f"{p}.up_proj.weight", 0, 1),
            Slice(f"{p}.down_proj.weight", 1, 1, writes=True),
        ]
        slices += [Slice(f"{p}.{n}.bias", 0, 1) for n in ("gate_proj", "up_proj") if getattr(mlp, n).bias is not None]
        return Group(f"layers.{i}.mlp", Kind.MLP, i, mlp.gate_proj.out_features, tuple(slices))

    def _hidden_group(self, model: PreTrainedModel) -> Group:
        slices = [Slice("model.embed_tokens.weight", 1, 1, writes=True)]
        for i, layer in enumerate(self.layers(model)):
            p = f"model.layers.{i}"
            slices.append(Slice(f"{p}.input_layernorm.weight", 0, 1))
            slices += [Slice(f"{p}.self_attn.{n}.weight", 1, 1) for n in ("q_proj", "k_proj", "v_proj")]
            slices.append(Slice(f"{p}.post_attention_layernorm.weight", 0, 1))
            slices += [Slice(f"{p}.mlp.{n}.weight", 1, 1) for n in ("gate_proj", "up_proj")]
            for module, name in ((layer.self_attn.o_proj, "self_attn.o_proj"), (layer.mlp.down_proj, "mlp.down_proj")):
                slices.append(Slice(f"{p}.{name}.weight", 0, 1, writes=True))
                if module.bias is not None:
                    slices.append(Slice(f"{p}.{name}.bias", 0, 1, writes=True))
        slices.append(Slice("model.norm.weight", 0, 1))
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            slices.append(Slice("lm_head.weight", 1, 1))
        return Group("hidden", Kind.HIDDEN, None, model.config.hidden_size, tuple(slices))

    def _layer_group(self, model: PreTrainedModel) -> Group:
        n = len(self.layers(model))
        return Group("layers", Kind.LAYERS, None, n, modules=tuple(f"model.layers.{i}" for i in range(n)))

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        """Parameters through which layer ``i`` writes into the residual stream."""
        layer, p = self.layers(model)[i], f"model.layers.{i}"
        names = [f"{p}.self_attn.o_proj.weight", f"{p}.mlp.down_proj.weight"]
        names += [
            f"{p}.{n}.bias"
            for n, m in (("self_attn.o_proj", layer.self_attn.o_proj), ("mlp.down_proj", layer.mlp.down_proj))
            if m.bias is not None
        ]
        return names

    def remove_layers(self, model: PreTrainedModel, drop: list[int]) -> None:
        keep = [i for i in range(len(self.layers(model))) if i not in set(drop)]
        model.model.layers = nn.ModuleList(self.layers(model)[i] for i in keep)
        if getattr(model.config, "layer_types", None) is not None:
            model.config.layer_types = [model.config.layer_types[i] for i in keep]

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
        shapes = self.layer_shapes(model)
        if not shapes or any(s != shapes[0] for s in shapes):
            return False
        return set_config_fields(
            model.config,
            hidden_size=model.model.embed_tokens.embedding_dim,
            num_attention_heads=shapes[0]["heads"],
            num_key_value_heads=shapes[0]["kv_heads"],
            intermediate_size=shapes[0]["mlp"],
        )

    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        # RMSNorm divides by sqrt(mean(x^2) + eps); the mean now runs over `new` channels instead
        # of `old` (the removed ones were the zeros of the masked model). Scaling the weights by
        # sqrt(old/new) and eps by old/new gives exactly the masked model's output.
        gain, eps_gain = (old / new) ** 0.5, old / new
        norms = [model.model.norm]
        for layer in self.layers(model):
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            norm.weight.data.mul_(gain)
            norm.variance_epsilon *= eps_gain
        model.config.rms_norm_eps *= eps_gain
