"""Perplexity with the paper's protocol.

The text is tokenized once (no BOS per window), cut into non-overlapping windows of ``seq_len``
tokens (the last, partial window is dropped), and the perplexity is ``exp`` of the mean
next-token loss over every predicted token of every window. ``max_tokens`` keeps only the first
tokens of the text, which keeps CPU runs short; the protocol string says what was measured.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from llmp.errors import LlmpError


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seq_len: int

    @property
    def protocol(self) -> str:
        return (
            f"{self.windows} non-overlapping windows of {self.seq_len} tokens ({self.tokens:,} tokens), "
            "no BOS, mean next-token NLL"
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "protocol": self.protocol}


@torch.no_grad()
def perplexity(
    model, tokenizer, text: str, seq_len: int = 128, max_tokens: int | None = None, batch_size: int = 8
) -> PerplexityResult:
    """Perplexity of ``model`` on ``text`` (see the module docstring for the protocol).

    Raises:
        LlmpError: the text is shorter than one window.
    """
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    windows = ids.numel() // seq_len
    if windows == 0:
        raise LlmpError(f"the text has {ids.numel()} tokens, fewer than one window of `seq_len` {seq_len}")
    ids = ids[: windows * seq_len].view(windows, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, windows, batch_size):
        batch = ids[start : start + batch_size].to(device)
        logits = model(input_ids=batch).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"))
    model.train(was_training)
    count = windows * (seq_len - 1)
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, windows * seq_len, windows, seq_len)
