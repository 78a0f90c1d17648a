"""A DeciLM (Nemotron-NAS) folder for vLLM's ``DeciLMForCausalLM``.

vLLM builds each decoder layer from ``config.block_configs[i]``::

    {"attention": {"no_op": false, "n_heads_in_group": 3, ...},    KV heads = heads / 3
     "ffn":       {"no_op": false, "intermediate_size": 1187, ...}} this layer's MLP width

with ``num_attention_heads`` and ``head_dim`` global: every layer keeps the same query heads, so a
pruning that removed heads (query heads, or whole KV groups with their query heads) cannot be
served this way; MLP channels, hidden channels and whole layers can. The weights keep Llama's
tensor names.

vLLM reads the config through ``AutoConfig`` with remote code, so the folder carries its own
``configuration_decilm.py`` (llmp's, a dozen lines on top of ``LlamaConfig``): the block
sections answer attribute access, and an ``ffn`` section without ``ffn_mult`` makes vLLM take
``intermediate_size`` as it is, so any MLP width is served exactly. vLLM switches biases per
kind (``attention_bias``: q, k, v and o; ``mlp_bias``: gate, up and down), so where a layer has
some (Qwen2's q/k/v, the ``o_proj``/``down_proj`` biases of llmp's compensation) the others of
that kind are written as zeros, which computes the same.
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmp.errors import LlmpError
from llmp.export.source import LAYER_BIASES, Source
from llmp.targets import DECILM_ARCHITECTURE

MODEL_TYPE = "nemotron-nas"
SHARD_BYTES = 2 << 30
_DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

CONFIG_CODE = '''"""The DeciLM (Nemotron-NAS) config of a folder written by `llmp export --format decilm`.

Each block's `attention` and `ffn` sections answer attribute access (vLLM reads
`block.ffn.intermediate_size`); the config is Llama's otherwise.
"""

from transformers import LlamaConfig


class Section(dict):
    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class BlockConfig(Section):
    def __init__(self, attention, ffn):
        super().__init__(attention=Section(attention), ffn=Section(ffn))


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=(), **kwargs):
        self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in block_configs]
        super().__init__(**kwargs)
'''


def check_decilm(source: Source) -> None:
    """Refuse a model whose layers vLLM's DeciLM cannot build.

    Raises:
        LlmpError: the layers keep different numbers of query heads.
    """
    heads = sorted({s.heads for s in source.layers})
    if len(heads) > 1:
        per_layer = ", ".join(f"{i}: {s.heads}" for i, s in enumerate(source.layers))
        raise LlmpError(
            f"{source.folder}: the layers keep different numbers of query heads ({per_layer}); vLLM's DeciLM has "
            "one num_attention_heads for all layers. Prune with `--target vllm` (MLP channels, hidden channels "
            "and whole layers only), or export as GGUF for llama.cpp, which takes per-layer heads"
        )


def block_configs(source: Source) -> list[dict]:
    return [
        {
            "attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": s.heads // s.kv_heads},
            "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": s.mlp},
        }
        for s in source.layers
    ]


def decilm_config(source: Source) -> dict:
    """The config.json: the source's, with DeciLM's architecture and per-layer blocks."""
    keep = {k: v for k, v in source.config.items() if not k.startswith("llmp_") and k not in ("auto_map", "dtype")}
    first = source.layers[0]
    return {
        **keep,
        "architectures": [DECILM_ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
        "hidden_size": source.hidden,
        "num_hidden_layers": len(source.layers),
        "num_attention_heads": first.heads,
        "num_key_value_heads": first.kv_heads,  # vLLM reads each block's n_heads_in_group instead
        "intermediate_size": max(s.mlp for s in source.layers),
        "head_dim": source.head_dim,
        "tie_word_embeddings": source.tied,
        "attention_bias": _has_bias(source, _ATTENTION),
        "mlp_bias": _has_bias(source, _MLP),
        "block_configs": block_configs(source),
    }


def _has_bias(source: Source, modules: tuple[str, ...]) -> bool:
    wanted = [n for n in LAYER_BIASES if n.split(".")[-2] in modules]
    return any(source.has(f"model.layers.{i}.{n}") for i in range(len(source.layers)) for n in wanted)


def _tensors(source: Source, dtype: torch.dtype):
    """(name, tensor) in order, one read at a time; the zero biases that vLLM's flags imply added."""
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        yield name, source.tensor(name).to(dtype)
    if not source.tied:
        yield "lm_head.weight", source.tensor("lm_head.weight").to(dtype)
    kinds = [(m, "self_attn") for m in _ATTENTION if _has_bias(source, _ATTENTION)]
    kinds += [(m, "mlp") for m in _MLP if _has_bias(source, _MLP)]
    for i in range(len(source.layers)):
        prefix = f"model.layers.{i}."
        for name in source.names:
            if name.startswith(prefix) and not name.endswith(".bias"):
                yield name, source.tensor(name).to(dtype)
        for module, parent in kinds:
            bias = f"{prefix}{parent}.{module}.bias"
            if source.has(bias):
                yield bias, source.tensor(bias).to(dtype)
            else:
                yield bias, torch.zeros(source.shape(f"{prefix}{parent}.{module}.weight")[0], dtype=dtype)


def write_decilm(source: Source, folder: Path, dtype: str = "auto") -> dict:
    """Write ``source`` as a DeciLM folder into ``folder`` (an empty temporary folder).

    Returns:
        what was written: ``dtype``, ``shards``, ``notes``.
    """
    from safetensors.torch import save_file

    from llmp.outdir import write_json_atomic
    from llmp.record import REPORT

    torch_dtype = source.dtype if dtype == "auto" else _DTYPES[dtype]
    config = decilm_config(source)
    config["dtype"] = str(torch_dtype).removeprefix("torch.")
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, index, files = 0, {}, []

    def flush() -> None:
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], folder / name, metadata={"format": "pt"})
        files.append(name)
        index.update(dict.fromkeys(shards[-1], name))
        shards[-1] = {}

    for name, tensor in _tensors(source, torch_dtype):
        if size and size + tensor.nbytes > SHARD_BYTES:
            flush()
            size = 0
        shards[-1][name] = tensor.contiguous()
        size += tensor.nbytes
    flush()
    if len(files) == 1:
        (folder / files[0]).rename(folder / "model.safetensors")
    else:
        total = sum((folder / f).stat().st_size for f in files)
        write_json_atomic(
            folder / "model.safetensors.index.json",
            {"metadata": {"total_size": total}, "weight_map": index},
            record=False,
        )
    write_json_atomic(folder / "config.json", config, record=False)
    (folder / "configuration_decilm.py").write_text(CONFIG_CODE)
    for extra in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "generation_config.json",
        "tokenizer.model",
    ):
        if (source.folder / extra).is_file():
            (folder / extra).write_bytes((source.folder / extra).read_bytes())
    if source.record is not None:
        (folder / REPORT).write_text(source.record)
    notes = [
        "serve with a CUDA build of vLLM: vllm serve OUTPUT --trust-remote-code "
        "(the folder's configuration_decilm.py is llmp's; read it first)"
    ]
    return {"dtype": config["dtype"], "shards": len(files), "notes": notes}
