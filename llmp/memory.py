"""Where freed memory goes: glibc's mmap threshold for the process, and others around the
calibration passes.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own mapping, given back
to the system when freed; smaller ones come from the heap, whose freed fragments stay resident
until the heap's top is free. The policy, switched on in one place (the commands call
:func:`return_freed_memory`):

- the process: a fixed 4 MiB threshold, so that a freed activation or a sliced-away weight goes
  back at once (glibc's own threshold rises as large blocks are freed, and the heap's fragments
  then hold the peak up);
- the calibration forward and backward: the thresholds of
  :class:`llmp.importance.ScoringSettings`, set by :func:`mmap_threshold` around each pass, and the
  heap's free pages given back after the backward (:func:`release_free_heap`).

A library user who never called :func:`return_freed_memory` keeps their allocator as it is: the
other two are then no-ops, as all three are where libc is not glibc. The measurements behind the
thresholds are in ``docs/benchmarks/pruning.md``.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3
_process_threshold: int | None = None


def _mallopt(option: int, value: int) -> bool:
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(option, value))
    except (OSError, AttributeError):
        return False


def return_freed_memory(threshold: int = 4 << 20) -> None:
    """Have glibc serve every allocation of ``threshold`` bytes or more with its own mapping, so
    that a freed activation or sliced-away weight goes back to the system at once.

    By default glibc raises that threshold up to 32 MiB as large blocks are freed, and the blocks
    below it then come from the heap, whose fragments hold the peak up. A no-op where libc is not glibc.
    """
    global _process_threshold
    if _mallopt(_M_MMAP_THRESHOLD, threshold):
        _process_threshold = threshold


@contextmanager
def mmap_threshold(threshold: int) -> Iterator[None]:
    """Set glibc's mmap threshold to ``threshold`` inside the block, and the process's one again
    after it, where :func:`return_freed_memory` set one for the process (otherwise a no-op)."""
    previous = _process_threshold
    if previous is None or not _mallopt(_M_MMAP_THRESHOLD, threshold):
        yield
        return
    try:
        yield
    finally:
        _mallopt(_M_MMAP_THRESHOLD, previous)


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (``malloc_trim``), where
    :func:`return_freed_memory` was called; after a backward that took its memory from the heap."""
    if _process_threshold is None:
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
