"""Whether a model folder's own Python code may run: never unless the user asks.

``llmp --trust-remote-code`` sets :data:`TRUST_ENV`, so that every process of a run (a ``fit``
under ``fabric run`` included) reads the same answer.
"""

from __future__ import annotations

import os
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
        f"{where} needs its own Python code to load (config.json `auto_map`), and llmp runs no code from "
        "model files unless asked: read that code, then pass --trust-remote-code (or set "
        f"{TRUST_ENV}=1; in Python `trust_remote_code=True`)"
    )
