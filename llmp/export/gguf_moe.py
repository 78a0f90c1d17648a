"""GGUF for llama.cpp's mixture-of-experts architectures: ``qwen3moe``, ``qwen2moe``, ``olmoe``, and
Mixtral as ``llama`` with experts.

These architectures read one count per model (heads, experts, expert width), which is what
``llmp prune --experts`` keeps: the same experts in every layer. Per layer::

    blk.N.ffn_gate_inp.weight   [experts, hidden]          the router
    blk.N.ffn_gate_exps.weight  [experts, width, hidden]   the gate half of gate_up_proj
    blk.N.ffn_up_exps.weight    [experts, width, hidden]   its up half
    blk.N.ffn_down_exps.weight  [experts, hidden, width]
    blk.N.ffn_*_shexp.weight    Qwen2-MoE's shared expert, and its sigmoid gate ffn_gate_inp_shexp

Experts are read fused (``mlp.experts.gate_up_proj``, as ``--stream`` writes them) or one tensor per
expert (as transformers saves them), one layer's experts at a time. Qwen and OLMoE rotate query and
key halves as Hugging Face does (llama.cpp's NEOX RoPE); Mixtral's ``llama`` rotates adjacent pairs,
so its q/k rows are reordered as for ``deci``. llama.cpp renormalises the top-k router weights for
``qwen3moe`` and ``llama`` and not for ``qwen2moe`` and ``olmoe``: a model whose ``norm_topk_prob``
says otherwise is refused, since llama.cpp would compute another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from llmp.errors import LlmpError
from llmp.export.gguf import (
    add_file_header,
    add_vocabulary,
    resolve_dtype,
    rope_pairs,
    tensor_entries,
    write_tensors,
)
from llmp.record import REPORT
from llmp.tensorfile import Fused, current_names, model_files, read_header, read_stored

ARCHES = {
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "olmoe": "olmoe",
    "mixtral": "llama",
}  # targets.MOE_GGUF_FAMILIES
RENORMALISES = {"qwen3moe": True, "llama": True, "qwen2moe": False, "olmoe": False}
"""Whether llama.cpp's graph of the architecture divides the top-k router weights by their sum."""


@dataclass
class MoeSource:
    """A MoE model folder read for export: config, counts, where each tensor is."""

    folder: Path
    config: dict
    arch: str
    experts: int
    width: int
    record: str | None
    dtype: torch.dtype
    where: dict  # name as the model holds it → (file, name in the file), or Fused per-expert parts

    @property
    def hidden(self) -> int:
        return self.config["hidden_size"]

    @property
    def head_dim(self) -> int:
        return self.config.get("head_dim") or self.hidden // self.config["num_attention_heads"]

    def has(self, name: str) -> bool:
        return name in self.where

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor in float32, read now (a fused expert tensor from its per-expert parts)."""
        return read_stored(self.where, [name], torch.float32)[name]

    def experts_of(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s ([experts, 2·width, hidden] gate_up, [experts, hidden, width] down), fused."""
        p = f"model.layers.{i}.mlp.experts."
        return self.tensor(p + "gate_up_proj"), self.tensor(p + "down_proj")


def open_moe_source(folder: Path, config: dict) -> MoeSource:
    """Read and check a MoE folder for export.

    Raises:
        LlmpError: a family llama.cpp cannot run as it is (dense layers between MoE ones, top-k
            renormalisation other than llama.cpp's, an activation other than SiLU).
    """
    family = config["model_type"]
    arch = ARCHES[family]
    renorm = config.get("norm_topk_prob", True) if family != "mixtral" else True
    problems = []
    if bool(renorm) != RENORMALISES[arch]:
        problems.append(
            f"`norm_topk_prob` is {renorm} in {folder / 'config.json'}, and llama.cpp's {arch} "
            f"{'always' if RENORMALISES[arch] else 'never'} renormalises the top-k router weights"
        )
    if config.get("mlp_only_layers") or config.get("decoder_sparse_step", 1) != 1:
        problems.append("dense MLP layers between the MoE layers (`mlp_only_layers`) have no place in llama.cpp's file")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"the experts' activation is {config['hidden_act']!r}; llama.cpp's {arch} runs SiLU")
    if (
        arch == "olmoe"
        and config.get("num_key_value_heads", config["num_attention_heads"]) != config["num_attention_heads"]
    ):
        problems.append("llama.cpp's olmoe normalises keys over all query heads' width: it takes no grouped KV heads")
    if problems:
        raise LlmpError(f"cannot export {folder} to GGUF: " + "; ".join(problems))
    stored, dtypes = {}, set()
    for file in model_files(folder):
        entries, _ = read_header(file)
        for name, info in entries.items():
            stored[name] = (file, name)
            if info["dtype"].is_floating_point:
                dtypes.add(info["dtype"])
    with torch.device("meta"):  # for transformers' own map of the checkpoint's names (no weights)
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, trust_remote_code=False))
    experts = config.get("num_local_experts") or config.get("num_experts")  # transformers 5 maps one onto the other
    width = config["intermediate_size"] if family in ("mixtral", "olmoe") else config["moe_intermediate_size"]
    record = folder / REPORT
    return MoeSource(
        folder=folder,
        config=config,
        arch=arch,
        experts=experts,
        width=width,
        record=record.read_text() if record.is_file() else None,
        dtype=next(iter(dtypes)) if len(dtypes) == 1 else torch.float32,
        where=current_names(skeleton, stored, combine=Fused),
    )


def write_moe_gguf(source: MoeSource, path: Path, dtype: str = "auto", name: str | None = None) -> dict:
    """Write ``source`` as a GGUF file of its llama.cpp architecture (not atomically; see
    :func:`llmp.export.export`); returns what was written."""
    import gguf

    dtype = resolve_dtype(dtype, source)
    writer = gguf.GGUFWriter(path, source.arch)
    _hparams(writer, source, dtype, name or source.folder.name)
    add_vocabulary(writer, source)
    entry, fallback = tensor_entries(dtype)
    tensors = list(_plan(source, entry))  # a layer's three expert tensors read once, when the first is written
    return write_tensors(writer, source.record, dtype, tensors, fallback)


def _hparams(writer, source: MoeSource, dtype: str, name: str) -> None:

    config = source.config
    add_file_header(writer, dtype, name)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(source.hidden)
    writer.add_feed_forward_length(config.get("intermediate_size", source.width))
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(source.head_dim)
    writer.add_value_length(source.head_dim)
    writer.add_rope_dimension_count(source.head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(rope.get("rope_theta", config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_expert_count(source.experts)
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_feed_forward_length(source.width)
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _plan(source: MoeSource, entry):
    """Every tensor of the file, in order (``entry``: :func:`llmp.export.gguf.tensor_entries`'s)."""

    def hf(name: str, transform=None):
        return lambda: transform(source.tensor(name)) if transform else source.tensor(name)

    config, h, d = source.config, source.hidden, source.head_dim
    heads, kv, vocab = config["num_attention_heads"], config["num_key_value_heads"], config["vocab_size"]
    yield entry("token_embd.weight", (vocab, h), hf("model.embed_tokens.weight"))
    yield entry("output_norm.weight", (h,), hf("model.norm.weight"))
    if source.has("lm_head.weight") and not config.get("tie_word_embeddings"):
        yield entry("output.weight", (vocab, h), hf("lm_head.weight"))
    pairs = source.arch == "llama"  # ggml's NORM RoPE rotates adjacent pairs; NEOX (Qwen, OLMoE) halves, as HF
    for i in range(config["num_hidden_layers"]):
        p, blk = f"model.layers.{i}.", f"blk.{i}."
        q_t = (lambda t: rope_pairs(t, heads)) if pairs else None
        k_t = (lambda t: rope_pairs(t, kv)) if pairs else None
        yield entry(blk + "attn_norm.weight", (h,), hf(p + "input_layernorm.weight"))
        for module, gname, out, cols, transform in (
            ("q_proj", "attn_q", heads * d, h, q_t),
            ("k_proj", "attn_k", kv * d, h, k_t),
            ("v_proj", "attn_v", kv * d, h, None),
            ("o_proj", "attn_output", h, heads * d, None),
        ):
            yield entry(f"{blk}{gname}.weight", (out, cols), hf(f"{p}self_attn.{module}.weight", transform))
            if source.has(f"{p}self_attn.{module}.bias"):
                yield entry(f"{blk}{gname}.bias", (out,), hf(f"{p}self_attn.{module}.bias", transform))
        for norm in ("q_norm", "k_norm"):
            if source.has(f"{p}self_attn.{norm}.weight"):
                width = source.head_dim if source.arch == "qwen3moe" else (heads if norm == "q_norm" else kv) * d
                yield entry(f"{blk}attn_{norm}.weight", (width,), hf(f"{p}self_attn.{norm}.weight"))
        yield entry(blk + "ffn_norm.weight", (h,), hf(p + "post_attention_layernorm.weight"))
        yield entry(blk + "ffn_gate_inp.weight", (source.experts, h), hf(p + "mlp.gate.weight"))
        yield from _experts(source, i, entry, hf)


def _experts(source: MoeSource, i: int, entry, hf):
    """Layer ``i``'s expert tensors (read once for the three of them) and Qwen2-MoE's shared expert."""
    p, blk, h, e, w = f"model.layers.{i}.", f"blk.{i}.", source.hidden, source.experts, source.width
    cache: dict[str, torch.Tensor] = {}

    def part(which: str):
        def read() -> torch.Tensor:
            if not cache:
                cache["gate_up"], cache["down"] = source.experts_of(i)
            if which == "gate":
                return cache["gate_up"][:, :w].contiguous()
            if which == "up":
                return cache.pop("gate_up")[:, w:].contiguous()
            return cache.pop("down")

        return read

    yield entry(blk + "ffn_gate_exps.weight", (e, w, h), part("gate"))
    yield entry(blk + "ffn_up_exps.weight", (e, w, h), part("up"))
    yield entry(blk + "ffn_down_exps.weight", (e, h, w), part("down"))
    if source.has(p + "mlp.shared_expert.gate_proj.weight"):
        s = source.config["shared_expert_intermediate_size"]
        yield entry(blk + "ffn_gate_inp_shexp.weight", (h,), hf(p + "mlp.shared_expert_gate.weight", _row))
        yield entry(blk + "ffn_gate_shexp.weight", (s, h), hf(p + "mlp.shared_expert.gate_proj.weight"))
        yield entry(blk + "ffn_up_shexp.weight", (s, h), hf(p + "mlp.shared_expert.up_proj.weight"))
        yield entry(blk + "ffn_down_shexp.weight", (h, s), hf(p + "mlp.shared_expert.down_proj.weight"))


def _row(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1)
