"""The data flow of DESIGN.md §1 in imports: no stage imports one that comes after it, and no
chain of imports, at module level or inside a function, leads from a module back to itself."""

import ast
import re
from pathlib import Path

import pytest

LLMP = Path(__file__).resolve().parent.parent / "llmp"
# Each stage may import the ones before it, never those after (errors/outdir are shared helpers).
STAGES = [
    ("llmp.structure", ["llmp.importance", "llmp.plan", "llmp.surgery", "llmp.verify", "llmp.pruning", "llmp.io"]),
    ("llmp.importance", ["llmp.plan", "llmp.surgery", "llmp.verify", "llmp.pruning", "llmp.recovery"]),
    ("llmp.plan", ["llmp.surgery", "llmp.verify", "llmp.pruning", "llmp.io", "llmp.recovery"]),
    ("llmp.surgery", ["llmp.verify", "llmp.pruning", "llmp.io", "llmp.recovery"]),
    ("llmp.pruning", ["llmp.recovery", "llmp.fit", "llmp.cli", "llmp.export", "llmp.eval", "llmp.report"]),
    # Allocation sits between planning and the drivers that apply it: it calls layers, not drivers.
    (
        "llmp.allocation",
        ["llmp.pruning.oneshot", "llmp.pruning.layerwise", "llmp.pruning.streamed", "llmp.recovery", "llmp.io"],
    ),
    # The record of a run is plain data: it knows none of the stages that fill it.
    ("llmp.record", ["llmp.structure", "llmp.importance", "llmp.plan", "llmp.surgery", "llmp.pruning", "llmp.io"]),
    ("llmp.report", ["llmp.recovery", "llmp.fit", "llmp.cli"]),
    # Shared facts of engines and files: below every stage that reads them.
    ("llmp.targets", ["llmp.pruning", "llmp.io", "llmp.export"]),
    ("llmp.tensorfile", ["llmp.io", "llmp.pruning", "llmp.export"]),
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
    """The llmp modules a file imports, wherever the import stands (module level or in a function:
    a cycle through a deferred import is a cycle of concepts all the same)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
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


def _graph() -> dict[str, set[str]]:
    """Module → the llmp modules it imports (a package's ``__init__`` is the package's name; a
    name imported from a package that is not a module of it counts as the package)."""
    graph = {}
    for path in LLMP.rglob("*.py"):
        parts = path.relative_to(LLMP.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = {m for m in module_imports(path) if _module_path(m) and m != name}
    return graph


def test_no_import_cycle():
    """No chain of imports leads from a module back to itself."""
    graph = _graph()
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


def test_imports_inside_functions_are_seen(tmp_path):
    """The reader finds an import inside a function, where a module-level reader would not."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from llmp.pruning import steps\n    import llmp.io\n")
    assert module_imports(source) == {"llmp.pruning.steps", "llmp.io"}


def test_the_package_patches_nothing_at_run_time():
    """No `unittest.mock` in the package: settings are passed down, not patched in."""
    files = [*LLMP.rglob("*.py"), *(LLMP.parent / "callbacks").rglob("*.py")]
    patching = sorted(str(p.relative_to(LLMP.parent)) for p in files if "unittest" in imports(p))
    assert not any(name.startswith("unittest") for p in files for name in imports(p)), patching


def test_no_machine_local_paths_and_a_short_readme():
    """No absolute path of a particular machine in the repository's code, scripts and pages, and
    the README a user's page of at most 300 lines."""
    root = LLMP.parent
    suffixes = {".py", ".md", ".sh", ".yaml", ".toml", ".cfg", ".patch"}
    files = [p for p in root.rglob("*") if p.suffix in suffixes and p.is_file()]
    skip = ("/.venv/", "/llmp/resources/", "/.git/", "/out/", "/bench/work/")
    files = [p for p in files if not any(s in f"/{p.relative_to(root)}".replace("\\", "/") for s in skip)]
    local = re.compile(r"(?<![\w.~$])/(?:work|root|home)/\w")
    found = sorted(str(p.relative_to(root)) for p in files if local.search(p.read_text(errors="ignore")))
    assert not found, found
    assert len((root / "README.md").read_text().splitlines()) <= 300


def test_modules_and_functions_stay_small():
    """A concept per module: no module over 400 lines, no function over 60."""
    files = [*LLMP.rglob("*.py"), *(LLMP.parent / "callbacks").rglob("*.py")]
    big = [f"{p.relative_to(LLMP.parent)} ({n})" for p in files if (n := len(p.read_text().splitlines())) > 400]
    long = [
        f"{p.relative_to(LLMP.parent)}:{node.name} ({node.end_lineno - node.lineno + 1})"
        for p in files
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > 60
    ]
    assert not big and not long, big + long


def test_heavy_optional_packages_load_only_when_used():
    """What the GPU check's minimal environment lacks (datasets, lm-eval, DeepSpeed, llama.cpp,
    gguf; bench/gpu_wheels.sh) is not imported by importing llmp's commands, its module or callback."""
    import subprocess
    import sys

    code = (
        "import sys, llmp, llmp.fit, llmp.cli, llmp.recovery, llmp.callbacks, llmp.pruning, llmp.export\n"
        "print(','.join(m for m in ('datasets', 'lm_eval', 'deepspeed', 'llama_cpp', 'gguf', 'pyarrow') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "", done.stdout
