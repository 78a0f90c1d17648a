"""Data shipped inside llmp (see ``llmp/resources/README.md``), addressed by short names."""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent.parent / "resources"
BUILTIN_DATA = {
    "c4": _DIR / "c4_en_train00000_first120.jsonl",
    "wikitext2": _DIR / "wikitext2_test_head.txt",
    "alpaca-1k": _DIR / "alpaca_cleaned_first1000.jsonl",
}


def resolve(source: str | Path) -> str:
    """A built-in data name → its file; anything else unchanged."""
    return str(BUILTIN_DATA.get(str(source), source))
