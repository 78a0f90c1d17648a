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

from torch import nn
from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.structure.adapters.base import Adapter, set_config_fields
from llmp.structure.groups import Group, Kind, Slice, Structure


class OPTAdapter(Adapter):
    family = "opt"
    model_types = ("opt",)
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS)

    def layers(self, model: PreTrainedModel) -> nn.ModuleList:
        return model.model.decoder.layers

    def check_kinds(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> None:
        """Refuse the removals OPT cannot make exactly (see the module docstring).

        Raises:
            LlmpError: hidden channels, or whole layers of a post-LayerNorm model, were asked for.
        """
        problems = []
        if Kind.HIDDEN in kinds:
            problems.append(
                "hidden-channel pruning (`scope` channel) is not supported for opt: its LayerNorm subtracts the "
                "mean over all channels, so removed channels cannot reproduce the model with those channels "
                "zeroed. Use `scope` block (attention heads, MLP channels) or `scope` layer."
            )
        if Kind.LAYERS in kinds and not model.config.do_layer_norm_before:
            problems.append(
                "layer pruning (`scope` layer) is not supported for opt models with do_layer_norm_before=false "
                "(OPT-350m): their LayerNorm follows each residual add, so a removed layer still changed the "
                "stream. Use `scope` block (attention heads, MLP channels)."
            )
        if problems:
            raise LlmpError("; ".join(problems))

    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        self.check_kinds(model, kinds)
        groups: list[Group] = []
        for i, layer in enumerate(self.layers(model)):
            if Kind.KV_GROUPS in kinds or Kind.QUERY_HEADS in kinds:
                groups.append(self._head_group(layer, i))
            if Kind.MLP in kinds:
                groups.append(self._mlp_group(layer, i))
        if Kind.LAYERS in kinds:
            n = len(self.layers(model))
            modules = tuple(f"model.decoder.layers.{i}" for i in range(n))
            groups.append(Group("layers", Kind.LAYERS, None, n, modules=modules))
        return Structure(self.family, groups)

    def _head_group(self, layer: nn.Module, i: int) -> Group:
        # Multi-head attention: every head is its own KV group (named like Llama's for one vocabulary).
        attn, p = layer.self_attn, f"model.decoder.layers.{i}.self_attn"
        d = attn.head_dim
        slices = [Slice(f"{p}.out_proj.weight", 1, d, writes=True)]
        for name in ("q_proj", "k_proj", "v_proj"):
            slices.append(Slice(f"{p}.{name}.weight", 0, d))
            if getattr(attn, name).bias is not None:
                slices.append(Slice(f"{p}.{name}.bias", 0, d))
        return Group(f"layers.{i}.kv_groups", Kind.KV_GROUPS, i, attn.q_proj.out_features // d, tuple(slices))

    def _mlp_group(self, layer: nn.Module, i: int) -> Group:
        p = f"model.decoder.layers.{i}"
        slices = [Slice(f"{p}.fc1.weight", 0, 1), Slice(f"{p}.fc2.weight", 1, 1, writes=True)]
        if layer.fc1.bias is not None:
            slices.append(Slice(f"{p}.fc1.bias", 0, 1))
        return Group(f"layers.{i}.mlp", Kind.MLP, i, layer.fc1.out_features, tuple(slices))

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        layer, p = self.layers(model)[i], f"model.decoder.layers.{i}"
        names = []
        for name, module in (("self_attn.out_proj", layer.self_attn.out_proj), ("fc2", layer.fc2)):
            names.append(f"{p}.{name}.weight")
            if module.bias is not None:
                names.append(f"{p}.{name}.bias")
        return names

    def remove_layers(self, model: PreTrainedModel, drop: list[int]) -> None:
        keep = [i for i in range(len(self.layers(model))) if i not in set(drop)]
        model.model.decoder.layers = nn.ModuleList(self.layers(model)[i] for i in keep)

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
        shapes = self.layer_shapes(model)
        if not shapes or any(s != shapes[0] for s in shapes):
            return False
        if shapes[0]["heads"] != model.config.num_attention_heads:
            return False
        return set_config_fields(model.config, ffn_dim=shapes[0]["mlp"])

    def rescale_hidden(self, model: PreTrainedModel, old: int, new: int) -> None:
        self.check_kinds(model, (Kind.HIDDEN,))
