"""LoRA settings for recovery training (peft's adapters), checked as every settings dataclass is."""

from __future__ import annotations

from dataclasses import dataclass

from peft import LoraConfig


@dataclass
class LoraSettings:
    """LoRA adapters (peft).

    Attributes:
        r: rank of the adapters.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapters' input.
        target_modules: module names to adapt; ``all-linear`` means every linear layer but the
            output head (for Llama: q, k, v, o, gate, up, down, as in the paper).
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: str | list[str] = "all-linear"

    def problems(self) -> list[str]:
        """What is wrong with the settings, one message per key."""
        found = []
        if self.r < 1:
            found.append(f"`lora.r` must be >= 1; got {self.r}")
        if self.alpha <= 0:
            found.append(f"`lora.alpha` must be > 0; got {self.alpha}")
        if not 0 <= self.dropout < 1:
            found.append(f"`lora.dropout` must be in [0, 1); got {self.dropout}")
        return found

    def peft_config(self) -> LoraConfig:
        """The adapters as peft configures them (no adapter on biases; a causal LM)."""
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias="none",
            task_type="CAUSAL_LM",
        )
