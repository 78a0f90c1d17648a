"""The model folder an export reads: its config, per-layer shapes and tensors, checked once.

An export never builds the model: it reads the safetensors headers for the shapes and one tensor
at a time for the data, so exporting a model needs little more memory than its largest tensor.
The shapes come from the weights themselves (``q_proj`` rows / ``head_dim`` = query heads), so
a heterogeneous llmp folder and a plain Hugging Face folder read the same way.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmp.errors import LlmpError, raise_all
from llmp.record import REPORT
from llmp.targets import EXPORT_FAMILIES
from llmp.tensorfile import model_files, read_header, read_safetensors

ROPE_TYPES = ("default", "linear", "llama3")
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Per-layer tensors, by their name under `model.layers.N.`; biases are optional.
LAYER_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
LAYER_BIASES = tuple(n.replace(".weight", ".bias") for n in LAYER_TENSORS if "proj" in n)
GLOBAL_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class LayerShape:
    """The counts one decoder layer kept."""

    heads: int
    kv_heads: int
    mlp: int


@dataclass
class Source:
    """A Llama-layout model folder, read for export.

    Attributes:
        folder: the folder.
        config: its ``config.json``.
        family: ``model_type`` (one of :data:`EXPORT_FAMILIES`).
        hidden: hidden size (the embedding's width, which hidden-channel pruning shrinks).
        head_dim: channels per attention head.
        layers: per-layer counts, from the weights.
        tied: the output head is the embedding.
        rope: the RoPE parameters (``rope_type``, ``rope_theta`` and the scaling's own keys).
        record: the folder's ``pruning_report.json`` as text (``None`` for a plain folder).
        dtype: the stored weights' floating dtype (float32 where they mix dtypes).
    """

    folder: Path
    config: dict
    family: str
    hidden: int
    head_dim: int
    layers: list[LayerShape]
    tied: bool
    rope: dict
    record: str | None
    dtype: torch.dtype = torch.float32
    _files: dict[str, Path] = field(default_factory=dict, repr=False)
    _shapes: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> list[str]:
        """Every tensor name in the folder's weights."""
        return list(self._files)

    def has(self, name: str) -> bool:
        return name in self._files

    def shape(self, name: str) -> list[int]:
        """A tensor's shape, from its file's header (no data read)."""
        return self._shapes[name]

    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, read from its file now, in float32."""
        return read_safetensors(self._files[name], torch.float32, [name])[name]

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) == 1


def open_source(spec: str | Path) -> Source:
    """Read and check the model folder ``spec`` (or a built-in name such as ``smollm2-135m``).

    Raises:
        LlmpError: not a model folder, not a Llama-layout family, or a setting no export format
            expresses (activation, RoPE scaling, tensors it does not know).
    """
    folder = _folder(spec)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as err:
        raise LlmpError(f"cannot read {folder / 'config.json'}: {err}") from err
    family = config.get("model_type")
    if family not in EXPORT_FAMILIES:
        raise LlmpError(
            f"{folder} is a {family!r} model; exports take the Llama layout ({', '.join(EXPORT_FAMILIES)}), "
            "whose tensors GGUF `deci` and DeciLM name; other families are not expressible there"
        )
    headers, dtypes = {}, set()
    for file in model_files(folder):  # each readable, every shard of the index there
        try:
            entries, _ = read_header(file)
        except ValueError as err:
            raise LlmpError(f"cannot read {file}: {err}") from err
        for name, info in entries.items():
            headers[name] = (file, info["shape"])
            if info["dtype"].is_floating_point:
                dtypes.add(info["dtype"])
    if not headers:
        raise LlmpError(f"{folder} has no *.safetensors weights (llmp never reads pickled weights)")
    problems = _check_config(config)
    shapes, layer_problems = _layer_shapes(headers, config)
    raise_all(problems + layer_problems)
    record = folder / REPORT
    return Source(
        folder=folder,
        config=config,
        family=family,
        hidden=headers["model.embed_tokens.weight"][1][1],
        head_dim=_head_dim(config),
        layers=shapes,
        tied="lm_head.weight" not in headers or bool(config.get("tie_word_embeddings")),
        rope=_rope(config),
        record=record.read_text() if record.is_file() else None,
        dtype=next(iter(dtypes)) if len(dtypes) == 1 else torch.float32,
        _files={name: file for name, (file, _) in headers.items()},
        _shapes={name: shape for name, (_, shape) in headers.items()},
    )


def _folder(spec: str | Path) -> Path:
    from llmp.models import BUILTINS, _builtin_folder

    if str(spec) in BUILTINS:
        return _builtin_folder(str(spec))
    folder = Path(spec).expanduser()
    if folder.is_file():
        raise LlmpError(
            f"{spec} is a file; export reads a model folder (from `llmp prune`, `llmp fit` or Hugging Face)"
        )
    if not folder.is_dir():
        raise LlmpError(f"no model folder at {spec}: give a folder written by `llmp prune` or a Hugging Face folder")
    if not (folder / "config.json").is_file():
        raise LlmpError(f"{spec} is not a model folder: config.json is missing")
    return folder


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def _rope(config: dict) -> dict:
    """RoPE parameters under transformers 5's ``rope_parameters`` or the older ``rope_theta`` + ``rope_scaling``."""
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        rope = dict(config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


REQUIRED_KEYS = ("vocab_size", "num_attention_heads", "num_hidden_layers")  # what the writers read without a default


def _check_config(config: dict) -> list[str]:
    problems = [
        f"config.json has no `{key}` (a whole number the export writes); add it, as the model's family defines it"
        for key in REQUIRED_KEYS
        if not isinstance(config.get(key), int)
    ]
    if not isinstance(config.get("head_dim"), int) and not isinstance(config.get("hidden_size"), int):
        problems.append("config.json has neither `head_dim` nor `hidden_size`; add them, as the family defines them")
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"the MLP activation is {config['hidden_act']!r}; the export formats run SwiGLU (silu) only")
    rope_type = _rope(config)["rope_type"]
    if rope_type not in ROPE_TYPES:
        problems.append(f"RoPE scaling {rope_type!r} is not expressible; exports take {', '.join(ROPE_TYPES)}")
    return problems


def _layer_shapes(headers: dict, config: dict) -> tuple[list[LayerShape], list[str]]:
    """Per-layer counts from the tensor shapes, and every tensor the export would not know."""
    problems, layers = [], {}
    for name in headers:
        match = _LAYER.fullmatch(name)
        if match:
            layers.setdefault(int(match[1]), set()).add(match[2])
        elif name not in GLOBAL_TENSORS and not name.endswith("rotary_emb.inv_freq"):
            problems.append(f"tensor {name!r} has no place in a Llama-layout export")
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        if name not in headers:
            problems.append(f"tensor {name!r} is missing")
    if sorted(layers) != list(range(len(layers))):
        problems.append(f"the decoder layers are numbered {sorted(layers)}, not 0..{len(layers) - 1}")
    head_dim, shapes = _head_dim(config), []
    for i in sorted(layers):
        present = layers[i]
        missing = [n for n in LAYER_TENSORS if n not in present]
        unknown = sorted(present - set(LAYER_TENSORS) - set(LAYER_BIASES))
        if missing or unknown:
            problems.append(
                f"layer {i}: " + "; ".join([*(f"no {n}" for n in missing), *(f"unknown {n}" for n in unknown)])
            )
            continue
        prefix = f"model.layers.{i}."
        q, k = headers[prefix + "self_attn.q_proj.weight"][1][0], headers[prefix + "self_attn.k_proj.weight"][1][0]
        if q % head_dim or k % head_dim:
            problems.append(f"layer {i}: q_proj ({q}) and k_proj ({k}) rows are not whole heads of {head_dim}")
            continue
        shape = LayerShape(q // head_dim, k // head_dim, headers[prefix + "mlp.gate_proj.weight"][1][0])
        if shape.heads % shape.kv_heads:
            problems.append(f"layer {i}: {shape.heads} query heads do not split into {shape.kv_heads} KV groups")
        shapes.append(shape)
    return shapes, problems


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_tokenizer(folder: Path, format: str) -> None:
    """Refuse, before any weight is read, a tokenizer the export cannot carry: files that are not
    JSON, a tokenizer class that needs its own code (never run, never copied), or none at all for a
    DeciLM folder (vLLM serves the folder's tokenizer).

    Raises:
        LlmpError: naming the file and the fix.
    """
    for name in ("tokenizer.json", "tokenizer_config.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise LlmpError(f"{path} is not JSON ({err}); save the tokenizer again beside the model") from err
        if not isinstance(data, dict):
            raise LlmpError(f"{path} holds a {type(data).__name__}, not a tokenizer's object; save the tokenizer again")
        if name == "tokenizer_config.json" and needs_own_code(data):
            raise LlmpError(
                f"{path} names a tokenizer with its own Python code ({data.get('tokenizer_class')!r}, `auto_map`), "
                "which exports neither run nor carry: save the model with a tokenizer built into transformers"
            )
    if format == "decilm" and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise LlmpError(
            f"{folder} has no tokenizer ({', '.join(TOKENIZER_FILES)}); vLLM serves the DeciLM folder's own: "
            "save the tokenizer beside the model (`tokenizer.save_pretrained(folder)`) and export again"
        )


def needs_own_code(tokenizer_config: dict) -> bool:
    """Whether a ``tokenizer_config.json`` names a class that transformers does not have."""
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    name = tokenizer_config.get("tokenizer_class")
    if not name:
        return bool(tokenizer_config.get("auto_map"))
    return tokenizer_class_from_name(name) is None and tokenizer_class_from_name(name.removesuffix("Fast")) is None
