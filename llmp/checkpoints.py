"""Lightning checkpoints of a :class:`~llmp.RecoveryModule`: read safely, and turned back into a
pruned model folder.

Nothing in a checkpoint may run code: every load takes tensors and plain data only
(``weights_only``), including the loads that DeepSpeed's and Lightning's ZeRO consolidation make
with ``weights_only=False`` (forced by ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which ``torch.load``
reads at each call), with DeepSpeed's few plain data classes allowed by name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ConfigDict, TypeAdapter, with_config

from llmp.distill import DistillSettings
from llmp.errors import LlmpError
from llmp.lora import LoraSettings
from llmp.record import PruningRecord, strict_read

CHECKPOINT_KEY = "llmp"
"""llmp's entry in a Lightning checkpoint (a :class:`CheckpointEntry`)."""
_LEGACY = ("history", "pruning_settings", "layer_shapes", "pruning_done")  # read into the record, or derived
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


@with_config(ConfigDict(extra="forbid"))
@dataclass
class CheckpointEntry:
    """What a checkpoint of a :class:`~llmp.RecoveryModule` needs beside its weights to be
    rebuilt: the model it started from, how it was pruned, and how it trains.

    Written whole by :meth:`RecoveryModule.on_save_checkpoint`; the epochs whose pruning step is
    done are those of ``record.steps`` (:meth:`pruned_epochs`).

    Attributes:
        model: the spec the module loaded (folder, built-in name, ``.gguf``, hub id).
        mode: ``lora`` or ``full``.
        lora: the adapters' settings (LoRA mode).
        dtype: the weights' dtype.
        record: the pruning so far (its steps are repeated on ``model`` before the weights load).
        distill: the distillation settings, if any.
    """

    model: str
    mode: Literal["lora", "full"]
    lora: LoraSettings
    dtype: Literal["float32", "bfloat16", "float16"]
    record: PruningRecord
    distill: DistillSettings | None = None

    def to_json(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["lora"] = dataclasses.asdict(self.lora)
        data["distill"] = dataclasses.asdict(self.distill) if self.distill is not None else None
        data["record"] = self.record.to_json()
        return data

    @classmethod
    def from_json(cls, data: Any, source: str = "the checkpoint") -> CheckpointEntry:
        """Read and check a :meth:`to_json` object, or an older one (``lora_settings``; the
        record as ``history`` + ``pruning_settings``).

        Raises:
            LlmpError: no record, or a key of the wrong type or unknown, named.
        """
        if not isinstance(data, dict) or ("record" not in data and "history" not in data):
            raise LlmpError(f"{source} was not written by a llmp RecoveryModule (no {CHECKPOINT_KEY!r} entry)")
        fields = {k: v for k, v in data.items() if k not in _LEGACY and k != "lora_settings"}
        fields["record"] = _record(data, f"{source} (its {CHECKPOINT_KEY}.record entry)")
        if "lora_settings" in data:  # as older checkpoints name it
            fields["lora"] = data["lora_settings"]
        return strict_read(_ENTRY, fields, f"{source} (its {CHECKPOINT_KEY} entry)")

    def pruned_epochs(self) -> list[int]:
        """The epochs at whose start a pruning step ran (a step already reached is re-checked)."""
        return sorted({s.epoch for s in self.record.steps if s.epoch is not None})


_ENTRY = TypeAdapter(CheckpointEntry)


def _record(saved: dict[str, Any], source: str) -> PruningRecord:
    """The record of an entry; entries written before the record existed hold ``history`` (the
    steps) and ``pruning_settings`` (settings, schedule, calibration) instead."""
    if "record" in saved:
        return PruningRecord.from_json(saved["record"], source)
    old = saved.get("pruning_settings") or {}
    shapes = saved.get("layer_shapes") or []
    data = {"family": "unknown", "params_before": 0, "params_after": 0, "layer_shapes": shapes, **old}
    return PruningRecord.from_json({**data, "steps": saved["history"]}, source)


def safe_load(path: str | Path, mmap: bool = False):
    """``torch.load`` of tensors and plain data only: unpickling cannot run code from the file."""
    return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside loads tensors and plain data only, whatever its caller asks
    (DeepSpeed's and Lightning's consolidation ask ``weights_only=False``)."""
    saved = {name: os.environ.pop(name, None) for name in (_FORCE, _FORCE_NOT)}
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            yield
    finally:
        for name, value in saved.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


def _deepspeed_globals() -> list:
    """The non-tensor classes DeepSpeed writes into ZeRO checkpoints (plain data holders, no code run)."""
    found = []
    for module, name in (
        ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
        ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
        ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
        ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ):
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return found


def read_entry(path: str | Path) -> CheckpointEntry | None:
    """llmp's entry of a Lightning checkpoint (a file, or a DeepSpeed checkpoint folder);
    ``None`` when it has none (a checkpoint of another module).

    Raises:
        LlmpError: the checkpoint is missing or unreadable, or its entry is damaged.
    """
    path = Path(path)
    if path.is_dir():  # DeepSpeed: the client state sits beside rank 0's model states
        candidates = sorted(path.glob("*/*mp_rank_00_model_states.pt")) + sorted(
            path.glob("*mp_rank_00_model_states.pt")
        )
        if not candidates:
            raise LlmpError(f"{path} is a folder but not a DeepSpeed checkpoint (no *mp_rank_00_model_states.pt)")
        path = candidates[0]
    if not path.is_file():
        raise LlmpError(f"checkpoint {path} does not exist")
    try:
        # weights_only: tensors and plain data only, so a crafted file cannot run code (llmp's entry
        # is plain data); mmap keeps the weights on disk while the small llmp entry is read.
        checkpoint = safe_load(path, mmap=True)
    except Exception as err:  # torch raises many types for truncated or foreign files
        raise LlmpError(f"cannot read checkpoint {path}: {err}; it is corrupt or not a Lightning checkpoint") from err
    return entry_of(checkpoint, str(path))


def entry_of(checkpoint: dict, source: str = "the checkpoint") -> CheckpointEntry | None:
    """The checked llmp entry of a loaded checkpoint; ``None`` when it has none."""
    if CHECKPOINT_KEY not in checkpoint:
        return None
    return CheckpointEntry.from_json(checkpoint[CHECKPOINT_KEY], source)


def read_trained(checkpoint: str | Path, scratch: str | Path) -> tuple[dict, CheckpointEntry]:
    """The whole checkpoint (``state_dict`` and all) and llmp's entry of it, checked; a DeepSpeed
    ZeRO checkpoint (a folder of shards) is first consolidated to fp32 into the folder ``scratch``.

    Raises:
        LlmpError: the checkpoint is unreadable or was not written by a RecoveryModule.
    """
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        consolidated = Path(scratch) / "fp32.ckpt"
        try:
            with weights_only_loads():
                convert_zero_checkpoint_to_fp32_state_dict(checkpoint, consolidated)
        except Exception as err:  # DeepSpeed raises many types for incomplete folders
            raise LlmpError(f"cannot consolidate the DeepSpeed checkpoint {checkpoint}: {err}") from err
        checkpoint = consolidated
    try:
        state = safe_load(checkpoint)
    except Exception as err:
        raise LlmpError(
            f"cannot read checkpoint {checkpoint}: {err}; it is corrupt or not a Lightning checkpoint"
        ) from err
    entry = entry_of(state, str(checkpoint)) if isinstance(state, dict) else None
    if entry is None or "state_dict" not in state:
        raise LlmpError(f"{checkpoint} was not written by a llmp RecoveryModule (no {CHECKPOINT_KEY!r} entry)")
    return state, entry
