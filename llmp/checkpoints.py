"""Lightning checkpoints of a :class:`~llmp.RecoveryModule`: read safely, and turned back into a
pruned model folder.

Nothing in a checkpoint may run code: every load takes tensors and plain data only
(``weights_only``), including the loads that DeepSpeed's and Lightning's ZeRO consolidation make
with ``weights_only=False`` (forced by ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, which ``torch.load``
reads at each call), with DeepSpeed's few plain data classes allowed by name.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from llmp.errors import LlmpError
from llmp.record import checkpoint_record

CHECKPOINT_KEY = "llmp"
"""llmp's entry in a Lightning checkpoint: the model spec, mode, adapters' settings and record."""
_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NOT = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


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


def read_checkpoint_state(path: str | Path) -> dict:
    """llmp's entry of a Lightning checkpoint (a file, or a DeepSpeed checkpoint folder).

    Raises:
        LlmpError: the checkpoint is missing or unreadable.
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
    return checkpoint.get(CHECKPOINT_KEY, {})


def read_trained(checkpoint: str | Path, scratch: str | Path) -> tuple[dict, dict]:
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
        raise LlmpError(f"cannot read checkpoint {checkpoint}: {err}; it is corrupt or not a Lightning checkpoint") from err
    saved = state.get(CHECKPOINT_KEY)
    if not isinstance(saved, dict) or checkpoint_record(saved, str(checkpoint)) is None or "state_dict" not in state:
        raise LlmpError(f"{checkpoint} was not written by a llmp RecoveryModule (no {CHECKPOINT_KEY!r} entry)")
    return state, saved
