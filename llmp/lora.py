"""LoRA settings for recovery training (peft's adapters), checked as every settings dataclass is."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from peft import LoraConfig
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class LoraSettings:
    """LoRA adapters (peft).

    Attributes:
        r: rank of the adapters.
        alpha: scaling numerator (the update is scaled by alpha / r).
        dropout: dropout on the adapters' input.
        target_modules: module names to adapt; ``all-linear`` means every linear layer but the
            output head (for Llama: q, k, v, o, gate, up, down, as in the paper). With
            ``all-linear``, a mixture-of-experts model's fused expert tensors
            (``experts.gate_up_proj``, ``experts.down_proj``: 3-D parameters, no ``nn.Linear``)
            get adapters too, through peft's ``target_parameters``; routers stay frozen.
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

    def peft_config(self, model: nn.Module | None = None) -> LoraConfig:
        """The adapters as peft configures them for ``model`` (no adapter on biases; a causal LM).

        peft's adapters on 3-D expert tensors take no dropout, and a config has one dropout for
        all adapters: with fused experts the dropout is 0 (said in the log)."""
        experts = fused_experts(model) if self.target_modules == "all-linear" else None
        dropout = self.dropout
        if experts and dropout:
            log.warning(
                "LoRA on the fused expert tensors takes no dropout: `lora.dropout` %s is 0 for this model", dropout
            )
            dropout = 0.0
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=dropout,
            target_modules=self.target_modules,
            target_parameters=experts,
            bias="none",
            task_type="CAUSAL_LM",
        )


FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")


def fused_experts(model: nn.Module | None) -> list[str] | None:
    """The fused expert parameters ``model`` holds (transformers 5's MoE layout), as peft names them."""
    if model is None:
        return None
    names = {name for name, _ in model.named_parameters()}
    found = [suffix for suffix in FUSED_EXPERTS if any(n.endswith("." + suffix) for n in names)]
    return found or None
