"""Prune a model folder bigger than memory: layer by layer, read from and written to disk.

The model is a skeleton on the ``meta`` device, shaped from the safetensors headers (so a folder
llmp pruned before, with its own per-layer counts, streams too). The embeddings, final norm and
head are read first; then each decoder layer's tensors are read when :mod:`llmp.pruning.layerwise`
reaches it, pruned there in float32 on CPU (the model's dtype on CUDA), and written, in the
input's dtype, as their own shard of the output folder before the next layer is read::

    out/model-00001-of-00031.safetensors   layer 0
    ...
    out/model-00031-of-00031.safetensors   embeddings, final norm, head
    out/model.safetensors.index.json       tensor → shard, as transformers writes it

Peak memory is one layer's weights (in float32 while it is pruned), the embeddings and head,
and the calibration activations: it does not grow with depth. The folder is written atomically
(:func:`llmp.outdir.write_folder`) and loads with :func:`llmp.load_pruned` like any other.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from llmp.errors import LlmpError, raise_all
from llmp.importance import ACTIVATION
from llmp.io import finish_config
from llmp.outdir import write_folder, write_json_atomic
from llmp.pruning.config import PruneConfig
from llmp.pruning.experts import prune_experts
from llmp.pruning.layerwise import Layers, prune_layerwise
from llmp.pruning.preflight import preflight
from llmp.pruning.steps import RunInput, Start, Timings, run_record
from llmp.record import REPORT, PruningRecord
from llmp.structure import adapter_for
from llmp.structure.adapters.base import module_name
from llmp.surgery import sync_module_sizes
from llmp.tensorfile import (
    INDEX,
    Fused,
    add_biases,
    current_names,
    materialize_buffers,
    model_files,
    put_tensors,
    read_header,
    read_stored,
)


class StreamedLayers(Layers):
    """Layer ``i``'s weights: read from ``path`` on :meth:`load`; on :meth:`release`, written to
    ``out`` as shard ``i + 1`` (final pass) and dropped back to ``meta``."""

    visits_all = True  # every layer is written, pruned or not

    def __init__(self, model: PreTrainedModel, where: dict[str, tuple[Path, str]], dtype, out: Path, device="cpu"):
        self.model, self.where, self.dtype, self.out, self.device = model, where, dtype, out, torch.device(device)
        self.adapter = adapter_for(model)
        self.n = len(self.adapter.layers(model))
        self.shards = self.n + 1
        self.weight_map: dict[str, str] = {}
        self.total_size = 0

    def prefix(self, i: int) -> str:
        return f"{self.adapter.layers_path}.{i}."

    def load(self, i: int) -> None:
        read_tensors(self.model, self.where, [n for n in self.where if n.startswith(self.prefix(i))], self.dtype)
        layer = self.adapter.layers(self.model)[i]
        sync_module_sizes(layer)
        if self.device.type != "cpu":
            layer.to(self.device)  # one layer on the accelerator at a time

    def release(self, i: int, final: bool = True) -> None:
        layer = self.adapter.layers(self.model)[i]
        prefix = self.prefix(i)
        if final:
            state = {prefix + n: t.detach().to("cpu").contiguous() for n, t in layer.state_dict().items()}
            self.write(i + 1, state)
        put_tensors(self.model, {prefix + n: torch.empty_like(t, device="meta") for n, t in layer.state_dict().items()})

    def write(self, shard: int, state: dict[str, torch.Tensor]) -> None:
        name = f"model-{shard:05d}-of-{self.shards:05d}.safetensors"
        save_file(state, self.out / name, metadata={"format": "pt"})
        self.weight_map.update(dict.fromkeys(state, name))
        self.total_size += sum(t.numel() * t.element_size() for t in state.values())


def read_tensors(model: PreTrainedModel, where: dict, names: list[str], dtype) -> None:
    """Read tensors ``names`` (current names; ``where`` says in which file, under which name, or
    from which per-expert parts) into ``model``."""
    put_tensors(model, read_stored(where, names, dtype))


def open_skeleton(
    path: str | Path, dtype: torch.dtype | None = None
) -> tuple[PreTrainedModel, dict[str, tuple[Path, str]]]:
    """The model of folder ``path`` on ``meta``, shaped by its weights' headers, with every tensor
    outside the decoder layers read; and where each tensor is stored.

    Raises:
        LlmpError: no config or weights, a damaged file, or weights that do not fit the config.
    """
    path = Path(path)
    files = model_files(path)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
        headers = {file: read_header(file)[0] for file in files}
    except (OSError, ValueError) as err:
        raise LlmpError(f"cannot read the model in {path}: {err}") from err
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    stored = {name: (file, name) for file, entries in headers.items() for name in entries}
    where = current_names(model, stored, combine=Fused)  # current name → (file, name in the file) or Fused
    shapes = {}
    for name, source in where.items():
        if isinstance(source, Fused):
            file, key = source.parts[0][0]
            shapes[name] = torch.empty(source.shape(headers), dtype=dtype or headers[file][key]["dtype"], device="meta")
            continue
        info = headers[source[0]][source[1]]
        shapes[name] = torch.empty(info["shape"], dtype=dtype or info["dtype"], device="meta")
    add_biases(model, shapes)
    expected = set(model.state_dict())
    unexpected = sorted(set(shapes) - expected)
    if unexpected:
        raise LlmpError(f"the weights in {path} do not fit its config.json (unexpected: {unexpected[:5]})")
    head = model.get_output_embeddings()
    tied = (
        {f"{module_name(model, head)}.weight"}
        if head is not None and getattr(config, "tie_word_embeddings", False)
        else set()
    )
    buffers = {name for name, _ in model.named_buffers()}
    missing = sorted(expected - set(shapes) - tied - buffers)
    if missing:
        raise LlmpError(
            f"{path} lacks {len(missing)} tensors its config needs ({', '.join(missing[:3])}); copy the whole folder again"
        )
    put_tensors(model, shapes)
    sync_module_sizes(model)
    adapter = adapter_for(model)
    if adapter.automatic:
        raise LlmpError(
            f"streamed pruning needs a family adapter, and llmp has none for `{config.model_type}`: automatic "
            "discovery traces the model with real weights, which streaming never holds. Prune it in memory "
            "(without --stream), or write an adapter for the family in one file (docs/adapters.md)"
        )
    adapter.sync(model)
    prefix = adapter.layers_path + "."
    read_tensors(model, where, [n for n in where if not n.startswith(prefix)], dtype)
    model.tie_weights()
    materialize_buffers(model, skip=prefix)  # the layers stay on meta until their turn
    return model.eval(), where


def prune_streamed(
    path: str | Path,
    output: str | Path,
    config: PruneConfig,
    calibration: torch.Tensor,
    tokenizer=None,
    given: RunInput | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> PruningRecord:
    """Prune the model folder ``path`` into ``output`` one layer at a time (module docstring).

    ``config`` takes an activation criterion (layer by layer: :mod:`llmp.pruning.layerwise`) and is
    checked by :func:`llmp.pruning.preflight` as the in-memory path checks it, before any layer is read;
    ``given``: what the record keeps of the run's input (model name, calibration source);
    ``device``: where the layers run (``cuda``: the embeddings, head and one layer at a time on the GPU).

    Raises:
        LlmpError: as :func:`open_skeleton` and :func:`llmp.pruning.preflight`, or the output
            may not be written (see :func:`llmp.outcheck.check_output_dir`).
    """
    path = Path(path)
    raise_all(stream_problems(config))
    config = dataclasses.replace(config, layerwise=True)  # refused by its check unless the criterion allows it
    model, where = open_skeleton(path, dtype)
    config = preflight(model, config)
    _outside_to(model, device)
    with write_folder(output, overwrite, inputs=[path]) as tmp:
        layers = StreamedLayers(model, where, dtype, tmp, device)
        if config.moe:
            start = Start.of(model)
            steps = prune_experts(model, config, calibration, layers_io=layers)
            record = run_record(model, config, start, steps, Timings({**Timings().seconds, **steps[0].timings}), given)
        else:
            record = prune_layerwise(model, config, calibration, layers, given=given)
        prefix = layers.adapter.layers_path + "."
        rest = {n: t.detach().to("cpu").contiguous() for n, t in model.state_dict().items() if not n.startswith(prefix)}
        head = model.get_output_embeddings()
        if head is not None and head.weight is model.get_input_embeddings().weight:
            rest.pop(f"{module_name(model, head)}.weight", None)  # tied: stored once, as the embedding
        layers.write(layers.shards, rest)
        record = finish_config(model, record)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        index = {"metadata": {"total_size": layers.total_size}, "weight_map": dict(sorted(layers.weight_map.items()))}
        (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic(tmp / REPORT, record.to_json(), record=False)
    return record


def stream_problems(config: PruneConfig) -> list[str]:
    """What streamed pruning cannot do, named as the user asked it (``stream``, not ``layerwise``):
    it scores heads and MLP channels from each layer's activations, in one pass."""
    problems = []
    if config.moe and config.fraction:
        problems.append(
            f"`stream` prunes experts in a pass of their own: use `experts` / `expert_channels` alone (no `ratio`), "
            f"then stream the output again with `ratio` {config.ratio}"
        )
    if config.scope != "block":
        problems.append(
            f"`stream` prunes heads and MLP channels from each layer's activations: it takes `scope` block; "
            f"got `scope` {config.scope}"
        )
    elif config.criterion not in (None, *ACTIVATION):
        problems.append(
            f"`stream` scores each layer from its activations, without gradients: use `criterion` flap (or "
            f"wanda); got `criterion` {config.criterion}"
        )
    if config.steps != 1:
        problems.append(f"`stream` prunes in one pass: `steps` must be 1; got {config.steps}")
    if config.layerwise is False:
        problems.append("`stream` is layer by layer: drop `layerwise` false (or `stream`)")
    return problems


def _outside_to(model: PreTrainedModel, device) -> None:
    """Move everything outside the decoder layers (embeddings, norm, head, rotary buffers) to ``device``."""
    if torch.device(device).type == "cpu":
        return
    prefix = adapter_for(model).layers_path + "."
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    put_tensors(model, {n: t.to(device) for n, t in tensors if not n.startswith(prefix)})
    model.tie_weights()
