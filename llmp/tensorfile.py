"""Safetensors files, read and put into a model: what loading, streaming and export share.

Files are read into the process's own memory, never memory-mapped (:func:`read_safetensors`),
and their headers are checked against the file before any tensor is read (:func:`read_header`).
Tensors are put into a model whatever their old shape or device (:func:`put_tensors`), under the
names the model uses now (:func:`current_names`).
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel

from llmp.errors import LlmpError
from llmp.structure import adapter_for
from llmp.structure.adapters.base import BIASES_KEY

INDEX = "model.safetensors.index.json"


def model_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of model folder ``path``, each readable, and every shard that
    ``model.safetensors.index.json`` names among them (a missing shard named now, not when its
    layer's turn comes).

    Raises:
        LlmpError: no config.json, no safetensors weights, a weights file that is a symlink to
            nothing, or a shard the index names that is not there.
    """
    if not (path / "config.json").is_file():
        raise LlmpError(f"{path} is not a model folder: config.json is missing")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LlmpError(f"{path} has no *.safetensors weights (llmp never loads pickled weights)")
    broken = [f.name for f in files if not f.is_file()]
    if broken:
        raise LlmpError(f"{path}: {', '.join(broken)} is a symlink to nothing; restore the file it pointed to")
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            named = {str(file) for file in weight_map.values()}
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise LlmpError(f"{index} is not a safetensors index (no `weight_map` of names to files): {err}") from err
        missing = sorted(named - {f.name for f in files})
        if missing:
            raise LlmpError(
                f"{path} lacks {len(missing)} of the {len(named)} shards its {INDEX} names ({', '.join(missing[:3])}); "
                "copy the whole folder again"
            )
    return files


_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """The tensor entries of a ``.safetensors`` file's header (name → dtype, shape, offsets,
    checked against the file's size) and where the data starts.

    Raises:
        ValueError: the file is not a valid safetensors file (header, dtypes or offsets).
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb", buffering=0) as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is too short for a safetensors file")
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, 100 * 1024**2):
            raise ValueError(f"{path}: header length {length} does not fit the file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    base, entries = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        kind = _DTYPES.get(info.get("dtype")) if isinstance(info, dict) else None
        shape, offsets = (info.get("shape"), info.get("data_offsets")) if isinstance(info, dict) else (None, None)
        if kind is None or not isinstance(shape, list) or not isinstance(offsets, list) or len(offsets) != 2:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry {info!r}")
        start, end = offsets
        nbytes = math.prod(shape) * kind.itemsize
        if not 0 <= start <= end <= size - base or end - start != nbytes:
            raise ValueError(f"{path}: tensor {name!r} has offsets {offsets} that do not fit its shape or the file")
        entries[name] = {"dtype": kind, "shape": shape, "start": base + start, "nbytes": nbytes}
    return entries, base


def read_safetensors(
    path: str | Path, dtype: torch.dtype | None = None, names: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file (only ``names``, if given), read into the process's
    own memory, floating ones converted to ``dtype`` one at a time if given.

    Not memory-mapped: a mapped file's pages stay counted in the process's memory for as long as
    any tensor of it lives, so pruning a mapped model would hold the original weights and the
    pruned copies at once. Read this way, a sliced-away weight's memory is freed at once.

    Raises:
        ValueError: the file is not a valid safetensors file (header, dtypes or offsets).
    """
    path = Path(path)
    entries, _ = read_header(path)
    wanted = entries if names is None else {n: entries[n] for n in names}
    tensors = {}
    with path.open("rb", buffering=0) as f:
        for name, info in wanted.items():
            tensor = torch.empty(info["shape"], dtype=info["dtype"])
            f.seek(info["start"])
            if info["nbytes"] and f.readinto(memoryview(tensor.view(-1).view(torch.uint8).numpy())) != info["nbytes"]:
                raise ValueError(f"{path}: tensor {name!r} is cut short")
            if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
                tensor = tensor.to(dtype)
            tensors[name] = tensor
    return tensors


def put_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make each of ``state`` the parameter (or buffer) of that name, whatever its old shape or device."""
    for name, tensor in state.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        else:
            module._buffers[attr] = tensor


@dataclass(frozen=True)
class Fused:
    """Where a fused expert tensor's parts are stored: ``parts[pattern][expert]`` = (file, name)
    (what :func:`current_names` gives with ``combine=Fused`` for per-expert checkpoints)."""

    parts: list[list[tuple[Path, str]]]

    def shape(self, headers: dict[Path, dict]) -> list[int]:
        """[experts, Σ rows of the patterns, columns], from the parts' headers."""
        first = [headers[p[0][0]][p[0][1]]["shape"] for p in self.parts]
        return [len(self.parts[0]), sum(s[0] for s in first), first[0][1]]


def read_stored(where: dict, names: Iterable[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Tensors ``names`` (current names), read where ``where`` says: ``(file, name in the file)``,
    or :class:`Fused` per-expert parts, stacked one fused tensor at a time."""
    by_file, fused, out = defaultdict(list), {}, {}
    for name in names:
        if isinstance(where[name], Fused):
            fused[name] = where[name]
        else:
            by_file[where[name][0]].append(name)
    for file, wanted in by_file.items():
        tensors = read_safetensors(file, dtype, [where[n][1] for n in wanted])
        out.update({n: tensors[where[n][1]] for n in wanted})
    for name, source in fused.items():  # its parts and it at once, never a layer's experts twice
        keys = defaultdict(list)
        for file, key in (entry for pattern in source.parts for entry in pattern):
            keys[file].append(key)
        read = {(file, k): t for file, ks in keys.items() for k, t in read_safetensors(file, dtype, ks).items()}
        out[name] = stack_experts([[read.pop(entry) for entry in p] for p in source.parts])
    return out


def stack_experts(parts: list[list[torch.Tensor]]) -> torch.Tensor:
    """Per-expert tensors (``parts[pattern][expert]``, each [out, in]) as the fused one: stacked
    along a new expert dimension, the patterns concatenated along dim 1 ([gate; up])."""
    stacked = [torch.stack(p) for p in parts]
    return torch.cat(stacked, dim=1) if len(stacked) > 1 else stacked[0]


def current_names(model: PreTrainedModel, state: dict, combine=stack_experts) -> dict:
    """Undo what transformers does on save: its renamings (GPT-NeoX writes ``lm_head`` as
    ``embed_out``) and its split of fused expert tensors into one tensor per expert (MoE models),
    whose values ``combine`` joins (``parts[pattern][expert]``; default: the tensors, stacked)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    if renamings:
        state = {rename_source_key(k, renamings, [])[0]: v for k, v in state.items()}
    for converter in transforms:
        if isinstance(converter, WeightConverter) and any("*" in p for p in converter.source_patterns):
            state = fuse_experts(state, converter, combine)
    return state


def fuse_experts(state: dict, converter, combine=stack_experts) -> dict:
    """Join per-expert entries (``mlp.experts.3.gate_proj.weight``) into the fused one the model
    holds (``mlp.experts.gate_up_proj`` [experts, 2·inter, hidden]) as ``converter`` (a transformers
    ``WeightConverter``: stack along dim 0, then concatenate along dim 1) describes, by ``combine``.

    Raises:
        LlmpError: the converter does other operations than those two, or experts are missing.
    """
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = converter.operations
    merge_ok = ops and isinstance(ops[0], MergeModulelist) and ops[0].dim == 0
    if not merge_ok or len(ops) > 2 or (len(ops) == 2 and not (isinstance(ops[1], Concatenate) and ops[1].dim == 1)):
        raise LlmpError(f"llmp cannot read expert tensors converted by {ops}; this model's layout is not supported")
    (target,) = converter.target_patterns
    patterns = [re.compile(re.escape(p).replace(r"\*", r"(\d+)") + "$") for p in converter.source_patterns]
    found: dict[str, list[dict[int, torch.Tensor]]] = {}
    rest = {}
    for key, tensor in state.items():
        for n, pattern in enumerate(patterns):
            match = pattern.search(key)
            if match:
                parts = found.setdefault(key[: match.start()], [{} for _ in patterns])
                parts[n][int(match.group(1))] = tensor
                break
        else:
            rest[key] = tensor
    for prefix, parts in found.items():
        experts = sorted(parts[0])
        if any(sorted(p) != experts for p in parts) or experts != list(range(len(experts))):
            raise LlmpError(f"the experts under {prefix!r} are incomplete: {[sorted(p) for p in parts]}")
        rest[prefix + target] = combine([[p[e] for e in experts] for p in parts])
    return rest


def add_biases(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
    """Give the layer modules that compensation gave a bias (config ``llmp_biases``) the bias the
    config alone does not create, where the weights hold one."""
    added = getattr(model.config, BIASES_KEY, None) or ()
    if not added:
        return
    adapter = adapter_for(model)
    for i, layer in enumerate(adapter.layers(model)):
        for name in added:
            module = layer.get_submodule(name)
            key = f"{adapter.layers_path}.{i}.{name}.bias"
            if key in state and isinstance(module, nn.Linear) and module.bias is None:
                module.bias = nn.Parameter(torch.empty(module.out_features, device="meta"))


def non_persistent(model: nn.Module, name: str) -> bool:
    module_name, _, attr = name.rpartition(".")
    return attr in model.get_submodule(module_name)._non_persistent_buffers_set


def materialize_buffers(model: PreTrainedModel, skip: str | None = None) -> None:
    """Compute the buffers no checkpoint holds (rotary frequencies) with the model's own init;
    then every tensor (but those under ``skip``, a name prefix) must be real."""
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
    leftover = [n for n in leftover if skip is None or not n.startswith(skip)]
    if leftover:
        raise LlmpError(f"these tensors were not restored: {leftover[:5]}; the folder is incomplete")
