"""The OPT layout (Meta's OPT-125m … 66b): multi-head attention, biases, LayerNorm, learned positions.

One decoder layer (``do_layer_norm_before``; OPT-350m normalises after each residual add instead)::

    x ─ self_attn_layer_norm ─┬ q_proj ┐                  ┌ out_proj ─(+x)─ final_layer_norm ─ fc1 ─ relu ─ fc2 ─(+)
                              ├ k_proj ├─ attention ──────┘
                              └ v_proj ┘

Head ``h`` owns rows ``[h·d, h·d + d)`` of q/k/v (weights and biases) and those columns of
``out_proj``; MLP channel ``c`` owns row ``c`` of ``fc1`` and column ``c`` of ``fc2``. The output
biases (``out_proj``, ``fc2``) belong to no head or channel and stay.

Refused, because no smaller model computes what the masked one does:

- hidden channels: LayerNorm subtracts the mean over *all* channels, so removing channels that
  are zero in the masked model changes the mean and variance of the others (and its bias makes the
  removed channels non-zero again for the next projection). This also covers the learned position
  embeddings and ``project_in``/``project_out`` (OPT-350m), which only hidden pruning would cut.
- whole layers when ``do_layer_norm_before`` is false (OPT-350m): the LayerNorms sit after the
  residual adds, so a layer whose writes are zero still renormalises the stream.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llmp.structure.adapters.base import Adapter, Unsupported, set_config_fields, uniform_shape
from llmp.structure.groups import Group, Kind, Slice


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS)
    layers_path = "model.decoder.layers"
    layernorm = True
    hidden_writers = ("self_attn.out_proj", "fc2")  # zeroed (weights and biases), a layer passes its input on

    def check_kinds(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> None:
        """Refuse the removals OPT cannot make exactly (see the module docstring).

        Raises:
            Unsupported: hidden channels, or whole layers of a post-LayerNorm model, were asked for.
        """
        super().check_kinds(model, kinds)
        if Kind.LAYERS in kinds and not model.config.do_layer_norm_before:
            raise Unsupported(
                "layer pruning (`scope` layer) is not supported for opt models with do_layer_norm_before=false "
                "(OPT-350m): their LayerNorm follows each residual add, so a removed layer still changed the "
                "stream. Use `scope` block (attention heads, MLP channels)."
            )

    def attention_group(self, model: PreTrainedModel, i: int, kinds: tuple[Kind, ...]) -> Group:
        # Multi-head attention: every head is its own KV group (named like Llama's for one vocabulary).
        attn, p = self.layers(model)[i].self_attn, f"model.decoder.layers.{i}.self_attn"
        d = attn.head_dim
        slices = [Slice(f"{p}.out_proj.weight", 1, d, writes=True)]
        for name in ("q_proj", "k_proj", "v_proj"):
            slices.append(Slice(f"{p}.{name}.weight", 0, d))
            if getattr(attn, name).bias is not None:
                slices.append(Slice(f"{p}.{name}.bias", 0, d))
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, attn.q_proj.out_features // d, tuple(slices))

    def mlp_group(self, model: PreTrainedModel, i: int) -> Group:
        layer, p = self.layers(model)[i], f"model.decoder.layers.{i}"
        slices = [Slice(f"{p}.fc1.weight", 0, 1), Slice(f"{p}.fc2.weight", 1, 1, writes=True)]
        if layer.fc1.bias is not None:
            slices.append(Slice(f"{p}.fc1.bias", 0, 1))
        return Group(f"layers.{i}.mlp", Kind.MLP, i, layer.fc1.out_features, tuple(slices))

    def sync(self, model: PreTrainedModel) -> None:
        layers = self.layers(model)
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            attn.layer_idx = i
            attn.num_heads = attn.q_proj.out_features // attn.head_dim  # the forward's view(.., num_heads, d)
        model.config.num_hidden_layers = len(layers)

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for layer in self.layers(model):
            heads = layer.self_attn.q_proj.out_features // layer.self_attn.head_dim
            shapes.append({"heads": heads, "kv_heads": heads, "mlp": layer.fc1.out_features})
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        # OPT derives head_dim = hidden_size / num_attention_heads, so a config cannot say "fewer
        # heads of the same size": only MLP-only pruning gives a plain OPT config.
        shape = uniform_shape(self.layer_shapes(model))
        if shape is None or shape["heads"] != model.config.num_attention_heads:
            return False
        return set_config_fields(model.config, ffn_dim=shape["mlp"])
