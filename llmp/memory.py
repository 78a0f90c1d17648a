"""Where freed memory goes: glibc's mmap threshold for the process, and a lower one for the
calibration forward pass.

glibc serves an allocation of at least ``M_MMAP_THRESHOLD`` bytes with its own mapping, returned
to the system when freed; smaller ones come from the heap, whose freed fragments stay resident
until the heap's top is free. Both matter when pruning:

- ``llmp prune`` sets the threshold to 4 MiB for the whole run (:func:`return_freed_memory`):
  with glibc's own rising threshold the heap's fragments kept the 1.1B shape's peak 0.1-0.4× its
  weights higher.
- During the calibration forward pass the decoder layers' outputs, kept for the backward, sit
  between the freed activations of each layer and pinned about 13 MB of free heap per SmolLM2
  layer (0.26 GB in all, measured with ``mallinfo2``). Under a 256 KiB threshold for that pass
  (:data:`FORWARD_THRESHOLD`) the peak stayed at 1.10 GiB instead of 1.36, for about 0.2 s of
  page faults.
- The backward takes everything from the heap (:data:`BACKWARD_THRESHOLD`), which saves the
  page faults of a fresh mapping per tensor over 4 MiB, and the heap's free pages go back
  afterwards (:func:`release_free_heap`). On the 1.1B shape's paper run (10 × 64 tokens) that
  took 26.5–29.4 s at 1.21–1.22× the weights, against 32.8–34.0 s at 1.17× with the process's
  threshold. The price is the heap's fragments on bigger batches: the default Taylor run
  (16 × 128 tokens) peaked at 1.38× (91.6 s). Bounding them (``malloc_trim`` whenever 5% of
  the weights' bytes, or 64 MiB, lay free) brought that to 1.30× (93.7 s) but cost SmolLM2's
  paper run 0.8 s of 4.5, so it was not kept.

Both are no-ops where libc is not glibc, and the second is one only in a process that called the
first (a library user's allocator is left as it is).
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

    By default glibc raises that threshold up to 32 MiB as large blocks are freed; the blocks
    below it then come from the heap, whose fragments kept the peak of pruning a 1.1B model
    0.1-0.4x its weights' size higher (``bench/prune.py``). A no-op where libc is not glibc.
    """
    global _process_threshold
    if _mallopt(_M_MMAP_THRESHOLD, threshold):
        _process_threshold = threshold


FORWARD_THRESHOLD = 256 << 10
"""The mmap threshold of the calibration forward pass (see the module docstring)."""
BACKWARD_THRESHOLD = 1 << 30
"""The mmap threshold of the calibration backward pass: everything from the heap, no page faults."""


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
