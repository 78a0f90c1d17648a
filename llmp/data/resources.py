"""Data shipped inside llmp (see ``llmp/resources/README.md``), addressed by short names."""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent.parent / "resources"
BUILTIN_DATA = {
    "c4": _DIR / "c4_en_train00000_first120.jsonl",
    "wikitext2": _DIR / "wikitext2_test_head.txt",
    "alpaca-1k": _DIR / "alpaca_cleaned_first1000.jsonl",
    # C4 documents 121-600 of the same shard: general text for recovery, apart from the calibration ones
    "c4-train": _DIR / "c4_en_train00000_docs121-600.jsonl",
}


def resolve(source: str | Path) -> str:
    """A built-in data name → its file; anything else unchanged."""
    return str(BUILTIN_DATA.get(str(source), source))
