"""The mmap-threshold policy: the process's threshold from the commands, a lower one only around
the calibration forward pass, and nothing at all for a library user who set none."""

from __future__ import annotations

import pytest

from llmp import memory


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(memory, "_mallopt", lambda option, value: made.append((option, value)) or True)
    monkeypatch.setattr(memory, "_process_threshold", None)
    return made


def test_forward_threshold_leaves_a_library_users_allocator_alone(calls):
    with memory.forward_threshold():
        pass
    assert calls == []


def test_forward_threshold_lowers_then_restores_the_process_threshold(calls):
    memory.return_freed_memory(4 << 20)
    with pytest.raises(KeyError), memory.forward_threshold():
        assert calls[-1] == (memory._M_MMAP_THRESHOLD, memory.FORWARD_THRESHOLD)
        raise KeyError  # restored on the way out of an error too
    assert calls == [
        (memory._M_MMAP_THRESHOLD, 4 << 20),
        (memory._M_MMAP_THRESHOLD, memory.FORWARD_THRESHOLD),
        (memory._M_MMAP_THRESHOLD, 4 << 20),
    ]


def test_glibc_accepts_the_thresholds():
    """On this (glibc) machine the real calls succeed; elsewhere they are skipped as no-ops."""
    if not memory._mallopt(memory._M_MMAP_THRESHOLD, 4 << 20):
        pytest.skip("libc is not glibc")
    assert memory._mallopt(memory._M_MMAP_THRESHOLD, memory.FORWARD_THRESHOLD)
    assert memory._mallopt(memory._M_MMAP_THRESHOLD, 4 << 20)
