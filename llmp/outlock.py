"""One writer per output: ``.out.lock`` beside the output, held with ``flock`` while a process
writes ``out``; a second writer is refused at once, naming the lock. Re-entrant in one process
(the CLI takes it before loading the model, :func:`llmp.outdir.write_folder` again)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from llmp.errors import LlmpError

_HELD: dict[Path, tuple[int, int]] = {}  # lock path → (fd, depth): re-entrant within a process


def real_path(path: str | Path) -> Path:
    """``path`` absolute, with symlinks resolved (a link to a folder names that folder)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _lock_path(output: Path) -> Path:
    return output.with_name(f".{output.name}.lock")


@contextlib.contextmanager
def output_lock(output: str | Path) -> Iterator[None]:
    """Hold ``output``'s lock: one writer at a time; a second process gets a clear error at once.

    Re-entrant in one process (the CLI takes it before loading the model, :func:`write_folder` again).

    Raises:
        LlmpError: another process is writing ``output``.
    """
    output = real_path(output)
    lock = _lock_path(output)
    if lock in _HELD:
        fd, depth = _HELD[lock]
        _HELD[lock] = (fd, depth + 1)
        try:
            yield
        finally:
            _HELD[lock] = (fd, _HELD[lock][1] - 1)
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EAGAIN, errno.EACCES):
                raise LlmpError(
                    f"another llmp process is writing {output} (it holds {lock}); wait for it to finish "
                    "or choose another output"
                ) from None
            raise
        # The holder before us may have removed the file after we opened it: lock the file that is there.
        if os.path.exists(lock) and os.stat(lock).st_ino == os.fstat(fd).st_ino:
            break
        os.close(fd)
    _HELD[lock] = (fd, 1)
    try:
        yield
    finally:
        if _HELD.pop(lock)[1] == 1:
            with contextlib.suppress(OSError):
                os.unlink(lock)
            os.close(fd)
