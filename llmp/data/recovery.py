"""Recovery training data as a LightningDataModule: instruction records, general text, or a mixture.

Each source is one of two kinds, told apart by its records (``format: auto``):

* **instruction** records (``instruction``, optional ``input``, ``output``): the Alpaca prompt,
  loss on the response only, cut at ``cutoff_len`` (see :mod:`llmp.data.instruct`);
* **text** (a ``.txt`` file, JSON/JSONL records with a ``text`` field, a ``datasets`` id): the
  documents are tokenized, joined with EOS between them and **packed** into windows of
  ``cutoff_len`` tokens, every token a label (pretraining-style, as Minitron distils on).

Held-out examples are taken per source before anything is packed (whole records or documents),
so no validation window shares text with a training one. ``weights`` sets each source's share of
the training examples of an epoch (drawn again, by ``(seed, epoch)``, each epoch); by default each
source gives all its examples once. Example::

    data = RecoveryData(["c4-train", "alpaca-1k"], weights=[0.5, 0.5], tokenizer="smollm2-135m")
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # input_ids, attention_mask, labels
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler

from llmp.data.instruct import encode_record, load_records
from llmp.data.resources import resolve
from llmp.data.text import read_documents
from llmp.errors import LlmpError, raise_all

log = logging.getLogger(__name__)

Format = Literal["auto", "instruction", "text"]


def source_format(path: str, field: str = "text") -> str:
    """``instruction`` or ``text``: what the records of ``path`` look like.

    Raises:
        LlmpError: a JSON file whose first record is neither kind.
    """
    local = Path(resolve(path))
    if local.suffix not in (".json", ".jsonl"):
        if local.is_file() or local.suffix:
            return "text"
        return _hub_format(path, field)
    if not local.is_file():
        raise LlmpError(f"`data.path` {path!r}: no such file; give a text or JSON/JSONL file, or a hub id")
    first = _first_record(local)
    if isinstance(first, dict) and {"instruction", "output"} <= set(first):
        return "instruction"
    if isinstance(first, dict) and field in first:
        return "text"
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise LlmpError(
        f"`data.path` {path!r}: its records are neither instructions (instruction, output) nor text "
        f"({field!r}); the first has {keys}; set `data.field` to the text field"
    )


def _first_record(path: Path):
    try:
        with path.open(encoding="utf-8") as f:
            if path.suffix == ".jsonl":
                line = next((line for line in f if line.strip()), "{}")
                return json.loads(line)
            records = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise LlmpError(f"{path} is not valid JSON text: {err}") from None
    return records[0] if isinstance(records, list) and records else records


def _hub_format(name: str, field: str) -> str:
    import datasets

    repo, _, config = name.partition(":")
    try:
        first = next(iter(datasets.load_dataset(repo, config or None, split="train", streaming=True)))
    except Exception as err:  # datasets raises many types for network and naming problems
        raise LlmpError(f"cannot load dataset {name!r}: {err}") from err
    return "instruction" if {"instruction", "output"} <= set(first) else "text"


def pack(tokenizer, documents: list[str], window: int) -> list[dict]:
    """Documents as one token stream (EOS after each), cut into ``window``-token examples whose
    labels are their tokens; the last partial window is dropped."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream: list[int] = []
    for doc in documents:
        stream += tokenizer(doc, add_special_tokens=False).input_ids + eos
    return [
        {"input_ids": stream[i : i + window], "labels": stream[i : i + window]}
        for i in range(0, len(stream) - window + 1, window)
    ]


class RecoveryData(L.LightningDataModule):
    """Instruction records, general text, or a weighted mixture (see the module docstring).

    Args:
        path: a source or a list of them: a JSON/JSONL/text file, a built-in name (``alpaca-1k``:
            1,000 cleaned Alpaca records; ``c4-train``: 480 C4 documents, not those of the ``c4``
            calibration sample), or a hub id (``yahma/alpaca-cleaned``, ``allenai/c4:en``).
        weights: each source's share of the training examples per epoch (normalised); ``None``
            gives every example of every source once.
        format: ``auto`` tells each source's kind by its records; ``instruction`` or ``text``
            forces one for all.
        field: the text field of text records.
        tokenizer: model spec (folder, built-in name, hub id) whose tokenizer to use; recipes
            link it to the model, so it is rarely set by hand.
        cutoff_len: tokens per instruction example at most, and per packed text window (the paper: 256).
        train_on_inputs: also train on the prompt tokens of instruction records.
        val_size: held out per source, a count (>= 1) or a fraction (< 1) of its records or
            documents; the paper holds out 2,000 records.
        max_samples: read only the first N records or documents of each source; ``None`` for all.
        batch_size: micro-batch size per device.
        eval_batch_size: validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: for the splits, the mixture and shuffling.
    """

    def __init__(
        self,
        path: str | list[str] = "alpaca-1k",
        weights: list[float] | None = None,
        format: Format = "auto",
        field: str = "text",
        tokenizer: str | None = None,
        cutoff_len: int = 256,
        train_on_inputs: bool = False,
        val_size: float = 0.1,
        max_samples: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 42,
    ) -> None:
        super().__init__()
        paths = [path] if isinstance(path, str) else list(path)
        problems = []
        if not paths or not all(isinstance(p, str) and p for p in paths):
            problems.append(f"`data.path` must be a source or a list of them; got {path!r}")
        if weights is not None and (len(weights) != len(paths) or any(w < 0 for w in weights) or sum(weights) <= 0):
            problems.append(
                f"`data.weights` needs one share >= 0 per source ({len(paths)}), not all 0; got {weights!r}"
            )
        if format not in ("auto", "instruction", "text"):
            problems.append(f"`data.format` must be auto, instruction or text; got {format!r}")
        if cutoff_len < 8:
            problems.append(f"`cutoff_len` must be >= 8 tokens; got {cutoff_len}")
        if not (0 < val_size < 1 or (val_size >= 1 and float(val_size).is_integer())):
            problems.append(f"`val_size` must be a fraction in (0, 1) or a whole count >= 1; got {val_size}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            problems.append(f"`batch_size` and `eval_batch_size` must be >= 1; got {batch_size}, {eval_batch_size}")
        if max_samples is not None and max_samples < 2:
            problems.append(f"`max_samples` must be >= 2 (train and validation) or None; got {max_samples}")
        raise_all(problems)
        self.paths, self.weights, self.format, self.field = paths, weights, format, field
        self.tokenizer_spec = tokenizer
        self.cutoff_len, self.train_on_inputs = cutoff_len, train_on_inputs
        self.val_size, self.max_samples = val_size, max_samples
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = None
        self.train_set = self.val_set = None
        self.train_sizes: list[int] = []

    @property
    def path(self) -> str:
        """The first source (what a single-source recipe names)."""
        return self.paths[0]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None:
            if self.tokenizer_spec is None:
                raise LlmpError(f"{type(self).__name__} needs a tokenizer: set `data.tokenizer` to the model's spec")
            from llmp.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_spec)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        trains, vals = [], []
        for path in self.paths:
            kind = self.format if self.format != "auto" else source_format(path, self.field)
            train, val = self._instruction_source(path) if kind == "instruction" else self._text_source(path)
            log.info("%s (%s): %d train, %d validation examples", path, kind, len(train), len(val))
            trains.append(train)
            vals.append(val)
        self.train_sizes = [len(t) for t in trains]
        self.train_set, self.val_set = Numbered(ConcatDataset(trains)), ConcatDataset(vals)

    def _held_out(self, count: int, path: str) -> int:
        held = int(self.val_size) if self.val_size >= 1 else max(1, round(self.val_size * count))
        if held >= count:
            raise LlmpError(f"`val_size` {self.val_size} leaves no training data out of {count} in {path}")
        return held

    def _instruction_source(self, path: str):
        data = load_records(path)
        if self.max_samples is not None:
            data = data.select(range(min(self.max_samples, len(data))))
        split = data.train_test_split(test_size=self._held_out(len(data), path), seed=self.seed, shuffle=True)
        return tuple(self._encode_records(split[s], s) for s in ("train", "test"))

    def _text_source(self, path: str):
        docs = read_documents(path, self.field)[: self.max_samples]
        if len(docs) == 1:  # one long document (a book): its tail is held out (a tenth for a count)
            text = docs[0]
            cut = int(len(text) * (1 - (self.val_size if self.val_size < 1 else 0.1)))
            train_docs, val_docs = [text[:cut]], [text[cut:]]
        else:
            held = self._held_out(len(docs), path)
            order = torch.randperm(len(docs), generator=torch.Generator().manual_seed(self.seed)).tolist()
            val_docs = [docs[i] for i in order[:held]]
            train_docs = [docs[i] for i in order[held:]]
        train, val = (pack(self.tokenizer, d, self.cutoff_len) for d in (train_docs, val_docs))
        if not train or not val:
            raise LlmpError(
                f"{path} has too little text for one {self.cutoff_len}-token window in both the training and the "
                "held-out part: give more text, or lower `cutoff_len` or `val_size`"
            )
        return train, val

    def encode(self, record: dict) -> dict:
        """Token ids and labels of one instruction record (see :func:`~llmp.data.instruct.encode_record`)."""
        return encode_record(self.tokenizer, record, self.cutoff_len, self.train_on_inputs)

    def _encode_records(self, records, name: str):
        encoded = records.map(
            self.encode,
            remove_columns=records.column_names,
            desc=f"tokenizing {name}",
        )
        # An example whose response was cut off entirely has no loss to give: drop it.
        kept = encoded.filter(lambda e: any(t != -100 for t in e["labels"]), desc=f"dropping empty {name}")
        if len(kept) < len(encoded):
            log.warning(
                "%d %s examples have no response token within `cutoff_len` %d; dropped",
                len(encoded) - len(kept),
                name,
                self.cutoff_len,
            )
        if len(kept) == 0:
            raise LlmpError(
                f"no {name} example keeps a response token within `cutoff_len` {self.cutoff_len}: raise it "
                "(the Alpaca prompt alone is ~40-60 tokens for most tokenizers)"
            )
        return kept

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a list of encoded examples to the longest one (training examples also give
        their ``example`` index, by which a teacher cache finds them)."""
        width = max(len(e["input_ids"]) for e in examples)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(examples), width), pad, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        mask = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[row, :n] = torch.tensor(e["input_ids"])
            labels[row, :n] = torch.tensor(e["labels"])
            mask[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "example" in examples[0]:
            batch["example"] = torch.tensor([e["example"] for e in examples], dtype=torch.long)
        return batch

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        shares = self.weights or self.train_sizes
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochShuffle(self.train_sizes, shares, self.seed),
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("fit")
        return DataLoader(
            self.val_set, batch_size=self.eval_batch_size, collate_fn=self.collate, num_workers=self.num_workers
        )


class Numbered(Dataset):
    """The examples of ``data``, each with its ``example`` index."""

    def __init__(self, data) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> dict:
        return {**self.data[i], "example": i}


class EpochShuffle(Sampler[int]):
    """An epoch of a concatenation of sources: ``shares`` (normalised) of ``sum(sizes)`` examples
    from each source, each source's examples in a random order cycled as often as needed, all
    shuffled together. The order is fixed by ``(seed, epoch)``, so a resumed fit sees the orders an
    uninterrupted one would (a generator-driven shuffle would restart its sequence). Lightning
    calls ``set_epoch``."""

    def __init__(self, sizes: int | list[int], shares: list[float] | None = None, seed: int = 0) -> None:
        self.sizes = [sizes] if isinstance(sizes, int) else list(sizes)
        shares = shares or self.sizes
        total, whole = sum(self.sizes), sum(shares)
        self.counts = [math.floor(total * s / whole + 0.5) for s in shares]
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(self.counts)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        picks, offset = [], 0
        for size, count in zip(self.sizes, self.counts, strict=True):
            if count and size:
                cycles = -(-count // size)
                order = torch.cat([torch.randperm(size, generator=generator) for _ in range(cycles)])[:count]
                picks.append(order + offset)
            offset += size
        chosen = torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)
        if len(self.sizes) == 1:  # one source: its own order (what the single-source sampler always gave)
            return iter(chosen.tolist())
        return iter(chosen[torch.randperm(len(chosen), generator=generator)].tolist())


class InstructionData(RecoveryData):
    """:class:`RecoveryData` of instruction records only (``format: instruction``): Alpaca-style
    records, template, response-only loss, cutoff, validation split."""

    def __init__(self, path: str | list[str] = "alpaca-1k", **kwargs) -> None:
        super().__init__(path, format="instruction", **kwargs)
