"""Output folders: checked before any work, written whole or not at all, never replacing what llmp did not write.

::

    parent/
      out/                      the output; holds `.llmp` (llmp's marker: the files it wrote)
      .out.lock                 held (flock) while a process writes `out`: a second writer is refused
      .out.tmp-HOST-PID-XXXX    the next `out`, being written; renamed into place when complete

Replacing an existing ``out`` swaps the two folders in one ``renameat2(RENAME_EXCHANGE)`` where
the system has it; elsewhere in two renames, and a crash between them leaves the old folder at
``.out.old-...``, which the next write to ``out`` puts back. Leftover temporaries of llmp's own
naming (a ``kill -9``) are removed by the next write to the same output, under its lock, unless
their writer still runs on this machine; names are matched literally (``p[1]`` is not a pattern).

What may be replaced at all is :mod:`llmp.outcheck`'s to decide, before any work.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from llmp.errors import LlmpError
from llmp.outcheck import MARKER, check_output_dir, no_space_message
from llmp.outlock import output_lock, real_path
from llmp.remote_code import strip_code

log = logging.getLogger(__name__)

# What this process has written completely, for "interrupted after writing ..." messages.
WRITTEN: list[Path] = []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _follow_umask(path: Path, mode: int) -> None:
    """``mkdtemp``/``mkstemp`` create 0700/0600 whatever the umask; give the modes any tool gives."""
    os.chmod(path, mode & ~_umask())


def follow_umask_tree(folder: Path) -> None:
    """``folder`` and everything in it get the modes the umask gives (safetensors writes 0600)."""
    _follow_umask(folder, 0o777)
    for path in folder.rglob("*"):
        _follow_umask(path, 0o777 if path.is_dir() else 0o666)


def _temp_prefix(output: Path, kind: str) -> str:
    return f".{output.name}.{kind}-{socket.gethostname()}-{os.getpid()}-"


def clean_stale(output: Path) -> None:
    """Remove what an interrupted write to ``output`` left (call it holding the output's lock).

    A ``.NAME.old-*`` is the previous output when a two-rename swap was cut between its renames:
    it is put back if ``output`` is missing.
    """
    parent = output.parent
    if not parent.is_dir():
        return
    name = glob.escape(output.name)  # `p[1].gguf` is a name, not a pattern matching `p1.gguf`
    for old in sorted(parent.glob(f".{name}.old-*")):
        if not output.exists():
            log.warning("restoring %s from %s (a previous write was interrupted mid-swap)", output, old)
            os.rename(old, output)
        else:
            shutil.rmtree(old, ignore_errors=True)
    own = (_temp_prefix(output, "tmp"), _temp_prefix(output, "old"))
    # This output's: left by a writer that held its lock, which is free now (one still alive on this machine is spared).
    stale = [t for t in parent.glob(f".{name}.tmp-*") if not t.name.startswith(own) and not _alive(t)]
    # Other outputs' temporaries in the same folder: only those of a process of this machine that has died.
    stale += [t for t in parent.glob(".*.tmp-*") if not t.name.startswith(f".{output.name}.tmp-") and _orphan(t)]
    for tmp in stale:
        log.info("removing %s, left by an interrupted write", tmp)
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _owner(tmp: Path) -> int | None:
    """The process id in ``tmp``'s name (``.NAME.tmp-HOST-PID-XXXX``) when HOST is this machine."""
    host, rest = socket.gethostname(), tmp.name.rpartition(".tmp-")[2]
    if not rest.startswith(f"{host}-"):
        return None
    pid = rest[len(host) + 1 :].partition("-")[0]
    return int(pid) if pid.isdigit() else None


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _orphan(tmp: Path) -> bool:
    """Whether ``tmp`` was left by a process of this machine that is gone."""
    pid = _owner(tmp)
    return pid is not None and not _running(pid)


def _alive(tmp: Path) -> bool:
    """Whether ``tmp``'s writer is a process of this machine still running."""
    pid = _owner(tmp)
    return pid is not None and _running(pid)


@contextlib.contextmanager
def temp_dir(output: str | Path) -> Iterator[Path]:
    """A scratch folder beside ``output``, named so that a later write removes it if a crash leaves it."""
    output = real_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output, "tmp")))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2``); ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _swap_into_place(tmp: Path, output: Path) -> None:
    if not output.exists():
        os.rename(tmp, output)
        return
    if _exchange(tmp, output):
        shutil.rmtree(tmp, ignore_errors=True)  # `tmp` holds the old output now
        return
    old = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output, "old")))
    os.rmdir(old)
    os.rename(output, old)
    try:
        os.rename(tmp, output)
    except BaseException as err:
        try:
            os.rename(old, output)
        except OSError:
            raise LlmpError(f"could not put the new {output} in place ({err}); the previous one is at {old}") from err
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def write_folder(
    output: str | Path, overwrite: bool = False, inputs: Iterable[str | Path] = (), own_code: Iterable[str] = ()
) -> Iterator[Path]:
    """A temporary folder to fill; on success it becomes ``output`` whole, with llmp's marker, and
    naming no Python code but llmp's own modules ``own_code`` (:func:`llmp.remote_code.strip_code`).

    Example::

        with write_folder("out/pruned") as tmp:
            model.save_pretrained(tmp)

    Raises:
        LlmpError: see :func:`check_output_dir`; another process is writing ``output``.
    """
    output = check_output_dir(output, overwrite, inputs)
    with output_lock(output):
        clean_stale(output)  # first: it may put back an output a crash left aside
        output = check_output_dir(output, overwrite, inputs)  # again, under the lock
        tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=_temp_prefix(output, "tmp")))
        _follow_umask(tmp, 0o777)
        try:
            yield tmp
            dropped = strip_code(tmp, own_code)
            if dropped:
                log.warning("%s: left out what names code llmp did not write: %s", output, ", ".join(dropped))
            follow_umask_tree(tmp)
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if not p.is_dir())
            write_json_atomic(tmp / MARKER, {"written_by": "llmp", "files": files}, record=False)
            _fsync_tree(tmp)
            _swap_into_place(tmp, output)
            _fsync(output.parent)
        except BaseException as err:
            full = _filled(output.parent, err)
            shutil.rmtree(tmp, ignore_errors=True)
            if full:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output)) from err
            raise
    WRITTEN.append(output)


@contextlib.contextmanager
def write_file(output: str | Path) -> Iterator[Path]:
    """A temporary file beside ``output`` to write; on success it is fsynced and renamed into place
    (a large file, written by another library, that :func:`write_atomic` cannot take as bytes).
    Hold ``output``'s :func:`output_lock` around it; a crash leaves a temporary that the next write removes."""
    output = real_path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(output)
    fd, tmp = tempfile.mkstemp(dir=output.parent, prefix=_temp_prefix(output, "tmp"))
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(Path(tmp))
        _follow_umask(Path(tmp), 0o666)
        os.replace(tmp, output)
        _fsync(output.parent)
    except BaseException as err:
        full = _filled(output.parent, err)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(output)) from err
        raise
    WRITTEN.append(output)


def _filled(folder: Path, err: BaseException) -> bool:
    """Whether a write into ``folder`` failed because its file system is full, however the library
    said it (safetensors in words, gguf as a short write: "9216 requested and 744 written")."""
    if not isinstance(err, Exception) or isinstance(err, LlmpError):
        return False
    if no_space_message(err) is not None:
        return True
    try:
        return shutil.disk_usage(folder).free < 64 << 10
    except OSError:
        return False


def write_atomic(path: str | Path, data: str | bytes, record: bool = True) -> None:
    """Write a file beside ``path``, fsync it and rename it into place."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        _follow_umask(Path(tmp), 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if record:
        WRITTEN.append(path)


def write_json_atomic(path: str | Path, data: Any, record: bool = True) -> None:
    """Write JSON beside ``path`` and rename it into place."""
    write_atomic(path, json.dumps(data, indent=2) + "\n", record)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a SLURM pre-emption, ``kill``) raises ``KeyboardInterrupt`` like Ctrl-C, so a write in
    progress removes its temporary folder (a no-op outside the main thread, where signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def written_summary(since: int = 0) -> str:
    """What this process wrote completely (from ``WRITTEN[since]`` on), in words, for an interruption message."""
    done = WRITTEN[since:]
    if not done:
        return "nothing was written"
    return "written completely: " + ", ".join(str(p) for p in dict.fromkeys(done))


def run_command(work: Callable[[], int]) -> int:
    """A command's exit status: ``work()``'s, 2 with one ``error: ...`` line for an
    :class:`LlmpError`, 130 with what was written completely for Ctrl-C or SIGTERM."""
    written = len(WRITTEN)
    try:
        with sigterm_as_interrupt():
            return work()
    except LlmpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {written_summary(since=written)}", file=sys.stderr)
        return 130
    except Exception as err:
        message = no_space_message(err)
        if message is None:
            raise
        print(f"error: {message}; {written_summary(since=written)}", file=sys.stderr)
        return 2
