"""Mixture-of-experts decoders in transformers 5's fused layout: Qwen3-MoE, Qwen2-MoE (with its
shared expert), Mixtral, OLMoE.

A MoE layer's ``mlp`` is a sparse block of a router and the experts, held as 3-D tensors::

    mlp.gate.weight                [E, hidden]        router: logits → softmax → top-k (→ renormalised)
    mlp.experts.gate_up_proj       [E, 2·inter, hidden]  per expert: [gate; up] rows
    mlp.experts.down_proj          [E, hidden, inter]
    mlp.shared_expert.*            Qwen2-MoE: a dense MLP every token runs, scaled by sigmoid(shared_expert_gate)

Expert ``e`` of a layer is index ``e`` of the router's rows and of both expert tensors' first
dimension: one :class:`Group` of kind ``EXPERTS`` per MoE layer slices all three. A removed
expert must compute what the original computes with that expert's router logit at −∞ before the
softmax (:meth:`MoeAdapter.mask_experts`): the softmax over the kept logits alone is exactly that.

Attention, dense layers' MLP channels and whole layers are as in the Llama layout. OLMoE's query
and key norms run over all heads at once (like a LayerNorm over the stream), so its heads are
refused; Qwen3-MoE's norms are per head and its heads prune as Llama's.
"""

from __future__ import annotations

import types
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from llmp.structure.adapters.base import Unsupported, set_config_fields
from llmp.structure.adapters.llama import LlamaAdapter
from llmp.structure.groups import Group, Kind, Slice, Structure

BLOCKS = ("mlp", "block_sparse_moe")  # the sparse block's name in a layer (Granite-MoE: block_sparse_moe)
ROUTERS = ("gate", "router")  # the router's name in the block (Granite-MoE: router)


def block_name(layer: nn.Module) -> str | None:
    """The name of the layer's sparse MoE block (a router and fused ``experts``), ``None`` for a dense MLP."""
    for name in BLOCKS:
        block = getattr(layer, name, None)
        experts = getattr(block, "experts", None)
        if experts is not None and hasattr(experts, "gate_up_proj") and router_name(block):
            return name
    return None


def sparse_block(layer: nn.Module) -> nn.Module | None:
    """The layer's sparse MoE block, or ``None`` for a dense MLP."""
    name = block_name(layer)
    return getattr(layer, name) if name else None


def router_name(block: nn.Module) -> str | None:
    return next((name for name in ROUTERS if hasattr(getattr(block, name, None), "weight")), None)


def router(block: nn.Module) -> nn.Module:
    """The block's router (one weight row per expert)."""
    return getattr(block, router_name(block))


def renormalises(router: nn.Module) -> bool:
    """Whether the router divides its top-k probabilities by their sum (Mixtral always does)."""
    return bool(getattr(router, "norm_topk_prob", True))


class MoeAdapter(LlamaAdapter):
    family = "moe"
    model_types = ("qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "granitemoe")
    kinds = (Kind.KV_GROUPS, Kind.QUERY_HEADS, Kind.MLP, Kind.LAYERS, Kind.EXPERTS, Kind.EXPERT_CHANNELS)
    hidden_readers = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    bias_flags: ClassVar[dict[str, tuple[str, ...]]] = {}
    whole_width_qk_norms: ClassVar[tuple[str, ...]] = ("olmoe",)
    """Families whose q/k norms span every head: heads cannot be removed exactly."""

    def discover(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> Structure:
        """Attention groups in every layer, MLP channels in the dense layers, experts in the MoE ones."""
        self.check_kinds(model, kinds)
        groups: list[Group] = []
        for i, layer in enumerate(self.layers(model)):
            if Kind.KV_GROUPS in kinds or Kind.QUERY_HEADS in kinds:
                groups.append(self.attention_group(model, i, kinds))
            block = sparse_block(layer)
            if Kind.MLP in kinds and block is None:
                groups.append(self.mlp_group(model, i))
            if Kind.EXPERTS in kinds and block is not None:
                groups.append(self.expert_group(model, i))
            if Kind.EXPERT_CHANNELS in kinds and block is not None:
                groups.append(self.expert_channel_group(model, i))
        if Kind.LAYERS in kinds:
            groups.append(self.layer_group(model))
        return Structure(self.family, groups)

    def check_kinds(self, model: PreTrainedModel, kinds: tuple[Kind, ...]) -> None:
        model_type = model.config.model_type
        if Kind.HIDDEN in kinds:
            raise Unsupported(
                f"hidden-channel pruning (`scope` channel) is not supported for mixture-of-experts models ({model_type}) "
                "yet. Use `--experts`, attention heads or `scope` layer."
            )
        if (Kind.KV_GROUPS in kinds or Kind.QUERY_HEADS in kinds) and model_type in self.whole_width_qk_norms:
            raise Unsupported(
                f"attention heads of {model_type} cannot be removed exactly: its q_norm and k_norm normalise over "
                "all heads at once. Use `--attention none` (experts and whole layers work)."
            )

    def expert_group(self, model: PreTrainedModel, i: int) -> Group:
        """Layer ``i``'s experts: router row, [gate; up] and down of each."""
        layer = self.layers(model)[i]
        p, block = f"{self.layers_path}.{i}.{block_name(layer)}", sparse_block(layer)
        n = router(block).weight.shape[0]
        slices = (
            Slice(f"{p}.{router_name(block)}.weight", 0, 1),
            Slice(f"{p}.experts.gate_up_proj", 0, 1),
            Slice(f"{p}.experts.down_proj", 0, 1, writes=True),
        )
        return Group(f"layers.{i}.experts", Kind.EXPERTS, i, n, slices)

    def expert_channel_group(self, model: PreTrainedModel, i: int) -> Group:
        """Layer ``i``'s expert channels: element ``e · width + c`` is channel ``c`` of expert ``e``
        (its gate and up rows, its down column); every expert (a block) loses the same count, so
        the experts keep one width. Cut by :meth:`cut_expert_channels`, not by slices: each expert
        keeps its own channels of the shared 3-D tensors."""
        experts = sparse_block(self.layers(model)[i]).experts
        n, width = experts.down_proj.shape[0], experts.down_proj.shape[2]
        return Group(f"layers.{i}.expert_channels", Kind.EXPERT_CHANNELS, i, n * width, blocks=n)

    def cut_expert_channels(
        self, model: PreTrainedModel, group: Group, elements: list[int], mask: bool = False
    ) -> None:
        """Remove (``mask``: zero the down columns of) the channels ``elements`` of ``group``."""
        experts = sparse_block(self.layers(model)[group.layer]).experts
        n, width = group.blocks, group.block_size
        gone = torch.zeros(n, width, dtype=torch.bool)
        gone.view(-1)[torch.as_tensor(elements, dtype=torch.long)] = True
        if mask:
            experts.down_proj.data.masked_fill_(gone[:, None, :].to(experts.down_proj.device), 0.0)
            return
        keep = (~gone).nonzero()[:, 1].reshape(n, -1).to(experts.down_proj.device)  # each expert's kept channels
        rows = torch.cat([keep, keep + width], dim=1)  # [gate; up]
        gate_up, down = experts.gate_up_proj.data, experts.down_proj.data
        experts.gate_up_proj.data = torch.gather(gate_up, 1, rows[:, :, None].expand(-1, -1, gate_up.shape[2]))
        experts.down_proj.data = torch.gather(down, 2, keep[:, None, :].expand(-1, down.shape[1], -1))
        experts.gate_up_proj.grad = experts.down_proj.grad = None

    def layer_writes(self, model: PreTrainedModel, i: int) -> list[str]:
        """Attention's output projection, and the dense MLP's, or every expert's and the shared expert's."""
        layer, p = self.layers(model)[i], f"{self.layers_path}.{i}"
        names = [f"{p}.self_attn.o_proj.weight"]
        if layer.self_attn.o_proj.bias is not None:
            names.append(f"{p}.self_attn.o_proj.bias")
        block = sparse_block(layer)
        if block is None:
            return [*names, f"{p}.mlp.down_proj.weight"]
        names.append(f"{p}.{block_name(layer)}.experts.down_proj")
        if getattr(block, "shared_expert", None) is not None:
            names.append(f"{p}.{block_name(layer)}.shared_expert.down_proj.weight")
        return names

    def mask_experts(self, model: PreTrainedModel, group: Group, elements: list[int]) -> None:
        """The reference a removal of ``elements`` must equal: their router logits at −∞ before the
        softmax; everything else (top-k, renormalisation) as the router computes it."""
        gate = router(sparse_block(self.layers(model)[group.layer]))
        removed = torch.as_tensor(sorted(elements), dtype=torch.long)

        def forward(self, hidden_states):
            hidden_states = hidden_states.reshape(-1, self.weight.shape[1])
            logits = F.linear(hidden_states, self.weight)
            masked = logits.float().index_fill(-1, removed.to(logits.device), float("-inf"))
            probs = torch.softmax(masked, dim=-1)
            top, indices = torch.topk(probs, self.top_k, dim=-1)
            if renormalises(self):
                top = top / top.sum(dim=-1, keepdim=True)
            return logits, top.to(logits.dtype), indices

        gate.forward = types.MethodType(forward, gate)

    def sync(self, model: PreTrainedModel) -> None:
        super().sync(model)
        config, top_k = model.config, model.config.num_experts_per_tok
        counts, dense = [], []
        for i, layer in enumerate(self.layers(model)):
            block = sparse_block(layer)
            if block is None:
                dense.append(i)
                continue
            gate = router(block)
            n = gate.weight.shape[0]
            counts.append(n)
            gate.num_experts = block.experts.num_experts = n
            block.experts.intermediate_dim = block.experts.down_proj.shape[2]
            gate.top_k = min(getattr(gate, "top_k", top_k), n)
            if hasattr(block, "top_k"):  # Mixtral's block keeps its own copy
                block.top_k = gate.top_k
        if hasattr(config, "mlp_only_layers"):  # Qwen MoE: which layers are dense, by their new index
            config.mlp_only_layers, config.decoder_sparse_step = dense, 1
        if counts and len(set(counts)) == 1:
            config.num_experts_per_tok = min(top_k, counts[0])
            set_config_fields(config, **{self._experts_field(config): counts[0]})
            for attr, value in (("num_experts", counts[0]), ("num_experts_per_tok", config.num_experts_per_tok)):
                if hasattr(model, attr):  # the causal LM's copies, for the router's auxiliary loss
                    setattr(model, attr, value)

    @staticmethod
    def _experts_field(config) -> str:
        return "num_local_experts" if config.model_type in ("mixtral", "granitemoe") else "num_experts"

    @staticmethod
    def _width_field(config) -> str:
        return "moe_intermediate_size" if hasattr(config, "moe_intermediate_size") else "intermediate_size"

    def layer_shapes(self, model: PreTrainedModel) -> list[dict[str, int]]:
        shapes = []
        for layer in self.layers(model):
            attn, d = layer.self_attn, layer.self_attn.head_dim
            shape = {"heads": attn.q_proj.out_features // d, "kv_heads": attn.k_proj.out_features // d}
            block = sparse_block(layer)
            if block is None:
                shape["mlp"] = layer.mlp.gate_proj.out_features
            else:
                shape["experts"] = block.experts.gate_up_proj.shape[0]
                shape["expert_mlp"] = block.experts.down_proj.shape[2]
                shared = getattr(block, "shared_expert", None)
                if shared is not None:
                    shape["shared_mlp"] = shared.gate_proj.out_features
            shapes.append(shape)
        return shapes

    def apply_uniform_config(self, model: PreTrainedModel) -> bool:
        """Plain transformers holds one count per config field: equal heads in every layer, equal
        experts and expert widths in every MoE layer, equal widths in the dense ones."""
        shapes, config = self.layer_shapes(model), model.config
        fields: dict[str, int] = {}
        for key, field in (
            ("heads", "num_attention_heads"),
            ("kv_heads", "num_key_value_heads"),
            ("experts", self._experts_field(config)),
            ("expert_mlp", self._width_field(config)),
            ("shared_mlp", "shared_expert_intermediate_size"),
            ("mlp", "intermediate_size"),
        ):
            values = {s[key] for s in shapes if key in s}
            if len(values) > 1:
                return False
            if values:
                fields[field] = values.pop()
        fields["hidden_size"] = model.model.embed_tokens.embedding_dim
        return set_config_fields(config, **fields)
