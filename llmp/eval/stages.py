"""The models a run goes through (dense → pruned → recovered), measured alike and written into its record.

``llmp prune`` measures the dense and pruned stages, ``llmp fit --eval.data`` all three; both go
through :class:`Stages`, the one writer of a record's ``perplexity`` and ``generations``::

    stages = Stages(data="wikitext2", text=text, seq_len=128, max_tokens=16384, samples=4)
    stages.measure("dense", model, tokenizer)
    llmp.prune(model, config, calibration)
    stages.measure("pruned", model, tokenizer)
    stages.write(record)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llmp.eval.generation import generate_samples, samples_entry
from llmp.eval.perplexity import perplexity
from llmp.record import Perplexity, PruningRecord

STAGES = ("dense", "pruned", "recovered")


@dataclass
class Stages:
    """Perplexity on ``text`` (none: skipped) and ``samples`` greedy generations, per stage.

    Attributes:
        data: the text's name, as the record shows it.
        text: the evaluation text (``None``: generations only).
        seq_len: tokens per window (see :func:`llmp.eval.perplexity`).
        max_tokens: the first tokens of ``text`` measured.
        samples: fixed prompts continued per stage (0: none).
    """

    data: str | None
    text: str | None
    seq_len: int = 128
    max_tokens: int | None = None
    samples: int = 0
    found: Perplexity = field(init=False)
    runs: dict[str, dict] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.found = Perplexity(data=self.data if self.text is not None else None)

    def measure(self, stage: str, model, tokenizer) -> float | None:
        """Measure ``model`` as ``stage`` (one of :data:`STAGES`); returns its perplexity (``None``: no text)."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        ppl = None
        if self.text is not None:
            result = perplexity(model, tokenizer, self.text, self.seq_len, self.max_tokens)
            ppl = round(result.ppl, 4)
            setattr(self.found, stage, ppl)
            self.found.protocol = result.protocol
        if self.samples > 0:
            self.runs[stage] = generate_samples(model, tokenizer, count=self.samples)
        return ppl

    def write(self, record: PruningRecord) -> None:
        """Set ``record``'s ``perplexity`` and ``generations`` to what was measured (replacing older ones)."""
        if self.text is not None:
            record.perplexity = self.found
        if self.runs:
            record.generations = samples_entry(*self.runs.values(), labels=tuple(self.runs))
