"""How the gradient engine spends memory: one settings object, passed down, never a module global.

Every setting trades time for memory; none changes a score (the tests pin that). The defaults
are the ones measured best in ``docs/benchmarks/scoring.md``; ``bench/ab_score.py`` sets two of
them side by side in one process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from llmp.errors import LlmpError, raise_all


@dataclass(frozen=True)
class ScoringSettings:
    """The calibration backward's memory policy (each field's docstring is its rule)."""

    checkpointing: bool = True
    """recompute activations in the backward instead of keeping them (off: faster, more memory)"""
    activation_budget: int = 256 << 20
    """bytes of ``Linear`` outputs that checkpointed layers may keep beyond their input, for a model
    of up to four times as many bytes of weights (a small model's peak is mostly the runtime's)"""
    activation_share: int = 10
    """a bigger model keeps 1/share of its weights' bytes instead (half that in half precision):
    each byte kept saves the same recompute whatever the calibration length"""
    loss_chunk_bytes: int = 64 << 20
    """float32 logits that exist at once in the chunked calibration loss (at least 16 tokens)"""
    forward_mmap_threshold: int = 256 << 10
    """glibc's mmap threshold during the calibration forward: freed activations between the kept
    layer outputs go back to the system instead of pinning the heap"""
    backward_mmap_threshold: int = 1 << 30
    """glibc's mmap threshold during the backward: everything from the heap (no page fault per
    tensor), whose free pages go back afterwards"""

    def __post_init__(self) -> None:
        problems = [
            f"`{f.name}` must be a whole number of bytes >= 0; got {getattr(self, f.name)!r}"
            for f in dataclasses.fields(self)
            if f.type == "int" and (not isinstance(getattr(self, f.name), int) or getattr(self, f.name) < 0)
        ]
        if isinstance(self.activation_share, int) and self.activation_share < 1:
            problems.append(f"`activation_share` must be >= 1 (a fraction 1/share); got {self.activation_share}")
        raise_all(problems)

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    def replace(self, **changes) -> ScoringSettings:
        """A copy with ``changes``; unknown names are refused (``bench/ab_score.py`` passes user text)."""
        unknown = sorted(set(changes) - set(self.field_names()))
        if unknown:
            raise LlmpError(
                f"ScoringSettings has no setting {unknown[0]!r}; choose from {', '.join(self.field_names())}"
            )
        return dataclasses.replace(self, **changes)
