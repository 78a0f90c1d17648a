"""GGUF for llama.cpp, architecture ``deci``: every layer keeps its own head, KV-head and MLP counts.

llama.cpp's ``llama`` architecture reads one head count and one MLP width for all layers; ``deci``
(NVIDIA's Nemotron-NAS models) reads them per layer::

    deci.attention.head_count     = [9, 9, 6, ...]     query heads of layer 0, 1, 2 ...
    deci.attention.head_count_kv  = [3, 3, 2, ...]
    deci.feed_forward_length      = [1536, 1187, ...]
    blk.N.attn_q.weight  [heads·head_dim, hidden]      Llama's tensor names, per layer

so one file serves a heterogeneous pruned model. llama.cpp rotates adjacent channel pairs
(2i, 2i+1) of each head where Hugging Face rotates halves (i, i + head_dim/2), so the rows of
``q_proj`` and ``k_proj`` (and their biases) are reordered head by head with that layer's own
counts. 1-D tensors (norms, biases) stay float32, as llama.cpp expects; a matrix whose rows do
not split into q8_0's 32-value blocks is written in f16 instead (the report names them).
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from llmp.errors import LlmpError
from llmp.export.source import Source
from llmp.remote_code import remote_code_error

log = logging.getLogger(__name__)

ARCH = "deci"
REPORT_KEY = "llmp.pruning_report"
EXPORT_KEY = "llmp.export"  # marks a file llmp wrote: `--overwrite` replaces only such files
GGUF_DTYPES = ("auto", "f32", "f16", "bf16", "q8_0")
_AUTO = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class _Tensor:
    name: str  # GGUF name
    shape: tuple[int, ...]  # PyTorch order: [rows, columns]
    qtype: object  # gguf.GGMLQuantizationType
    read: Callable[[], torch.Tensor]


def rope_pairs(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows from halves (HF: i pairs with i + d/2) to adjacent pairs (ggml: 2i, 2i+1)."""
    d = weight.shape[0] // heads
    return weight.reshape(heads, 2, d // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def resolve_dtype(dtype: str, source: Source) -> str:
    if dtype not in GGUF_DTYPES:
        raise LlmpError(f"`dtype` {dtype!r} is not a GGUF type llmp writes; choose one of {', '.join(GGUF_DTYPES)}")
    return _AUTO.get(source.dtype, "f32") if dtype == "auto" else dtype


def write_gguf(source: Source, path: Path, dtype: str = "auto", name: str | None = None) -> dict:
    """Write ``source`` as a GGUF file at ``path`` (not atomically: see :func:`llmp.export.export`).

    Returns:
        what was written: ``dtype``, ``tensors``, ``f16_fallback`` (matrices q8_0 could not
        take) and ``notes`` for the user.

    Raises:
        LlmpError: the tokenizer cannot be expressed, or ``dtype`` is not one of :data:`GGUF_DTYPES`.
    """
    import gguf

    dtype = resolve_dtype(dtype, source)
    tensors, fallback = _plan(source, dtype)
    writer = gguf.GGUFWriter(path, ARCH)
    _add_hparams(writer, source, dtype, name or source.folder.name)
    add_vocabulary(writer, source)
    return write_tensors(writer, source.record, dtype, tensors, fallback)


def write_tensors(writer, record: str | None, dtype: str, tensors: list[_Tensor], fallback: list[str]) -> dict:
    """Finish a GGUF file whose hyperparameters and vocabulary ``writer`` holds: llmp's keys
    (its export settings, the pruning ``record``), then ``tensors``, one in memory at a time.

    Returns:
        what was written (see :func:`write_gguf`).
    """
    import gguf

    writer.add_string(EXPORT_KEY, json.dumps({"dtype": dtype, "f16_fallback": fallback}))
    if record is not None:
        writer.add_string(REPORT_KEY, record)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.float32, _nbytes(t), raw_dtype=t.qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in tensors:
        writer.write_tensor_data(gguf.quants.quantize(t.read().numpy(), t.qtype))
    writer.close()
    notes = []
    if fallback:
        notes.append(
            f"{len(fallback)} matrices are f16, not q8_0: their rows do not split into 32-value blocks "
            f"({', '.join(fallback[:4])}{', ...' if len(fallback) > 4 else ''})"
        )
    return {"dtype": dtype, "tensors": len(tensors), "f16_fallback": fallback, "notes": notes}


def tensor_entries(dtype: str) -> tuple[Callable[..., _Tensor], list[str]]:
    """``entry(gguf_name, shape, read)``: a tensor of the file in ``dtype`` (1-D ones float32, a
    matrix whose rows do not split into q8_0's blocks f16), and the list of those f16 fallbacks."""
    import gguf

    Q = gguf.GGMLQuantizationType
    wanted = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    fallback: list[str] = []

    def entry(gguf_name: str, shape, read: Callable[[], torch.Tensor]) -> _Tensor:
        qtype = Q.F32 if len(shape) == 1 else wanted
        if qtype == Q.Q8_0 and shape[-1] % 32:
            qtype = Q.F16
            fallback.append(gguf_name)
        return _Tensor(gguf_name, tuple(shape), qtype, read)

    return entry, fallback


def add_file_header(writer, dtype: str, name: str) -> None:
    """The model's name and file type (and the quantization version for q8_0)."""
    import gguf

    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16}
    file_type |= {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_name(name)
    writer.add_file_type(file_type[dtype])
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _nbytes(t: _Tensor) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return math.prod(t.shape) // block * size


def _plan(source: Source, dtype: str) -> tuple[list[_Tensor], list[str]]:
    """Every tensor of the file in order, with its type and how to read it."""
    import gguf

    Q = gguf.GGMLQuantizationType
    make, fallback = tensor_entries(dtype)

    def entry(gguf_name: str, hf_name: str, shape, transform=None) -> _Tensor:
        def read() -> torch.Tensor:
            tensor = source.tensor(hf_name)
            return transform(tensor) if transform else tensor

        return make(gguf_name, shape, read)

    h, d, vocab = source.hidden, source.head_dim, source.config["vocab_size"]
    plan = [entry("token_embd.weight", "model.embed_tokens.weight", (vocab, h))]
    plan.append(entry("output_norm.weight", "model.norm.weight", (h,)))
    if not source.tied:
        plan.append(entry("output.weight", "lm_head.weight", (vocab, h)))
    if source.rope["rope_type"] == "llama3":
        factors = llama3_rope_factors(source.rope, d)
        plan.append(_Tensor("rope_freqs.weight", tuple(factors.shape), Q.F32, lambda: factors))
    for i, shape in enumerate(source.layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        q_rows, kv_rows = shape.heads * d, shape.kv_heads * d

        def pairs(heads):
            return lambda t: rope_pairs(t, heads)

        rows = {
            "self_attn.q_proj": ("attn_q", q_rows, pairs(shape.heads)),
            "self_attn.k_proj": ("attn_k", kv_rows, pairs(shape.kv_heads)),
            "self_attn.v_proj": ("attn_v", kv_rows, None),
            "self_attn.o_proj": ("attn_output", h, None),
            "mlp.gate_proj": ("ffn_gate", shape.mlp, None),
            "mlp.up_proj": ("ffn_up", shape.mlp, None),
            "mlp.down_proj": ("ffn_down", h, None),
        }
        columns = {"self_attn.o_proj": q_rows, "mlp.down_proj": shape.mlp}
        plan.append(entry(blk + "attn_norm.weight", hf + "input_layernorm.weight", (h,)))
        for module, (name, out, transform) in rows.items():
            plan.append(entry(f"{blk}{name}.weight", f"{hf}{module}.weight", (out, columns.get(module, h)), transform))
            if source.has(f"{hf}{module}.bias"):
                plan.append(entry(f"{blk}{name}.bias", f"{hf}{module}.bias", (out,), transform))
            if module == "self_attn.o_proj":
                plan.append(entry(blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (h,)))
    return plan, fallback


def llama3_rope_factors(rope: dict, head_dim: int) -> torch.Tensor:
    """Llama 3's per-frequency RoPE divisors, which llama.cpp reads from ``rope_freqs.weight``:
    1 for wavelengths under ``original / high_freq_factor``, ``factor`` above ``original /
    low_freq_factor``, and a smooth blend between."""
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    original = rope.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = ((original / wavelen - low) / (high - low)).clamp(0, 1)
    blended = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < original / high, 1.0, torch.where(wavelen > original / low, factor, blended)).float()


def _add_hparams(writer, source: Source, dtype: str, name: str) -> None:
    import gguf

    config, rope = source.config, source.rope
    add_file_header(writer, dtype, name)
    writer.add_block_count(len(source.layers))
    writer.add_context_length(config.get("max_position_embeddings", 4096))
    writer.add_embedding_length(source.hidden)
    writer.add_feed_forward_length([s.mlp for s in source.layers])
    writer.add_head_count([s.heads for s in source.layers])
    writer.add_head_count_kv([s.kv_heads for s in source.layers])
    writer.add_key_length(source.head_dim)
    writer.add_value_length(source.head_dim)
    writer.add_rope_dimension_count(source.head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", 10000.0))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_vocab_size(config["vocab_size"])
    if config.get("sliding_window") and config.get("use_sliding_window", True):
        log.warning(
            "%s has a sliding window of %s tokens, which llama.cpp's deci does not apply: contexts up to "
            "that length compute the same",
            source.folder,
            config["sliding_window"],
        )


# ---- the tokenizer ------------------------------------------------------------------------------

# Hugging Face pre-tokenizers → llama.cpp's names for the same splitting (llama-vocab.cpp).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def pretokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for the byte-level BPE pre-tokenizer of
    ``tokenizer.json``, or ``None`` when it is not one llmp recognises."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(pattern)
    return None


def _tokens(folder: Path, vocab_size: int) -> tuple[str, list[str], list[int], list[float] | None, dict]:
    """(ggml tokenizer model, tokens by id, token types, scores or None, tokenizer.json).

    Byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2) becomes ggml's ``gpt2`` tokenizer with the
    merges. BPE with byte fallback (converted from SentencePiece: Llama 2, Mistral) becomes
    ggml's ``llama`` tokenizer, which merges by score: a piece's score is minus its id, since such
    vocabularies are numbered in merge order, and the ``<0xNN>`` pieces are its byte tokens.
    """
    import gguf

    path = folder / "tokenizer.json"
    if not path.is_file():
        raise LlmpError(f"{folder} has no tokenizer.json; the GGUF needs the tokenizer (save it beside the model)")
    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise LlmpError(f"{path}: a {model.get('type')!r} tokenizer; the GGUF export writes BPE tokenizers only")
    T = gguf.TokenType
    by_id = {i: (t, T.NORMAL) for t, i in model["vocab"].items()}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = (added["content"], T.CONTROL if added.get("special") else T.USER_DEFINED)
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, (f"[PAD{i}]", T.UNUSED))[0] for i in range(size)]
    types = [int(by_id.get(i, (None, T.UNUSED))[1]) for i in range(size)]
    if not model.get("byte_fallback"):
        return "gpt2", tokens, types, None, data
    byte = re.compile(r"<0x[0-9A-Fa-f]{2}>")
    for i, token in enumerate(tokens):
        if byte.fullmatch(token):
            types[i] = int(T.BYTE)
    scores = [-float(i) if types[i] == T.NORMAL else 0.0 for i in range(size)]
    return "llama", tokens, types, scores, data


def _space_prefix(tokenizer_json: dict) -> bool:
    """Whether a SentencePiece-style tokenizer puts "\u2581" before the text (its normalizer
    prepends it, or its Metaspace pre-tokenizer does)."""
    text = json.dumps([tokenizer_json.get("normalizer"), tokenizer_json.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)


def add_vocabulary(writer, source: Source) -> None:
    """The tokenizer as llama.cpp reads it: tokens, types, merges or scores, special ids, whether
    to add BOS (as the Hugging Face tokenizer does), and the chat template."""
    import gguf

    model, tokens, types, scores, data = _tokens(source.folder, source.config["vocab_size"])
    writer.add_tokenizer_model(model)
    if model == "gpt2":
        pre = pretokenizer(data)
        if pre is None:
            log.warning(
                "the pre-tokenizer of %s is not one llmp maps to llama.cpp's names; the GGUF says 'default', "
                "so llama.cpp may split text differently (token ids given directly are unaffected)",
                source.folder,
            )
        writer.add_tokenizer_pre(pre or "default")
    else:
        writer.add_add_space_prefix(_space_prefix(data))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    special = gguf.SpecialVocab(source.folder, load_merges=model == "gpt2", n_vocab=len(tokens))
    special.add_special_token.setdefault("bos", _adds_bos(source.folder))
    special.add_to_gguf(writer, quiet=True)


def _adds_bos(folder: Path) -> bool:
    """Whether the folder's tokenizer puts BOS before a text, which llama.cpp then does too."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise remote_code_error(folder, err) or LlmpError(f"cannot load the tokenizer of {folder}: {err}") from err
    ids = tokenizer("a").input_ids
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def read_metadata(path: str | Path) -> Iterator[tuple[str, object]]:
    """(key, value) of a GGUF file's metadata, arrays of numbers and strings as lists."""
    import gguf

    reader = gguf.GGUFReader(path)
    for key, entry in reader.fields.items():
        yield key, entry.contents()
