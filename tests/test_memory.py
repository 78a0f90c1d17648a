"""The mmap-threshold policy: the process's threshold from the commands, others only around the
calibration passes, and nothing at all for a library user who set none."""

from __future__ import annotations

import pytest

from llmp import memory
from llmp.importance import ScoringSettings

SETTINGS = ScoringSettings()


@pytest.fixture
def calls(monkeypatch):
    made = []
    monkeypatch.setattr(memory, "_mallopt", lambda option, value: made.append((option, value)) or True)
    monkeypatch.setattr(memory, "_process_threshold", None)
    return made


def test_a_library_users_allocator_is_left_alone(calls, monkeypatch):
    trimmed = []
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: trimmed.append(name))
    with memory.mmap_threshold(SETTINGS.forward_mmap_threshold):
        pass
    memory.release_free_heap()
    assert calls == [] and trimmed == []


def test_a_pass_sets_then_restores_the_process_threshold(calls):
    memory.return_freed_memory(4 << 20)
    with pytest.raises(KeyError), memory.mmap_threshold(SETTINGS.backward_mmap_threshold):
        assert calls[-1] == (memory._M_MMAP_THRESHOLD, SETTINGS.backward_mmap_threshold)
        raise KeyError  # restored on the way out of an error too
    assert calls == [
        (memory._M_MMAP_THRESHOLD, 4 << 20),
        (memory._M_MMAP_THRESHOLD, SETTINGS.backward_mmap_threshold),
        (memory._M_MMAP_THRESHOLD, 4 << 20),
    ]
