"""The data flow of DESIGN.md §1 in imports: no stage imports one that comes after it."""

import ast
from pathlib import Path

import pytest

LLMP = Path(__file__).resolve().parent.parent / "llmp"
# Each stage may import the ones before it, never those after (errors/outdir are shared helpers).
STAGES = [
    ("llmp.structure", ["llmp.importance", "llmp.plan", "llmp.surgery", "llmp.verify", "llmp.pruner", "llmp.io"]),
    ("llmp.importance", ["llmp.plan", "llmp.surgery", "llmp.verify", "llmp.pruner", "llmp.recovery"]),
    ("llmp.plan", ["llmp.surgery", "llmp.verify", "llmp.pruner", "llmp.io", "llmp.recovery"]),
    ("llmp.surgery", ["llmp.verify", "llmp.pruner", "llmp.io", "llmp.recovery"]),
]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


@pytest.mark.parametrize(("stage", "later"), STAGES, ids=[s for s, _ in STAGES])
def test_no_stage_imports_a_later_one(stage, later):
    root = LLMP / Path(*stage.split(".")[1:])
    files = sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]
    wrong = {
        f"{path.relative_to(LLMP.parent)} imports {name}"
        for path in files
        for name in imports(path)
        if any(name == m or name.startswith(m + ".") for m in later)
    }
    assert not wrong, sorted(wrong)
