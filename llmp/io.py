"""Saved models: a standard Hugging Face folder (safetensors, config, tokenizer) plus the report.

A pruned model may have different head and channel counts in every layer, which the family's
config cannot say. The folder's ``config.json`` therefore carries ``llmp_layer_shapes``, and
:func:`load_pruned` builds the model skeleton on the ``meta`` device and puts the saved tensors in
place, whatever their shapes; the adapter then re-derives what the forward reads. A ``uniform``
folder has equal counts in every layer written into the config itself, so plain
``AutoModelForCausalLM.from_pretrained`` loads it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from llmp.errors import LlmpError
from llmp.structure import adapter_for
from llmp.surgery import sync_module_sizes

REPORT = "pruning_report.json"
SHAPES_KEY = "llmp_layer_shapes"


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path`` and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def check_output_dir(output: str | Path, overwrite: bool = False) -> Path:
    """Fail early (before any work) if ``output`` exists and may not be replaced."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise LlmpError(f"`output` {output} exists and is not a folder; choose another path")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise LlmpError(f"`output` folder {output} is not empty; choose another path or pass --overwrite")
    return output


def save_pruned(
    model: PreTrainedModel, output: str | Path, tokenizer=None, report: dict | None = None, overwrite: bool = False
) -> Path:
    """Save ``model`` (and tokenizer, report) to ``output`` atomically: all of it or nothing.

    The folder is written under a temporary name beside ``output`` and renamed into place.
    """
    output = check_output_dir(output, overwrite)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        adapter = adapter_for(model)
        shapes = adapter.layer_shapes(model)
        # Equal counts in every layer go into the config itself, so plain transformers loads it
        # (unless transformers' own config checks refuse the counts).
        plain = adapter.apply_uniform_config(model)
        setattr(model.config, SHAPES_KEY, shapes)
        if report is not None:
            report = {**report, "loads_with_plain_transformers": plain}
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if report is not None:
            write_json_atomic(tmp / REPORT, report)
        if output.exists():
            old = output.with_name(f".{output.name}.old-{os.getpid()}")
            os.replace(output, old)
            os.replace(tmp, output)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def load_pruned(path: str | Path, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """Load a folder written by :func:`save_pruned` (or any Llama-family HF folder).

    Raises:
        LlmpError: the folder or its weights are missing or corrupt.

    Example::

        model = llmp.load_pruned("out/smollm2-20")
        model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=8)
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise LlmpError(f"{path} is not a model folder: config.json is missing")
    weight_files = sorted(path.glob("*.safetensors"))
    if not weight_files:
        raise LlmpError(f"{path} has no *.safetensors weights (llmp never loads pickled weights)")
    try:
        config = AutoConfig.from_pretrained(path)
        state: dict[str, torch.Tensor] = {}
        for file in weight_files:
            state.update(load_file(file))
    except (OSError, ValueError, SafetensorError, json.JSONDecodeError) as err:
        raise LlmpError(f"cannot read the model in {path}: {err}. Re-create it with `llmp prune`.") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    _place(model, _current_names(model, state), path)
    model.tie_weights()
    _materialize_buffers(model)
    adapter_for(model).sync(model)
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _place(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = dict(model.named_parameters())
    expected.update((n, b) for n, b in model.named_buffers() if not _non_persistent(model, n))
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LlmpError(
            f"the weights in {path} do not fit its config.json (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); the folder is corrupt or from another model"
        )
    for name, tensor in state.items():
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        else:
            module._buffers[attr] = tensor
    sync_module_sizes(model)


def _current_names(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Undo the renamings transformers applies on save (GPT-NeoX writes ``lm_head`` as ``embed_out``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightRenaming, rename_source_key

    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]
    if not renamings:
        return state
    return {rename_source_key(k, renamings, [])[0]: v for k, v in state.items()}


def _non_persistent(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(module_name)._non_persistent_buffers_set


def _materialize_buffers(model: PreTrainedModel) -> None:
    """Compute the buffers no checkpoint holds (rotary frequencies) with the model's own init."""
    for module in model.modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if not meta:
            continue
        for name in meta:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        # The init runs per module and would redraw the loaded tensors beside the buffer (Gemma's
        # embedding holds its weight and the √hidden normaliser); transformers' init skips flagged ones.
        loaded = [*module._parameters.values(), *(b for n, b in module._buffers.items() if n not in meta)]
        for tensor in loaded:
            if tensor is not None:
                tensor._is_hf_initialized = True
        model._init_weights(module)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise LlmpError(f"these tensors were not restored: {leftover[:5]}; the folder is incomplete")
