"""Alpaca-style instruction records for recovery training (the datamodule is :mod:`llmp.data.recovery`).

Each record has ``instruction``, optional ``input`` and ``output``. The prompt is the Alpaca
template; the loss covers the response only (prompt tokens get label ``-100``) unless
``train_on_inputs``. Sequences are cut at ``cutoff_len`` tokens and padded per batch::

    tokens   [ ### Instruction ... ### Response: | Paris is the capital ... <eos> | <pad> <pad> ]
    labels   [ -100  -100  ...   -100   -100    | Paris is the capital ... <eos> | -100  -100  ]

Example::

    data = InstructionData("alpaca-1k", tokenizer="smollm2-135m", cutoff_len=256, batch_size=4)
"""

from __future__ import annotations

import logging
from pathlib import Path

from llmp.data.resources import resolve
from llmp.errors import LlmpError

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


def encode_record(tokenizer, record: dict, cutoff_len: int, train_on_inputs: bool = False) -> dict:
    """Token ids and labels of one record (see the module docstring)."""
    prompt = alpaca_prompt(record["instruction"], record.get("input") or "")
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    ids = tokenizer(prompt + record["output"], add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    ids = ids[:cutoff_len]
    labels = list(ids)
    if not train_on_inputs:
        n = min(len(prompt_ids), len(ids))
        labels[:n] = [-100] * n
    return {"input_ids": ids, "labels": labels}
