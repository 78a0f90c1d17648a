"""Data: calibration samples, evaluation text, recovery data (instructions, general text, mixtures)."""

from llmp.data.recovery import InstructionData, RecoveryData
from llmp.data.text import calibration_samples, read_text

__all__ = ["InstructionData", "RecoveryData", "calibration_samples", "read_text"]
