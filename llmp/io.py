"""Saved models: a standard Hugging Face folder (safetensors, config, tokenizer) plus the report.

A pruned model may have different head and channel counts in every layer, which the family's
config cannot say. The folder's ``config.json`` therefore carries ``llmp_layer_shapes``, and
:func:`load_pruned` builds the model skeleton on the ``meta`` device and puts the saved tensors in
place, whatever their shapes; the adapter then re-derives what the forward reads. A ``uniform``
folder has equal counts in every layer written into the config itself, so plain
``AutoModelForCausalLM.from_pretrained`` loads it too.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from llmp.errors import LlmpError
from llmp.outdir import check_output_dir, real_path, write_folder, write_json_atomic
from llmp.record import REPORT, PruningRecord
from llmp.structure import adapter_for
from llmp.structure.adapters.base import BIASES_KEY, module_name
from llmp.surgery import sync_module_sizes

SHAPES_KEY = "llmp_layer_shapes"
__all__ = ["REPORT", "check_output_dir", "load_pruned", "save_pruned", "write_json_atomic"]


def save_pruned(
    model: PreTrainedModel,
    output: str | Path,
    tokenizer=None,
    record: PruningRecord | None = None,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Save ``model`` (and tokenizer, the record of its pruning) to ``output`` atomically: all of it or nothing.

    The folder is written under a temporary name beside ``output`` and swapped into place (see
    :mod:`llmp.outdir`); ``overwrite`` replaces only a folder llmp wrote.

    Raises:
        LlmpError: ``output`` may not be written (see :func:`llmp.outdir.check_output_dir`).
    """
    with write_folder(output, overwrite, inputs) as tmp:
        record = finish_config(model, record)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if record is not None:
            write_json_atomic(tmp / REPORT, record.to_json(), record=False)
    return real_path(output)


def model_files(path: Path) -> list[Path]:
    """The ``*.safetensors`` files of model folder ``path``.

    Raises:
        LlmpError: no config.json, or no safetensors weights.
    """
    if not (path / "config.json").is_file():
        raise LlmpError(f"{path} is not a model folder: config.json is missing")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise LlmpError(f"{path} has no *.safetensors weights (llmp never loads pickled weights)")
    return files


def finish_config(model: PreTrainedModel, record: PruningRecord | None) -> PruningRecord | None:
    """Put the per-layer counts into ``model.config`` (:data:`SHAPES_KEY`; equal counts in every
    layer also into the config's own fields, so plain transformers loads the folder unless its
    config checks refuse them) and return ``record`` with what that allows and the weights' dtype."""
    adapter = adapter_for(model)
    shapes = adapter.layer_shapes(model)
    plain = adapter.apply_uniform_config(model) and adapter.plain_biases(model, add=False)
    setattr(model.config, SHAPES_KEY, shapes)
    if record is None:
        return None
    from llmp.export import engines_for

    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    dtype = str(next(iter(floating))).removeprefix("torch.") if len(floating) == 1 else None
    engines = engines_for(getattr(model.config, "model_type", None), shapes, plain)
    return dataclasses.replace(record, loads_with_plain_transformers=plain, engines=engines, dtype=dtype)


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, trust_remote_code: bool = False) -> PreTrainedModel:
    """Load a folder written by :func:`save_pruned` (or any Llama-family HF folder).

    Args:
        path: the folder.
        dtype: convert the floating weights to it as they are read (default: as saved); buffers
            made by the model itself (rotary frequencies) keep their own dtype.
        trust_remote_code: let the folder's own Python code (config.json ``auto_map``) run.

    Raises:
        LlmpError: the folder or its weights are missing, corrupt or do not fit together, or it
            needs its own code and ``trust_remote_code`` is off.

    Example::

        model = llmp.load_pruned("out/smollm2-20")
        model.generate(**tokenizer("Hello", return_tensors="pt"), max_new_tokens=8)
    """
    path = Path(path)
    weight_files = model_files(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        state: dict[str, torch.Tensor] = {}
        for file in weight_files:
            state.update(read_safetensors(file, dtype))
    except (OSError, ValueError, json.JSONDecodeError) as err:
        from llmp.models import remote_code_error

        raise remote_code_error(path, err) or LlmpError(
            f"cannot read the model in {path}: {err}. Re-create it with `llmp prune`."
        ) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    state = _current_names(model, state)
    _add_biases(model, state)
    check_shapes(model, state, path)
    _place(model, state, path)
    model.tie_weights()
    _materialize_buffers(model)
    adapter_for(model).sync(model)
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floating) == 1:  # what save_pretrained writes into config.json
        model.config.dtype = next(iter(floating))
    return model.eval()


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


def _add_biases(model: PreTrainedModel, state: dict[str, torch.Tensor]) -> None:
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


def _place(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = dict(model.named_parameters())
    expected.update((n, b) for n, b in model.named_buffers() if not _non_persistent(model, n))
    head = model.get_output_embeddings()  # its weight is the embedding's when tied (lm_head, embed_out)
    tied = set()
    if head is not None and getattr(model.config, "tie_word_embeddings", False):
        tied = {f"{module_name(model, head)}.weight"}
    missing = sorted(set(expected) - set(state) - tied)
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise LlmpError(
            f"the weights in {path} do not fit its config.json (missing: {missing[:5]}, unexpected: "
            f"{unexpected[:5]}); the folder is corrupt or from another model"
        )
    put_tensors(model, state)
    sync_module_sizes(model)


def put_tensors(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Make each of ``state`` the parameter (or buffer) of that name, whatever its old shape or device."""
    for name, tensor in state.items():
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner)
        if attr in module._parameters:
            module._parameters[attr] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
        else:
            module._buffers[attr] = tensor


def check_shapes(twin: PreTrainedModel, state: dict[str, torch.Tensor], path: Path) -> None:
    """Run the forward of ``twin`` (a skeleton on the ``meta`` device) with tensors of these shapes.

    Catches weights that disagree with ``config.json`` (a wrong ``head_dim``) or with each other
    (q_proj rows against o_proj columns) at load time, naming the module, instead of a reshape
    error inside a later forward.

    Raises:
        LlmpError: the forward fails; the message names the innermost module and its tensors' shapes.
    """
    config = twin.config
    declared = getattr(config, SHAPES_KEY, None)
    if declared is None:  # a plain folder: its config alone fixes every tensor's shape
        expected = {name: tuple(t.shape) for name, t in twin.state_dict().items()}
        for name, tensor in state.items():
            if name in expected and tuple(tensor.shape) != expected[name]:
                raise LlmpError(
                    f"the weights in {path} do not fit its config.json: `{name}` has shape {list(tensor.shape)}, "
                    f"the config implies {list(expected[name])}; the folder is corrupt or its config.json was edited"
                )
    _place(twin, {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in state.items()}, path)
    twin.tie_weights()
    adapter = adapter_for(twin)
    adapter.sync(twin)
    if declared is not None:  # the per-layer counts the weights give under config.json must be the saved ones
        names = {module: name for name, module in twin.named_modules()}
        for layer, found, saved in zip(adapter.layers(twin), adapter.layer_shapes(twin), declared, strict=False):
            if found != saved:
                raise LlmpError(
                    f"the weights in {path} do not fit together or with its config.json: `{names[layer]}` holds "
                    f"{found} under config head_dim {getattr(config, 'head_dim', None)}, but {SHAPES_KEY} says {saved}; "
                    "the folder is corrupt or its config.json was edited"
                )
    entered: list[str] = []
    names = {module: name for name, module in twin.named_modules()}

    def enter(module, _args) -> None:
        entered.append(names[module])

    def leave(_module, _args, _output) -> None:
        entered.pop()

    handles = [m.register_forward_pre_hook(enter) for m in twin.modules()]
    handles += [m.register_forward_hook(leave) for m in twin.modules()]
    try:
        twin(input_ids=torch.zeros(1, 2, dtype=torch.long, device="meta"))
    except Exception as err:  # shape errors come as RuntimeError, ValueError, IndexError...
        if "meta" in str(err):  # a forward that reads values (GPT-2's `.item()`, Baichuan's CPU masks):
            return  # it cannot run on shapes alone; the per-layer check above still holds
        where = entered[-1] if entered else "the model"
        module = twin.get_submodule(where) if entered else twin
        tensors = ", ".join(f"{n} {list(t.shape)}" for n, t in list(module.named_parameters())[:8])
        raise LlmpError(
            f"the weights in {path} do not fit together or with its config.json: `{where}` ({tensors}; "
            f"config head_dim {getattr(config, 'head_dim', None)}) fails with: {err}. The folder is corrupt "
            "or its config.json was edited; re-create it with `llmp prune`"
        ) from None
    finally:
        for handle in handles:
            handle.remove()


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


def _materialize_buffers(model: PreTrainedModel, skip: str | None = None) -> None:
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
