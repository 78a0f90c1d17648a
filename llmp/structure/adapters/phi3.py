"""The Phi-3 layout: Llama with fused projections (Phi-3 / Phi-3.5 / Phi-4-mini).

One decoder layer reads the Llama module names except for two fused projections, whose rows are
concatenated parts (``n_q`` query heads, ``n_kv`` key/value heads, head size ``d``, ``I`` MLP channels)::

    qkv_proj rows      [0, n_q·d) q  |  [n_q·d, (n_q+n_kv)·d) k  |  [(n_q+n_kv)·d, (n_q+2·n_kv)·d) v
    gate_up_proj rows  [0, I) gate   |  [I, 2I) up        MLP channel c owns rows c and I + c

so each part is a :class:`Slice` with its own ``offset``. The forward splits ``qkv_proj`` at
``config.num_attention_heads · d``: a layer whose head count differs from the config's gets a
view of the config with its own count (:class:`LayerConfig`). Norms are Llama's RMSNorm, so
hidden-channel pruning and its exact rescaling are the Llama adapter's.
"""

from __future__ import annotations

from torch import nn
from transformers import PreTrainedModel

from llmp.structure.adapters.base import set_config_fields
from llmp.structure.adapters.llama import LlamaAdapter
from llmp.structure.groups import Group, Kind, Slice


class LayerConfig:
    """The model's config as one attention layer sees it: everything shared, its own head count.

    Reads of any other field go to the model's config, so later changes there (the attention
    implementation, say) still reach the layer. The model's ``config.json`` is never this object.
    """

    def __init__(self, base, num_attention_heads: int) -> None:
        self.__dict__.update(_base=base, num_attention_heads=num_attention_heads)

    def __getattr__(self, name: str):
        base = self.__dict__.get("_base")
        if base is None:  # during copy/unpickling, before __dict__ is restored
            raise AttributeError(name)
        return getattr(base, name)

    def __setattr__(self, name: str, value) -> None:
        if name == "num_attention_heads":
            self.__dict__[name] = value
        else:
            setattr(self._base, name, value)


class Phi3Adapter(LlamaAdapter):
    family = "phi3"
    model_types = ("phi3",)
    hidden_readers = ("self_attn.qkv_proj", "mlp.gate_up_proj")

    @staticmethod
    def counts(attn: nn.Module) -> tuple[int, int]:
        """(query heads, key/value heads) of one attention module, read from its weights."""
        d = attn.head_dim
        n_q = attn.o_proj.weight.shape[1] // d
        return n_q, (attn.qkv_proj.weight.shape[0] // d - n_q) // 2

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        attn, p = self.layers(model)[i].self_attn, f"model.layers.{i}.self_attn"
        d = attn.head_dim
        n_q, n_kv = self.counts(attn)
        per_group = n_q // n_kv
        qkv, o = f"{p}.qkv_proj.weight", f"{p}.o_proj.weight"
        if Kind.QUERY_HEADS in kinds and per_group > 1:
            slices = (Slice(qkv, 0, d), Slice(o, 1, d, writes=True))
            return Group(f"layers.{i}.query_heads", Kind.QUERY_HEADS, i, n_q, slices, blocks=n_kv)
        qw = per_group * d
        slices = (
            Slice(qkv, 0, qw),  # the group's query heads
            Slice(qkv, 0, d, offset=n_q * d),  # its key head
            Slice(qkv, 0, d, offset=(n_q + n_kv) * d),  # its value head
            Slice(o, 1, qw, writes=True),
        )
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, n_kv, slices)

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        p = f"model.layers.{i}.mlp"
        channels = self.layers(model)[i].mlp.down_proj.weight.shape[1]
        slices = (
            Slice(f"{p}.gate_up_proj.weight", 0, 1),  # gate row c
            Slice(f"{p}.gate_up_proj.weight", 0, 1, offset=channels),  # up row I + c
            Slice(f"{p}.down_proj.weight", 1, 1, writes=True),
        )
        return Group(f"layers.{i}.mlp", Kind.MLP, i, channels, slices)

    def sync(self, model: PreTrainedModel) -> None:
        config = model.config
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            n_q, n_kv = self.counts(attn)
            attn.layer_idx = i
            attn.num_key_value_heads = n_kv
            attn.num_key_value_groups = n_q // n_kv
            attn.config = config if n_q == config.num_attention_heads else LayerConfig(config, n_q)
        config.num_hidden_layers = len(layers)
        if layers:
            config.head_dim = layers[0].self_attn.head_dim
        set_config_fields(config, hidden_size=model.model.embed_tokens.embedding_dim)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for layer in self.layers(model):
            n_q, n_kv = self.counts(layer.self_attn)
            shapes.append({"heads": n_q, "kv_heads": n_kv, "mlp": layer.mlp.down_proj.weight.shape[1]})
        return shapes
