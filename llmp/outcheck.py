"""Whether an output may be written, decided before any work: what llmp wrote, what it may replace.

``--overwrite`` replaces only a folder llmp wrote: one with the marker ``.llmp`` (the files it
wrote), holding no other file but those llmp adds later; or a folder of an older llmp (no marker,
a ``pruning_report.json``) holding nothing but the files such a folder held. An output that is,
contains or lies inside an input (the model being pruned, its data) is always refused, and so is a
mount point (the output is built beside it and swapped into place, which cannot cross file systems).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from llmp.errors import LlmpError
from llmp.outlock import real_path

MARKER = ".llmp"
# Files llmp adds to a folder it wrote, after the model itself (`llmp report`, `llmp fit`, `llmp eval tasks`).
LATER_FILES = ("report.md", "report.png", "recipe.yaml", "tasks*.json", "pruning_report.json")
# What a model folder of an llmp from before the marker held: a folder without the marker may be
# replaced only when it holds nothing else (a user's notes beside a copied report are theirs).
UNMARKED_FILES = (
    *LATER_FILES,
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)


def is_llmp_folder(folder: Path) -> bool:
    return (folder / MARKER).is_file() or (folder / "pruning_report.json").is_file()


def foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` that llmp did not write: by its marker's list plus the files llmp adds
    later; in a folder without the marker (an older llmp's), every file but those llmp writes."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir()}
    try:
        written = set(json.loads((folder / MARKER).read_text())["files"])
        allowed = (*LATER_FILES, ".*.tmp-*")
    except (OSError, ValueError, KeyError, TypeError):
        written, allowed = set(), UNMARKED_FILES
    return sorted(
        name
        for name in found - written - {MARKER}
        if "/" in name or not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed)
    )


def mount_point(path: Path) -> bool:
    """Whether ``path`` exists on another file system than its parent (a mount, a container's volume)."""
    try:
        return path.exists() and (os.path.ismount(path) or path.stat().st_dev != path.parent.stat().st_dev)
    except OSError:
        return False


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_dir(
    output: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (), flag: str = "output"
) -> Path:
    """Refuse, before any work, an output that cannot or may not be written; return its real path.

    Args:
        output: the folder to write.
        overwrite: replace an existing folder llmp wrote.
        inputs: paths the run reads (model folder or file, data files); the output may not be,
            contain or lie inside any of them.
        flag: the argument's name in messages (``--output`` on the command line).

    Raises:
        LlmpError: the output is a file, the current folder, overlaps an input, is not empty
            without ``overwrite``, holds files llmp did not write, or its parent is not writable.
    """
    given, output = output, check_output_path(output, inputs, flag)
    cwd = real_path(".")
    if output == cwd or output in cwd.parents:
        raise LlmpError(
            f"`{flag}` {given} is the current folder or holds it; llmp writes the output as a whole "
            "folder: give a new folder's path, e.g. out/pruned"
        )
    if output.exists() and not output.is_dir():
        raise LlmpError(f"`{flag}` {given} exists and is not a folder; choose another path")
    if mount_point(output):
        raise LlmpError(
            f"`{flag}` {given} is a mount point: llmp builds the output beside it and swaps it into place, "
            f"which cannot cross file systems; give a new folder inside it, e.g. {Path(given) / 'pruned'}"
        )
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise LlmpError(f"`{flag}` folder {given} is not empty; choose another path or pass --overwrite")
        if not is_llmp_folder(output):
            raise LlmpError(
                f"`{flag}` folder {given} was not written by llmp (no {MARKER} marker or pruning_report.json), "
                "so --overwrite will not replace it: choose another path, or empty it yourself"
            )
        foreign = foreign_files(output)
        if foreign:
            raise LlmpError(
                f"`{flag}` folder {given} holds files llmp did not write ({', '.join(foreign[:5])}), so "
                "--overwrite will not replace it: move them out or choose another path"
            )
    return output


def check_output_path(output: str | Path, inputs: Iterable[str | Path] = (), flag: str = "output") -> Path:
    """What every output (a folder or a file) must be, before any work; returns its real path.

    Raises:
        LlmpError: a symlink to nothing or a loop, a path that overlaps an input, or a nearest
            existing parent that is a file or not writable.
    """
    link = Path(output).expanduser()
    if link.is_symlink() and not link.exists():
        raise LlmpError(f"`{flag}` {output} is a symlink to nothing (or a loop); remove it or give another path")
    path = real_path(output)
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        source_real = real_path(source)
        if _overlaps(path, source_real):
            raise LlmpError(
                f"`{flag}` {output} overlaps the input {source} ({source_real}): writing it would replace "
                "what the run reads; choose an output outside it"
            )
    parent = _nearest_existing(path.parent)
    if not parent.is_dir():
        raise LlmpError(f"`{flag}` {output}: {parent} is a file, not a folder; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LlmpError(f"`{flag}` {output}: the folder {parent} is not writable; choose another path")
    return path


def weights_bytes(paths: Iterable[str | Path]) -> int:
    """Bytes of the ``*.safetensors`` / ``*.gguf`` weights at ``paths`` (folders or files; 0 for none)."""
    total = 0
    for path in map(Path, paths):
        files = [path] if path.is_file() else [*path.glob("*.safetensors"), *path.glob("*.gguf")]
        total += sum(f.stat().st_size for f in files if f.is_file())
    return total


def check_space(output: str | Path, needed: int, flag: str = "output") -> None:
    """Refuse, before the work, an output whose file system lacks ``needed`` bytes (an estimate of
    what the run writes there, with an eighth to spare for the tokenizer, config and rounding).

    Raises:
        LlmpError: naming the file system's folder, what is free and what is needed.
    """
    if needed <= 0:
        return
    parent = _nearest_existing(real_path(output))
    free = free_bytes(parent)
    wanted = needed + needed // 8
    if free < wanted:
        raise LlmpError(
            f"`{flag}` {output}: the file system of {parent} has {_size(free)} free and this run writes about "
            f"{_size(wanted)} there; free space or choose another path"
        )


def no_space_message(err: BaseException) -> str | None:
    """One line for a write that ran out of space (``ENOSPC``, however a library wrapped it), else ``None``."""
    text = str(err)
    if (
        getattr(err, "errno", None) != errno.ENOSPC
        and "No space left on device" not in text
        and "os error 28" not in text
    ):
        return None
    where = getattr(err, "filename", None)
    place = Path(where).parent if where else None
    free = f" ({_size(shutil.disk_usage(place).free)} free)" if place is not None and place.exists() else ""
    return (
        f"no space left on the device{f' of {place}' if place else ''}{free} while writing"
        f"{f' {Path(where).name}' if where else ''}: nothing partial was kept; free space or choose another output"
    )


def free_bytes(path: str | Path) -> int:
    """Free bytes of the file system that ``path`` is on, or would be created on."""
    return shutil.disk_usage(_nearest_existing(real_path(path))).free


def _nearest_existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists (where a write would create the rest)."""
    while not path.exists():
        path = path.parent
    return path


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
