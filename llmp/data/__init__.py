"""Data: calibration samples, evaluation text, instruction data."""

from llmp.data.text import calibration_samples, read_text

__all__ = ["calibration_samples", "read_text"]
