"""Lightning callbacks of llmp, installed as ``llmp.callbacks``."""

from llmp.callbacks.pruning import StructuredPruning

__all__ = ["StructuredPruning"]
