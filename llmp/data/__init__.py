"""Data: calibration samples, evaluation text, recovery data (instructions, general text, mixtures)."""

from llmp.data.text import calibration_samples, read_text

__all__ = ["InstructionData", "RecoveryData", "calibration_samples", "read_text"]


def __getattr__(name: str):
    # The datamodules import Lightning: only those who train pay for it (`llmp prune` reads text here).
    if name in ("InstructionData", "RecoveryData"):
        from llmp.data import recovery

        return getattr(recovery, name)
    raise AttributeError(f"module 'llmp.data' has no attribute {name!r}")
