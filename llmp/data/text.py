"""Plain text from local files or ``datasets``, and calibration samples drawn from it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from llmp.data.resources import resolve
from llmp.errors import LlmpError

_GUTENBERG = re.compile(r"\*\*\* ?START OF.*?\*\*\*(.*)\*\*\* ?END OF", re.S)


def read_documents(source: str | Path, field: str = "text") -> list[str]:
    """Documents from a built-in name (``c4``, ``wikitext2``: see ``llmp/resources``), a
    ``.txt``/``.raw`` file (one document), a ``.jsonl``/``.json`` file (the ``field`` of each
    record), or a ``datasets`` id (``name[:config]`` with a train split).

    Project Gutenberg headers and footers are stripped.

    Raises:
        LlmpError: the source does not exist or holds no text.
    """
    path = Path(resolve(source))
    if path.is_file():
        if path.suffix in (".jsonl", ".json"):
            docs = _json_documents(path, field)
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
            match = _GUTENBERG.search(text)
            docs = [match.group(1) if match else text]
    elif path.suffix or str(source).startswith((".", "/", "~")):
        raise LlmpError(f"data file {source} does not exist")
    else:
        docs = _hub_documents(str(source), field)
    docs = [d for d in docs if d and d.strip()]
    if not docs:
        raise LlmpError(f"no text in {source}: it is empty or has no {field!r} field")
    return docs


def read_text(source: str | Path, field: str = "text") -> str:
    """All documents of ``source`` joined by blank lines (see :func:`read_documents`)."""
    return "\n\n".join(read_documents(source, field))


def _json_documents(path: Path, field: str) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise LlmpError(f"{path} is not UTF-8 text ({err}); give JSON objects with a {field!r} field") from None
    try:
        if path.suffix == ".jsonl":
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            records = json.loads(text)
    except json.JSONDecodeError as err:
        raise LlmpError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(records, list):
        raise LlmpError(f"{path} must hold JSON objects with a {field!r} field; it holds one {type(records).__name__}")
    bad = [i + 1 for i, r in enumerate(records) if not isinstance(r, dict)]
    if bad:
        raise LlmpError(f"{path}: record(s) {bad[:5]} (counting from 1) are not JSON objects with a {field!r} field")
    return [str(r.get(field, "")) for r in records]


def _hub_documents(name: str, field: str) -> list[str]:
    import datasets

    repo, _, config = name.partition(":")
    try:
        data = datasets.load_dataset(repo, config or None, split="train", streaming=True)
        return [r[field] for _, r in zip(range(5000), data, strict=False)]
    except Exception as err:  # datasets raises many types for network and naming problems
        raise LlmpError(f"cannot load dataset {name!r}: {err}") from err


def calibration_samples(
    source: str | Path | list[str], tokenizer, num_samples: int = 10, seq_len: int = 64, seed: int = 0
) -> torch.Tensor:
    """``num_samples`` windows of ``seq_len`` tokens, ``[N, L]``.

    Each sample is a random window of a random document long enough to hold it (as the paper
    samples C4 documents); when no single document is long enough, windows of the concatenated
    text are used instead.

    ``source`` is what :func:`read_documents` reads, or its documents already read.

    Raises:
        LlmpError: bad counts, or too little text for the requested samples.
    """
    if num_samples < 1 or seq_len < 2:
        raise LlmpError(f"need `num_samples` >= 1 and `seq_len` >= 2; got {num_samples} and {seq_len}")
    docs = source if isinstance(source, list) else read_documents(source)
    if isinstance(source, list):
        source = "the calibration text"
    generator = torch.Generator().manual_seed(seed)
    head = docs[: max(64, num_samples * 8)]
    ids = tokenizer(head, add_special_tokens=False).input_ids if head else []  # one batch: 0.05 s, not 0.08, on SmolLM2
    long_enough = [t for t in ids if len(t) > seq_len]
    samples = []
    if len(long_enough) >= num_samples:
        picks = torch.randperm(len(long_enough), generator=generator)[:num_samples].tolist()
        for i in picks:
            tokens = long_enough[i]
            start = int(torch.randint(0, len(tokens) - seq_len, (1,), generator=generator))
            samples.append(tokens[start : start + seq_len])
    else:
        stream = [t for doc in ids for t in doc]
        windows = len(stream) // seq_len
        if windows < num_samples:
            raise LlmpError(
                f"{source} has {len(stream):,} tokens, too few for {num_samples} samples of {seq_len}; "
                "give more text or lower `num_samples` / `seq_len`"
            )
        picks = torch.randperm(windows, generator=generator)[:num_samples].tolist()
        samples = [stream[i * seq_len : (i + 1) * seq_len] for i in picks]
    return torch.tensor(samples, dtype=torch.long)


def loader_samples(loader, num_samples: int, seq_len: int) -> torch.Tensor:
    """``[num_samples, seq_len]`` calibration tokens from a dataloader's batches: their real
    (unpadded, by ``attention_mask``) tokens as one stream, cut into windows.

    Raises:
        LlmpError: the batches hold too few tokens.
    """
    stream: list[int] = []
    for batch in loader:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask", torch.ones_like(ids)).bool()
        stream += ids[mask].tolist()
        if len(stream) >= num_samples * seq_len:
            break
    if len(stream) < num_samples * seq_len:
        raise LlmpError(
            f"the datamodule gave {len(stream):,} tokens, too few for {num_samples} calibration samples of "
            f"{seq_len}; lower `num_samples` / `seq_len` or set `calibration`"
        )
    return torch.tensor(stream[: num_samples * seq_len], dtype=torch.long).view(num_samples, seq_len)
