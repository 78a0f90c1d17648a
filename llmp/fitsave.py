"""A fit's trained model into ``--output``, and kept elsewhere when the output cannot take it.

Single device and DDP: rank 0 merges the adapters and writes the folder; when the disk fills, the
weights are checkpointed where there is room (the fit's root folder, else the system's temporary
folder) and the message says how to export them. DeepSpeed: every rank writes its ZeRO shards
beside the output — or, when the checkpoint would not fit there, in the first of those folders
with room (rank 0 decides and broadcasts it: nodes see different disks) — and rank 0
consolidates them into the output; when that fails, the message names the checkpoint and how to
export it. Hours of training are not lost to a full disk.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from llmp import strategies
from llmp.errors import LlmpError
from llmp.outcheck import free_bytes, no_space_message
from llmp.record import Recovery
from llmp.recovery import RecoveryModule, export_checkpoint

log = logging.getLogger(__name__)


def save(trainer, module: RecoveryModule, output: Path, recovery: Recovery, overwrite: bool) -> None:
    """Write the trained model to ``output`` (every rank calls it)."""
    if isinstance(trainer.strategy, strategies.DeepSpeedStrategy):
        ckpt = zero_checkpoint_path(trainer, module, output)
        trainer.save_checkpoint(ckpt)  # every rank writes its shards
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            try:
                export_checkpoint(ckpt, output, recovery, overwrite=overwrite)
            except Exception as err:  # whatever failed, the shards hold the trained model: say where
                kept = f"the trained model is kept in the ZeRO checkpoint {ckpt}: {_export(ckpt, output)} exports it"
                reason = no_space_message(err) or (str(err) if isinstance(err, LlmpError) else None)
                if reason is None:
                    log.error(kept)
                    raise
                raise LlmpError(f"{reason}; {kept}") from err
    elif trainer.is_global_zero:
        try:
            module.export(output, recovery, overwrite=overwrite)
        except Exception as err:
            if no_space_message(err) is None:
                raise
            raise LlmpError(f"{no_space_message(err)}; {_rescue(trainer, output)}") from err


def zero_bytes(module: RecoveryModule) -> int:
    """A ZeRO checkpoint's size: every parameter as trained (the model states) and, for the trained
    ones, fp32 master weights and Adam's two moments (12 bytes each: the optimizer states)."""
    total = 0
    for p in module.parameters():
        n = getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves each rank an empty local tensor
        total += n * p.element_size() + (12 * n if p.requires_grad else 0)
    return total


def zero_checkpoint_path(trainer, module: RecoveryModule, output: Path) -> Path:
    """Beside ``output`` where it fits, else the fit's root folder, else (one node) the system's
    temporary folder; rank 0 decides, every rank gets its answer."""
    path = ""
    if trainer.is_global_zero:
        needed = zero_bytes(module)
        folders = [output.parent, Path(trainer.default_root_dir)]
        if trainer.num_nodes == 1:  # another node's shards would not reach rank 0's temporary folder
            folders.append(Path(tempfile.gettempdir()))
        for folder in folders:
            if free_bytes(folder) >= needed + needed // 8:
                path = str(output.with_name(f"{output.name}.zero-checkpoint"))
                if folder != output.parent:
                    path = str(folder.resolve() / f"llmp-{output.name}-{os.getpid()}.zero-checkpoint")
                    log.warning("no room for the ZeRO checkpoint beside %s: writing it to %s", output, path)
                break
    path = trainer.strategy.broadcast(path)
    if not path:
        raise LlmpError(
            f"`--output` {output}: no room for the ZeRO checkpoint ({zero_bytes(module) / 2**30:.2f} GiB) beside it, "
            "in the fit's root folder or the temporary folder; free space (enable checkpointing to keep a run's weights)"
        )
    return Path(path)


def _export(checkpoint: Path, output: Path) -> str:
    return f"`python -c \"from llmp.recovery import export_checkpoint; export_checkpoint('{checkpoint}', '{output}')\"`"


def _rescue(trainer, output: Path) -> str:
    """Keep the trained weights where there is room (the fit's root folder, else the system's
    temporary folder) when the output could not be written."""
    module = trainer.lightning_module
    if module.mode == "lora" and not module.is_lora_wrapped:
        module.mode = "full"  # the export merged the adapters: plain weights, checkpointed as such
    needed = sum(p.numel() * p.element_size() for p in module.parameters())
    for folder in (Path(trainer.default_root_dir), Path(tempfile.gettempdir())):
        try:
            if shutil.disk_usage(folder).free < needed + needed // 4:
                continue
            path = folder / f"llmp-trained-{os.getpid()}.ckpt"
            trainer.save_checkpoint(path, weights_only=True)  # the weights and llmp's entry, no optimizer
        except OSError:
            continue
        return f"the trained model was kept in {path}: free space, then {_export(path, output)}"
    return "and no other folder had room for the trained model: enable checkpointing to keep it"
