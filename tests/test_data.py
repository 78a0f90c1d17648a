"""Text sources and calibration samples (`llmp.data.text`)."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from llmp.data.resources import BUILTIN_DATA
from llmp.data.text import calibration_samples, read_documents
from llmp.errors import LlmpError


@pytest.mark.parametrize("name", ["c4", "wikitext2"])
def test_builtin_names_read_the_shipped_files(name):
    """`calibration_samples("c4", ...)` as the README shows: no hub access for a built-in name."""
    docs = read_documents(name)
    assert docs == read_documents(BUILTIN_DATA[name]) and sum(map(len, docs)) > 10_000


def test_calibration_samples_from_a_builtin_name(tiny_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    samples = calibration_samples("c4", tokenizer, num_samples=4, seq_len=32, seed=1)
    assert samples.shape == (4, 32)
    assert samples.equal(calibration_samples("c4", tokenizer, num_samples=4, seq_len=32, seed=1))
    assert not samples.equal(calibration_samples("c4", tokenizer, num_samples=4, seq_len=32, seed=2))


@pytest.mark.parametrize(
    ("source", "message"),
    [("missing.jsonl", "data file missing.jsonl does not exist"), ("./nowhere", "does not exist")],
)
def test_missing_files(source, message):
    with pytest.raises(LlmpError, match=message):
        read_documents(source)


def test_too_little_text(tmp_path, tiny_dir):
    (tmp_path / "short.txt").write_text("a few words only")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    with pytest.raises(LlmpError, match=r"too few for 2 samples of 64; give more text"):
        calibration_samples(tmp_path / "short.txt", tokenizer, num_samples=2, seq_len=64)
