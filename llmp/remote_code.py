"""Whether a model folder's own Python code may run: never unless the user asks.

``llmp --trust-remote-code`` sets :data:`TRUST_ENV`, so that every process of a run (a ``fit``
under ``fabric run`` included) reads the same answer.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from llmp.errors import LlmpError

TRUST_ENV = "LLMP_TRUST_REMOTE_CODE"


def allow_remote_code(value: bool | None = None) -> bool:
    """Whether a model folder's own Python code (``auto_map`` in config.json) may run: never unless asked.

    ``None`` reads ``LLMP_TRUST_REMOTE_CODE=1`` (what ``llmp --trust-remote-code`` sets, so that
    ``llmp fit`` and every launched rank see it too).
    """
    return os.environ.get(TRUST_ENV) == "1" if value is None else value


def remote_code_error(where: str | Path, err: Exception) -> LlmpError | None:
    """The clear error for a model that needs its own code when that is not allowed, else ``None``."""
    if "trust_remote_code" not in str(err):
        return None
    return LlmpError(
        f"{where} needs its own Python code to load ({_naming_code(where)} `auto_map`), and llmp runs no code from "
        "model files unless asked: read that code, then pass --trust-remote-code (or set "
        f"{TRUST_ENV}=1; in Python `trust_remote_code=True`)"
    )


def _naming_code(where: str | Path) -> str:
    """Which of the folder's configs names the code (``config.json`` when it cannot be told)."""
    for name in ("config.json", "tokenizer_config.json"):
        try:
            if "auto_map" in json.loads((Path(where).expanduser() / name).read_text()):
                return name
        except (OSError, ValueError, TypeError):
            continue
    return "config.json"


CODE_KEYS = ("auto_map", "custom_pipelines")  # where transformers' configs name Python modules to import


def strip_code(folder: Path, own: Iterable[str] = ()) -> list[str]:
    """Make ``folder`` (an output being written) name and hold no Python code but llmp's own
    modules ``own`` (``configuration_decilm``): a tokenizer saved from a folder whose
    ``tokenizer_config.json`` has an ``auto_map`` keeps it, and ``--trust-remote-code`` would then
    import (or fetch from the hub) code that llmp never wrote.

    Every ``*config.json`` loses the ``auto_map`` / ``custom_pipelines`` entries naming another
    module; ``*.py`` files other than ``own`` go. Returns what was removed.
    """
    own = set(own)
    removed = []
    for path in sorted(folder.glob("*.py")):
        if path.stem not in own:
            path.unlink()
            removed.append(path.name)
    for path in sorted(folder.glob("*config.json")):
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not any(key in data for key in CODE_KEYS):
            continue
        kept = {k: v for k, v in (data.get("auto_map") or {}).items() if _modules(v) <= own}
        cleaned = {k: v for k, v in data.items() if k not in CODE_KEYS}
        if kept:
            cleaned["auto_map"] = kept
        if cleaned != data:
            path.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n")
            removed.append(f"{path.name} `auto_map`")
    return removed


def _modules(entry) -> set[str]:
    """The modules an ``auto_map`` entry names (``"mod.Class"``, ``"repo--mod.Class"`` or a list of them)."""
    names = entry if isinstance(entry, list) else [entry]
    return {str(name).rpartition(".")[0] for name in names if name}
