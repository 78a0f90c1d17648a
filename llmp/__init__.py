"""llmp: structured pruning of large language models, with recovery training on Lightning."""

from llmp import _layout
from llmp.errors import LlmpError
from llmp.io import load_pruned, save_pruned
from llmp.models import load_model
from llmp.pruning import PruneConfig, prune

__all__ = ["LlmpError", "PruneConfig", "RecoveryModule", "load_model", "load_pruned", "prune", "save_pruned"]
__version__ = "0.1.0"

_layout.install()


def __getattr__(name: str):
    # Lightning is imported only by those who train: `import llmp` stays quick for pruning.
    if name == "RecoveryModule":
        from llmp.recovery import RecoveryModule

        return RecoveryModule
    raise AttributeError(f"module 'llmp' has no attribute {name!r}")
