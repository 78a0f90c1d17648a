"""Alpaca-style instruction data for recovery training, as a LightningDataModule.

Each record has ``instruction``, optional ``input`` and ``output``. The prompt is the Alpaca
template; the loss covers the response only (prompt tokens get label ``-100``) unless
``train_on_inputs``. Sequences are cut at ``cutoff_len`` tokens and padded per batch::

    tokens   [ ### Instruction ... ### Response: | Paris is the capital ... <eos> | <pad> <pad> ]
    labels   [ -100  -100  ...   -100   -100    | Paris is the capital ... <eos> | -100  -100  ]

Example::

    data = InstructionData("alpaca-1k", tokenizer="smollm2-135m", cutoff_len=256, batch_size=4)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))  # input_ids, attention_mask, labels
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from llmp.data.resources import resolve
from llmp.errors import LlmpError, raise_all

log = logging.getLogger(__name__)

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt for one record (the response follows it)."""
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def load_records(path: str):
    """Instruction records as a ``datasets.Dataset``: a local JSON/JSONL file, a built-in name
    (``alpaca-1k``), or a hub id such as ``yahma/alpaca-cleaned`` (needs network access).

    Raises:
        LlmpError: nothing readable at ``path``, or records without instruction/output fields.
    """
    import datasets

    source = resolve(path)
    local = Path(source)
    try:
        if local.suffix in (".json", ".jsonl"):
            if not local.is_file():
                raise LlmpError(f"`data.path` {path!r}: no such file; give a JSON/JSONL file or a hub id")
            data = datasets.load_dataset("json", data_files=str(local), split="train")
        else:
            data = datasets.load_dataset(source, split="train")
    except LlmpError:
        raise
    except Exception as err:  # datasets raises many types for files, network and naming problems
        raise LlmpError(f"cannot load instruction data {path!r}: {err}") from err
    missing = {"instruction", "output"} - set(data.column_names)
    if missing:
        raise LlmpError(
            f"instruction data {path!r} lacks the field(s) {sorted(missing)}; records need "
            f"instruction, input (optional) and output; it has {data.column_names}"
        )
    return data


class InstructionData(L.LightningDataModule):
    """Alpaca-style instruction data: template, response-only loss, cutoff, validation split.

    Args:
        path: JSON/JSONL file, built-in ``alpaca-1k`` (the first 1,000 cleaned Alpaca records,
            shipped), or a hub id (``yahma/alpaca-cleaned``, the paper's data).
        tokenizer: model spec (folder, built-in name, hub id) whose tokenizer to use; recipes
            link it to the model, so it is rarely set by hand.
        cutoff_len: tokens per example at most (the paper: 256).
        train_on_inputs: also train on the prompt tokens.
        val_size: held-out examples, a count (>= 1) or a fraction (< 1); the paper holds out 2,000.
        max_samples: use only the first N records (quick runs); ``None`` for all.
        batch_size: micro-batch size per device.
        eval_batch_size: validation batch size (default: ``batch_size``).
        num_workers: DataLoader workers.
        seed: for the train/validation split and shuffling.
    """

    def __init__(
        self,
        path: str = "alpaca-1k",
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
        problems = []
        if cutoff_len < 8:
            problems.append(f"`cutoff_len` must be >= 8 tokens; got {cutoff_len}")
        if not (0 < val_size < 1 or (val_size >= 1 and float(val_size).is_integer())):
            problems.append(f"`val_size` must be a fraction in (0, 1) or a whole count >= 1; got {val_size}")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            problems.append(f"`batch_size` and `eval_batch_size` must be >= 1; got {batch_size}, {eval_batch_size}")
        if max_samples is not None and max_samples < 2:
            problems.append(f"`max_samples` must be >= 2 (train and validation) or None; got {max_samples}")
        raise_all(problems)
        self.path, self.tokenizer_spec = path, tokenizer
        self.cutoff_len, self.train_on_inputs = cutoff_len, train_on_inputs
        self.val_size, self.max_samples = val_size, max_samples
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.tokenizer = None
        self.train_set = self.val_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.tokenizer is None:
            if self.tokenizer_spec is None:
                raise LlmpError("InstructionData needs a tokenizer: set `data.tokenizer` to the model's spec")
            from llmp.models import load_tokenizer

            self.tokenizer = load_tokenizer(self.tokenizer_spec)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        data = load_records(self.path)
        if self.max_samples is not None:
            data = data.select(range(min(self.max_samples, len(data))))
        val = int(self.val_size) if self.val_size >= 1 else max(1, round(self.val_size * len(data)))
        if val >= len(data):
            raise LlmpError(f"`val_size` {self.val_size} leaves no training data out of {len(data)} records")
        split = data.train_test_split(test_size=val, seed=self.seed, shuffle=True)
        self.train_set, self.val_set = (self._encode_all(split[s], s) for s in ("train", "test"))
        log.info("instruction data: %d train, %d validation examples", len(self.train_set), len(self.val_set))

    def _encode_all(self, records, name: str):
        encoded = records.map(self.encode, remove_columns=records.column_names, desc=f"tokenizing {name}")
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

    def encode(self, record: dict) -> dict:
        """Token ids and labels of one record (see the module docstring)."""
        tok = self.tokenizer
        prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
        prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
        ids = tok(prompt + record["output"], add_special_tokens=True)["input_ids"]
        if tok.eos_token_id is not None:
            ids = [*ids, tok.eos_token_id]
        ids = ids[: self.cutoff_len]
        labels = list(ids)
        if not self.train_on_inputs:
            n = min(len(prompt_ids), len(ids))
            labels[:n] = [-100] * n
        return {"input_ids": ids, "labels": labels}

    def collate(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad a list of encoded examples to the longest one."""
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
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.eval_batch_size, shuffle=False)

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            self.setup("fit")
            dataset = self.train_set if shuffle else self.val_set
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=EpochShuffle(len(dataset), self.seed) if shuffle else None,
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )


class EpochShuffle(Sampler[int]):
    """A random order fixed by ``(seed, epoch)``: a resumed fit sees the orders an uninterrupted one
    would (a generator-driven shuffle would restart its sequence). Lightning calls ``set_epoch``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())
