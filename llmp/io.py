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
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from llmp.errors import LlmpError
from llmp.outcheck import check_output_dir
from llmp.outdir import real_path, write_folder, write_json_atomic
from llmp.record import REPORT, PruningRecord
from llmp.remote_code import remote_code_error
from llmp.structure import adapter_for
from llmp.structure.adapters.base import module_name
from llmp.surgery import sync_module_sizes
from llmp.targets import engines_for
from llmp.tensorfile import (
    add_biases,
    current_names,
    materialize_buffers,
    model_files,
    non_persistent,
    put_tensors,
    read_safetensors,
)

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
        LlmpError: ``output`` may not be written (see :func:`llmp.outcheck.check_output_dir`).
    """
    with write_folder(output, overwrite, inputs) as tmp:
        record = finish_config(model, record)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if record is not None:
            write_json_atomic(tmp / REPORT, record.to_json(), record=False)
    return real_path(output)


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
        raise remote_code_error(path, err) or LlmpError(
            f"cannot read the model in {path}: {err}. Re-create it with `llmp prune`."
        ) from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    state = current_names(model, state)
    add_biases(model, state)
    check_shapes(model, state, path)
    _place(model, state, path)
    model.tie_weights()
    materialize_buffers(model)
    adapter_for(model).sync(model)
    floating = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if len(floating) == 1:  # what save_pretrained writes into config.json
        model.config.dtype = next(iter(floating))
    return model.eval()


def _place(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    expected = dict(model.named_parameters())
    expected.update((n, b) for n, b in model.named_buffers() if not non_persistent(model, n))
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
    _forward_on_shapes(twin, path)


def _forward_on_shapes(twin: PreTrainedModel, path: Path) -> None:
    """Run ``twin``'s forward on the ``meta`` device; a failure names the innermost module.

    Raises:
        LlmpError: the forward fails on shapes (a forward that reads values is let through).
    """
    config = twin.config
    entered: list[str] = []
    names = {module: name for name, module in twin.named_modules()}

    def enter(module, _args) -> None:
        entered.append(names[module])

    def leave(_module, _args, _output) -> None:
        entered.pop()

    handles = [m.register_forward_pre_hook(enter) for m in twin.modules()]
    handles += [m.register_forward_hook(leave) for m in twin.modules()]
    experts = getattr(config, "_experts_implementation", None)
    try:
        if experts is not None:  # the grouped-matmul kernels check dtypes a meta tensor does not settle
            config._experts_implementation = "eager"
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
        if experts is not None:
            config._experts_implementation = experts
        for handle in handles:
            handle.remove()
