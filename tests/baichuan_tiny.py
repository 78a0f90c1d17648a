"""A small, faithful Baichuan (7B and 13B) for tests: Baichuan ships as remote code, not in transformers.

Same module tree, parameter names and arithmetic as Baichuan-7B/13B's ``modeling_baichuan.py``:

    model.embed_tokens, model.layers.i.{input_layernorm, self_attn.W_pack, self_attn.o_proj,
    post_attention_layernorm, mlp.{gate,up,down}_proj}, model.norm, lm_head

``W_pack`` is q, k, v concatenated (``[3 * hidden]``), read back with
``unflatten(-1, (3, self.hidden_size))``. Baichuan-7B puts rotary embeddings in every attention
(``self_attn.rotary_emb``, RMSNorm ``variance_epsilon``); Baichuan-13B has none and adds an ALiBi
bias built from ``model.n_head`` that doubles as the causal mask (RMSNorm ``epsilon``). The real
code ships as two files; here ``config.alibi`` picks one. Only the cache differs: this module uses
transformers' ``DynamicCache`` so that ``generate`` of transformers 5 runs it.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

CACHE = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"
"""The outputs' cache field: ``past_key_values`` before transformers renamed it."""


class BaichuanConfig(PretrainedConfig):
    model_type = "baichuan"

    def __init__(
        self,
        vocab_size=128,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        hidden_act="silu",
        max_position_embeddings=64,
        model_max_length=64,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        alibi=False,
        tie_word_embeddings=False,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.model_max_length = model_max_length
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.alibi = alibi
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class RMSNorm(nn.Module):  # Baichuan-7B
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class RMSNorm13B(nn.Module):  # Baichuan-13B: same arithmetic, `epsilon`
    def __init__(self, hidden_size, epsilon=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.epsilon = epsilon

    def forward(self, hidden_states):
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class RotaryEmbedding(nn.Module):
    def __init__(self, dim, max_position_embeddings=2048, base=10000):
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, x, seq_len):
        t = torch.arange(seq_len, device=x.device, dtype=self.inv_freq.dtype)
        emb = torch.cat([torch.outer(t, self.inv_freq)] * 2, dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids):
    cos, sin = cos[position_ids].unsqueeze(1), sin[position_ids].unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


def _get_interleave(n):
    def _power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return _power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return _power_of_2(closest) + _get_interleave(2 * closest)[0::2][: n - closest]


def _gen_alibi_mask(n_head, max_pos):
    slopes = torch.Tensor(_get_interleave(n_head))
    alibi = slopes.unsqueeze(1).unsqueeze(1) * torch.arange(max_pos).unsqueeze(0).unsqueeze(0).expand(n_head, -1, -1)
    alibi = alibi.view(n_head, 1, max_pos)
    alibi_mask = torch.triu(torch.zeros([max_pos, max_pos]).fill_(float("-inf")), 1)
    return alibi_mask.unsqueeze(0) + alibi


class MLP(nn.Module):
    def __init__(self, hidden_size, intermediate_size, hidden_act):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = self.hidden_size // self.num_heads
        self.layer_idx = layer_idx
        self.W_pack = nn.Linear(self.hidden_size, 3 * self.hidden_size, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, self.hidden_size, bias=False)
        if not config.alibi:
            self.rotary_emb = RotaryEmbedding(self.head_dim, max_position_embeddings=config.max_position_embeddings)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None):
        bsz, q_len, _ = hidden_states.size()
        proj = self.W_pack(hidden_states)
        proj = proj.unflatten(-1, (3, self.hidden_size)).unsqueeze(0).transpose(0, -2).squeeze(-2)
        query_states = proj[0].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = proj[1].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        value_states = proj[2].view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        if hasattr(self, "rotary_emb"):
            cos, sin = self.rotary_emb(value_states, seq_len=past + q_len)
            query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin, position_ids)
        if cache is not None:
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx)
        attn_weights = torch.matmul(query_states, key_states.transpose(2, 3)) / math.sqrt(self.head_dim)
        if attention_mask is not None:
            if q_len == 1 and not hasattr(self, "rotary_emb"):  # 13B: the mask covers the whole sequence
                attention_mask = (
                    attention_mask[:, :, -1:, :] if attention_mask.dim() == 4 else attention_mask[:, -1:, :]
                )
            attn_weights = attn_weights + attention_mask
            attn_weights = torch.max(attn_weights, torch.tensor(torch.finfo(attn_weights.dtype).min))
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query_states.dtype)
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2)
        return self.o_proj(attn_output.reshape(bsz, q_len, self.hidden_size))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        norm = RMSNorm13B if config.alibi else RMSNorm
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config.hidden_size, config.intermediate_size, config.hidden_act)
        self.input_layernorm = norm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = norm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None):
        residual = hidden_states
        hidden_states = self.self_attn(
            hidden_states=self.input_layernorm(hidden_states),
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
        )
        hidden_states = residual + hidden_states
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states))


class BaichuanPreTrainedModel(PreTrainedModel):
    config_class = BaichuanConfig
    base_model_prefix = "model"
    _no_split_modules = ("DecoderLayer",)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear | nn.Embedding):
            module.weight.data.normal_(mean=0.0, std=std)
        elif isinstance(module, RMSNorm | RMSNorm13B):
            module.weight.data.fill_(1.0)
        elif isinstance(module, RotaryEmbedding):
            dim = module.inv_freq.numel() * 2
            module.inv_freq.copy_(1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))


class BaichuanModel(BaichuanPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.n_head = config.num_attention_heads
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = (RMSNorm13B if config.alibi else RMSNorm)(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def _mask(self, attention_mask, dtype, bsz, q_len, past):
        total = past + q_len
        if self.config.alibi:  # 13B: the ALiBi bias for n_head heads, with the causal -inf above it
            alibi_mask = _gen_alibi_mask(self.n_head, total).to(dtype)[:, -total:, :total]
            if attention_mask is None:
                return alibi_mask
            m = attention_mask.to(dtype)
            expanded = torch.tril(torch.gt(m[:, :, None] * m[:, None, :], 0)) * torch.eq(
                m[:, :, None] - m[:, None, :], 0
            )
            expanded = expanded.unsqueeze(1).expand(bsz, 1, total, total).to(dtype)
            inverted = 1.0 - expanded
            inverted = inverted.masked_fill(inverted.to(torch.bool), torch.finfo(dtype).min)
            return inverted + alibi_mask.unsqueeze(0)
        # 7B: the usual [bsz, 1, q, kv] causal mask
        causal = torch.full((q_len, total), torch.finfo(dtype).min).triu(past + 1)
        mask = causal[None, None].expand(bsz, 1, q_len, total)
        if attention_mask is not None:
            mask = mask.masked_fill(attention_mask[:, None, None, :total] == 0, torch.finfo(dtype).min)
        return mask

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=False, **kwargs):
        hidden_states = self.embed_tokens(input_ids)
        bsz, q_len, _ = hidden_states.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + q_len, device=hidden_states.device)[None].expand(bsz, -1)
        mask = self._mask(attention_mask, hidden_states.dtype, bsz, q_len, past)
        for layer in self.layers:
            hidden_states = layer(hidden_states, attention_mask=mask, position_ids=position_ids, cache=cache)
        return BaseModelOutputWithPast(
            last_hidden_state=self.norm(hidden_states)
        )  # no cache kept (its field is named by version)


class BaichuanForCausalLM(BaichuanPreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = BaichuanModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def forward(
        self, input_ids=None, attention_mask=None, position_ids=None, cache=None, labels=None, use_cache=None, **kwargs
    ):
        cache = cache if cache is not None else kwargs.get("past_key_values")  # the name before transformers 5.2x
        out = self.model(input_ids, attention_mask, position_ids, cache, bool(use_cache))
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE: getattr(out, CACHE)})


AutoConfig.register("baichuan", BaichuanConfig, exist_ok=True)
AutoModelForCausalLM.register(BaichuanConfig, BaichuanForCausalLM, exist_ok=True)
