"""The mmap-threshold policy: the process's threshold from the commands, others only around the
calibration passes, and nothing at all for a library user who set none."""

from __future__ import annotations

import pytest

from llmp import memory


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(memory, "_mallopt", lambda option, value: made.append((option, value)) or True)
    monkeypatch.setattr(memory, "_process_threshold", None)
    return made


def test_a_library_users_allocator_is_left_alone(calls, monkeypatch):
    trimmed = []
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: trimmed.append(name))
    with memory.mmap_threshold(memory.FORWARD_THRESHOLD):
        pass
    memory.release_free_heap()
    assert calls == [] and trimmed == []


def test_a_pass_sets_then_restores_the_process_threshold(calls):
    memory.return_freed_memory(4 << 20)
    with pytest.raises(KeyError), memory.mmap_threshold(memory.BACKWARD_THRESHOLD):
        assert calls[-1] == (memory._M_MMAP_THRESHOLD, memory.BACKWARD_THRESHOLD)
        raise KeyError  # restored on the way out of an error too
    assert calls == [
        (memory._M_MMAP_THRESHOLD, 4 << 20),
        (memory._M_MMAP_THRESHOLD, memory.BACKWARD_THRESHOLD),
        (memory._M_MMAP_THRESHOLD, 4 << 20),
    ]


def test_glibc_accepts_the_thresholds():
    """On this (glibc) machine the real calls succeed; elsewhere they are skipped as no-ops."""
    if not memory._mallopt(memory._M_MMAP_THRESHOLD, 4 << 20):
        pytest.skip("libc is not glibc")
    for threshold in (memory.FORWARD_THRESHOLD, memory.BACKWARD_THRESHOLD, 4 << 20):
        assert memory._mallopt(memory._M_MMAP_THRESHOLD, threshold)
