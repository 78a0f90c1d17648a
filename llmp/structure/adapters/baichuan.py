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

from llmp.errors import LlmpError
from llmp.structure.adapters import alibi
from llmp.structure.adapters.base import Adapter, set_config_fields
from llmp.structure.groups import Group, Kind, Slice, Structure


class BaichuanAdapter(Adapter):
    family = "baichuan"
    model_types = ("baichuan",)
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.HIDDEN, Kind.LAYERS)

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.layers

    @staticmethod
    def uses_alibi(model: PreTrainedModel) -> bool:
        layers = model.model.layers
        return bool(layers) and not hasattr(layers[0].self_attn, "rotary_emb")

    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        groups: list[Group] = []
        for i, layer in enumerate(self.layers(model)):
            if Kind.KV_GROUPS in kinds or Kind.QUERY_HEADS in kinds:
                groups.append(self._head_group(layer, i))
            if Kind.MLP in kinds:
                groups.append(self._mlp_group(layer, i))
        if Kind.HIDDEN in kinds:
            groups.append(self._hidden_group(model))
        if Kind.LAYERS in kinds:
            n = len(self.layers(model))
            groups.append(Group("layers", Kind.LAYERS, None, n, modules=tuple(f"model.layers.{i}" for i in range(n))))
        return Structure(self.family, groups)

    def _head_group(self, layer: nn.Module, i: int) -> Group:
        attn, p = layer.self_attn, f"model.layers.{i}.self_attn"
        d, width = attn.head_dim, attn.W_pack.out_features // 3
        slices = [Slice(f"{p}.W_pack.weight", 0, d, offset=k * width) for k in range(3)]
        slices.append(Slice(f"{p}.o_proj.weight", 1, d, writes=True))
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, width // d, tuple(slices))

    def _mlp_group(self, layer: nn.Module, i: int) -> Group:
        p = f"model.layers.{i}.mlp"
        slices = (
            Slice(f"{p}.gate_proj.weight", 0, 1),
            Slice(f"{p}.up_proj.weight", 0, 1),
            Slice(f"{p}.down_proj.weight", 1, 1, writes=True),
        )
        return Group(f"layers.{i}.mlp", Kind.MLP, i, layer.mlp.gate_proj.out_features, slices)

    def _hidden_group(self, model: PreTrainedModel) -> Group:
        if type(model.lm_head) is not nn.Linear:
            raise LlmpError(
                f"hidden-channel pruning (`scope` channel) is not supported for this baichuan model: its "
                f"`lm_head` is a {type(model.lm_head).__name__} (Baichuan 2 normalises each output row over all "
                "channels), so removed channels cannot reproduce the zeroed ones. Use `scope` block or layer."
            )
        slices = [Slice("model.embed_tokens.weight", 1, 1, writes=True)]
        for i in range(len(self.layers(model))):
            p = f"model.layers.{i}"
            slices += [
                Slice(f"{p}.input_layernorm.weight", 0, 1),
                Slice(f"{p}.self_attn.W_pack.weight", 1, 1),
                Slice(f"{p}.self_attn.o_proj.weight", 0, 1, writes=True),
                Slice(f"{p}.post_attention_layernorm.weight", 0, 1),
                Slice(f"{p}.mlp.gate_proj.weight", 1, 1),
                Slice(f"{p}.mlp.up_proj.weight", 1, 1),
                Slice(f"{p}.mlp.down_proj.weight", 0, 1, writes=True),
            ]
        slices.append(Slice("model.norm.weight", 0, 1))
        if model.lm_head.weight is not model.model.embed_tokens.weight:
            slices.append(Slice("lm_head.weight", 1, 1))
        return Group("hidden", Kind.HIDDEN, None, model.model.embed_tokens.embedding_dim, tuple(slices))

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        return [f"model.layers.{i}.self_attn.o_proj.weight", f"model.layers.{i}.mlp.down_proj.weight"]

    def note_removal(self, model: PreTrainedModel, group: Group, elements: list[int]) -> None:
        if group.kind is Kind.KV_GROUPS and self.uses_alibi(model):
            n_heads = model.model.n_head
            alibi.note_heads_removed(model.config, len(self.layers(model)), n_heads, group.layer, elements)

    def remove_layers(self, model: PreTrainedModel, drop: list[int]) -> None:
        n = len(self.layers(model))
        keep = [i for i in range(n) if i not in set(drop)]
        if self.uses_alibi(model):
            alibi.note_layers_kept(model.config, n, model.model.n_head, keep)
        model.model.layers = nn.ModuleList(self.layers(model)[i] for i in keep)

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
        config, shapes = model.config, self.layer_shapes(model)
        heads = config.num_attention_heads
        intact = model.model.embed_tokens.embedding_dim == config.hidden_size
        if (
            not shapes
            or not intact
            or any(s != {"heads": heads, "kv_heads": heads, "mlp": shapes[0]["mlp"]} for s in shapes)
        ):
            return False
        return set_config_fields(config, intermediate_size=shapes[0]["mlp"])

    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        # RMSNorm, as for Llama: weights × sqrt(old/new) and eps × old/new give exactly the masked
        # model's output. Baichuan-7B calls eps `variance_epsilon`, 13B `epsilon`.
        gain, eps_gain = (old / new) ** 0.5, old / new
        norms = [model.model.norm]
        for layer in self.layers(model):
            norms += [layer.input_layernorm, layer.post_attention_layernorm]
        for norm in norms:
            norm.weight.data.mul_(gain)
            attr = "variance_epsilon" if hasattr(norm, "variance_epsilon") else "epsilon"
            setattr(norm, attr, getattr(norm, attr) * eps_gain)
        model.config.rms_norm_eps *= eps_gain
