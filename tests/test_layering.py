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
    # The record of a run is plain data: it knows none of the stages that fill it.
    ("llmp.record", ["llmp.structure", "llmp.importance", "llmp.plan", "llmp.surgery", "llmp.pruner", "llmp.io"]),
    ("llmp.report", ["llmp.recovery", "llmp.fit", "llmp.cli"]),
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


def module_imports(path: Path) -> set[str]:
    """The llmp modules a file imports when it is imported (module level, not inside functions)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmp"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if _module_path(sub) else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("llmp"))
    return found


def _module_path(name: str) -> Path | None:
    base = LLMP.parent / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def test_no_import_cycle():
    """No chain of module-level imports leads from a module back to itself."""
    graph = {}
    for path in LLMP.rglob("*.py"):
        parts = path.relative_to(LLMP.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in module_imports(path) if _module_path(m)}
    state: dict[str, int] = {}  # 1 on the stack, 2 done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
