"""Map ``llmp.callbacks`` to the top-level ``callbacks/`` folder in a source checkout.

An installed wheel has the folder at ``llmp/callbacks`` (``package_dir`` in setup.cfg); an
editable install or a bare checkout does not, so this finder resolves that one name, lazily.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_SOURCE = Path(__file__).resolve().parent.parent / "callbacks"


class _CallbacksFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "llmp.callbacks":
            return None
        return importlib.util.spec_from_file_location(
            fullname, _SOURCE / "__init__.py", submodule_search_locations=[str(_SOURCE)]
        )


def install() -> None:
    packaged = Path(__file__).resolve().parent / "callbacks"
    if not packaged.is_dir() and (_SOURCE / "__init__.py").is_file():
        if not any(isinstance(f, _CallbacksFinder) for f in sys.meta_path):
            sys.meta_path.append(_CallbacksFinder())
