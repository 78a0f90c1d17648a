"""The teacher's top-k logits of every training example, computed once and kept on disk.

With ``distill.cache: FILE`` a recovery run pays no teacher forward: the first run (rank 0)
runs the teacher over the training examples once and writes, for each example's selected
positions (see :func:`llmp.distill.recovery_loss`), the ``top_k`` largest logits (float16) and
their token ids (int32) into one safetensors file; every later epoch, seed or run on the same
examples reads them instead of holding the teacher. The file's metadata carries a fingerprint of
the examples (their token ids and labels), the teacher, ``top_k`` and ``tokens``: a run whose
examples or settings differ is refused rather than trained on another run's teacher.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from llmp.errors import LlmpError
from llmp.outdir import write_atomic

VERSION = 1


def fingerprint(examples, teacher: str, top_k: int, tokens: str) -> str:
    """A digest of the examples' ids and labels and of what the cache holds of them."""
    digest = hashlib.sha256(json.dumps({"v": VERSION, "teacher": teacher, "k": top_k, "tokens": tokens}).encode())
    for e in examples:
        digest.update(torch.tensor(e["input_ids"], dtype=torch.int64).numpy().tobytes())
        digest.update(torch.tensor(e["labels"], dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


class TeacherCache:
    """Top-k teacher logits per example: ``values``/``indices`` ``[R, k]``, example i's rows at
    ``offsets[i]:offsets[i+1]``."""

    def __init__(self, values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor) -> None:
        self.values, self.indices, self.offsets = values, indices, offsets

    @classmethod
    def build(cls, teacher, examples, collate, select, top_k: int, batch_size: int = 4) -> TeacherCache:
        """Run ``teacher`` over ``examples`` (``collate`` pads a list of them, ``select(batch)``
        gives the ``[B, L-1]`` positions to keep)."""
        values, indices, counts = [], [], []
        for start in range(0, len(examples), batch_size):
            batch = collate([examples[i] for i in range(start, min(start + batch_size, len(examples)))])
            rows = select(batch)
            top = teacher.logits(batch, rows).topk(top_k, dim=-1)
            values.append(top.values.half())
            indices.append(top.indices.int())
            counts += rows.sum(1).tolist()
        offsets = torch.zeros(len(counts) + 1, dtype=torch.int64)
        offsets[1:] = torch.tensor(counts, dtype=torch.int64).cumsum(0)
        return cls(torch.cat(values), torch.cat(indices), offsets)

    def write(self, path: str | Path, key: str) -> None:
        """Atomically, with ``key`` (the :func:`fingerprint`) in the metadata."""
        tensors = {"values": self.values, "indices": self.indices, "offsets": self.offsets}
        Path(path).parent.mkdir(parents=True, exist_ok=True)  # checked writable before the teacher's pass
        write_atomic(path, save(tensors, metadata={"fingerprint": key, "version": str(VERSION)}), record=False)

    @classmethod
    def read(cls, path: str | Path, key: str) -> TeacherCache:
        """Raises LlmpError: the file is unreadable, or was made for other examples or settings."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), "pt") as f:
                found = (f.metadata() or {}).get("fingerprint")
            tensors = load_file(str(path))
        except Exception as err:  # safetensors raises several types for foreign or truncated files
            raise LlmpError(f"`distill.cache` {path} is not a teacher cache llmp wrote: {err}") from err
        if found != key:
            raise LlmpError(
                f"`distill.cache` {path} holds the teacher's logits of other examples or settings (data, "
                "cutoff, teacher, top_k or tokens changed): delete it to compute it again, or name another file"
            )
        return cls(tensors["values"], tensors["indices"], tensors["offsets"])

    def lookup(self, examples: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The cached ``[N, k]`` logits and token ids of a batch of ``examples`` (dataset indices),
        in the order of ``rows`` (``[B, L-1]`` bool, row-major).

        Raises:
            LlmpError: an example's selected positions differ from the cached ones.
        """
        parts = []
        for example, count in zip(examples.tolist(), rows.sum(1).tolist(), strict=True):
            start, end = int(self.offsets[example]), int(self.offsets[example + 1])
            if end - start != count:
                raise LlmpError(
                    f"`distill.cache`: example {example} selects {count} positions, the cache {end - start}; "
                    "it was made for other data: delete it to compute it again"
                )
            parts.append(slice(start, end))
        index = torch.cat([torch.arange(p.start, p.stop) for p in parts])
        device = rows.device
        return self.values[index].to(device).float(), self.indices[index].to(device).long()
