"""The mean next-token loss of calibration tokens, without all of their logits at once.

``B·L × vocab`` float logits exist three times under autograd (logits, log-softmax, their
gradient): 0.4 GB for 10 × 64 tokens of a 49k vocabulary, 12 GB for 64 × 128 tokens of a 128k
one. The head runs on a few tokens at a time instead (``loss_chunk_bytes`` of logits).
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint
from torch import nn

from llmp.head import head_inputs, head_loss, plain_head
from llmp.importance.settings import ScoringSettings


def calibration_loss(model: nn.Module, batch: torch.Tensor, settings: ScoringSettings | None = None) -> torch.Tensor:
    """The mean next-token loss of ``batch`` (``[B, L]`` ids), as ``model(..., labels=...).loss``.

    Where the head's own weights need no gradient (it is not pruned), each chunk's gradient is
    made in the forward (:func:`llmp.head.head_loss`); otherwise each chunk runs under activation
    checkpointing. Models whose forward changes the logits after the head (Gemma 2's soft-capping,
    a logit scale) take the plain path.
    """
    settings = settings or ScoringSettings()
    head = plain_head(model)
    if head is None:
        return model(input_ids=batch, labels=batch, use_cache=False).loss
    hidden = head_inputs(model, head, input_ids=batch)
    hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = batch[:, 1:].reshape(-1).to(hidden.device)
    size, budget = head.weight.element_size(), settings.loss_chunk_bytes
    total = head_loss(head, hidden, labels, loss_chunk(labels.numel(), head.out_features, budget, size))
    if total is None:
        chunk = loss_chunk(labels.numel(), head.out_features, budget, size, copies=3)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, labels.numel(), chunk):
            part = slice(start, start + chunk)
            total = total + torch.utils.checkpoint.checkpoint(
                _chunk_loss, head, hidden[part], labels[part], use_reentrant=False
            )
    return total / labels.numel()


def loss_chunk(tokens: int, vocab: int, budget: int, element_size: int = 4, copies: int = 1) -> int:
    """Tokens per chunk: as few chunks as ``budget`` bytes of logits allow (at least 16 tokens
    each), of even sizes (630 tokens in two chunks of 315, not 341 and 289: a short chunk's
    products run slower).

    ``copies``: float32 copies of a chunk's logits that exist at once (the fused loss: 1; autograd's
    cross-entropy, for a head that is scored: 3). A half-precision head also holds its logits in
    its own dtype (6 bytes a logit in bf16, fused), and gets half the budget: its peak stays next
    to its weights' size, as the checkpointing budget does."""
    per_logit = 4 * copies + (element_size if element_size < 4 else 0)
    most = max(16, budget * min(element_size, 4) // 4 // (per_logit * vocab))
    chunks = -(-tokens // most)
    return -(-tokens // chunks)


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")
