"""The gradient engine: per-weight salience from calibration gradients, with no copy of all gradients.

Second-order criteria take one sample per backward; each parameter's gradient is reduced as it
completes (:meth:`GradientScorer.on_sample`) and freed at once. First-order ones need the summed
gradient and are scored during the last batch's backward, so with one batch (the default) no full
set of gradients ever exists:

- an ``nn.Linear`` weight's gradient ``dyᵀ·x`` is made in its backward (:mod:`.taps`) into one
  buffer per weight size and scored at once (:meth:`GradientScorer.on_linear`); over several
  batches it is summed in a float32 copy until the last;
- any other parameter of a group (norms, embeddings, the head) accumulates in ``param.grad`` and
  is scored when the last backward completes it (:meth:`GradientScorer.on_complete`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from tqdm.auto import tqdm

from llmp.errors import LlmpError
from llmp.importance.checkpointing import checkpointed, keep_matmuls
from llmp.importance.checkpointing import plan as checkpoint_plan
from llmp.importance.criteria import CriterionSpec, Taylor2, TaylorMix
from llmp.importance.loss import calibration_loss
from llmp.importance.settings import ScoringSettings
from llmp.importance.taps import linear_weights, scored_linears
from llmp.memory import mmap_threshold, release_free_heap
from llmp.structure import Structure

Sums = dict[tuple[str, int], torch.Tensor]
"""(parameter, dim) → the salience summed over every other dim (float64)."""


class GradientScorer:
    """Reduces one gradient criterion's salience per parameter slice as the gradients arrive.

    Args:
        criterion: a gradient criterion.
        keys: parameter name → the dims its groups slice.
        samples: calibration samples in all (gradients are of the mean loss).
    """

    def __init__(self, criterion: CriterionSpec, keys: dict[str, set[int]], samples: int):
        self.criterion, self.keys, self.samples = criterion, keys, samples
        self.sums: Sums = {}
        self.totals: dict[str, float] = defaultdict(float)
        self.last = False  # set before the last backward: first-order gradients are then complete
        self._pending: dict[str, torch.Tensor] = {}  # Linear gradients summed over the earlier batches
        self._buffers: dict[tuple, torch.Tensor] = {}  # one gradient buffer per weight size
        self._scratch: dict[tuple, torch.Tensor] = {}  # float32 copies of half-precision tensors
        self._gradient: dict[str, torch.Tensor] = {}  # taylor_mix: mean gradient
        self._fisher: dict[str, torch.Tensor] = {}  # taylor_mix: Fisher diagonal

    # -- autograd events ------------------------------------------------------------------------

    def on_linear(self, name: str, weight: torch.Tensor, x: torch.Tensor, dy: torch.Tensor) -> None:
        """A scored ``Linear``'s weight gradient of this batch, as ``(x, dy)``."""
        key = (weight.numel(), weight.dtype, weight.device)  # gate/up and down share one buffer
        if key not in self._buffers:
            self._buffers[key] = weight.new_empty(weight.numel())
        g = torch.mm(dy.t(), x, out=self._buffers[key].view(weight.shape))
        if not self.last:
            self._pending[name] = g.float().clone() if name not in self._pending else self._pending[name].add_(g)
            return
        self.finish(name, weight, self._pending.pop(name).add_(g) if name in self._pending else g)

    def on_complete(self, name: str, p: torch.Tensor) -> None:
        """``p.grad`` holds the summed gradient (the last backward of a first-order criterion)."""
        self.finish(name, p, p.grad)

    def on_sample(self, name: str, p: torch.Tensor) -> None:
        """``p.grad`` holds one sample's gradient (second order): reduce it, then free it."""
        g = p.grad.detach().float()  # scores in float32 whatever the weights' dtype
        n = self.samples
        if isinstance(self.criterion, Taylor2):
            contribution = self.criterion.sample_salience(p.detach().float(), g, n)
            for dim in self.keys.get(name, ()):
                part = self.criterion.reduce(contribution, dim).double()
                self.sums[(name, dim)] = self.sums[(name, dim)] + part if (name, dim) in self.sums else part
            self.totals[name] += float(contribution.sum())
        else:  # taylor_mix: the mean gradient and the Fisher diagonal, for finish()
            f = g * g / n
            self._fisher[name] = self._fisher[name] + f if name in self._fisher else f
            self._gradient[name] = self._gradient[name] + g / n if name in self._gradient else g / n
        p.grad = None

    # -- scores ---------------------------------------------------------------------------------

    def finish(self, name: str, p: torch.Tensor, g: torch.Tensor | None) -> None:
        """Final scores of one parameter from its summed gradient ``g`` (used up: the first-order
        criteria work in place on it). Scores are float32 whatever the weights' dtype; first order
        multiplies by the weight as it is (promoted exactly: no float32 copy of it)."""
        first_order = not self.criterion.per_sample
        w = p.detach() if first_order else self._float(p.detach(), "weight")
        if g is None:  # unused by the forward
            g = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        else:
            g = self._float(g.detach(), "gradient")
        salience = self.criterion.salience(w, g, self._fisher.pop(name, None))
        for dim in self.keys.get(name, ()):
            self.sums[(name, dim)] = self.criterion.reduce(salience, dim).double()
        self.totals[name] = self.criterion.total(salience)
        p.grad = None

    def finish_rest(self, params: dict[str, nn.Parameter], tracked: list[str]) -> None:
        """After the last backward: taylor_mix's scores, and zeros for parameters no gradient reached."""
        for name in tracked:
            if isinstance(self.criterion, TaylorMix):
                self.finish(name, params[name], self._gradient.pop(name, None))
            elif not isinstance(self.criterion, Taylor2) and name not in self.totals:
                self.finish(name, params[name], None)

    def _float(self, t: torch.Tensor, slot: str) -> torch.Tensor:
        """``t`` in float32: itself, or a copy in one buffer per slot, as big as the biggest weight
        (a fresh float32 copy of every half-precision tensor faults in new pages each time)."""
        if t.dtype == torch.float32:
            return t
        key = (slot, t.device)
        if key not in self._scratch or self._scratch[key].numel() < t.numel():
            self._scratch.pop(key, None)
            self._scratch[key] = torch.empty(t.numel(), dtype=torch.float32, device=t.device)
        return self._scratch[key][: t.numel()].view(t.shape).copy_(t)

    # -- the calibration passes -----------------------------------------------------------------

    def run(
        self,
        model: nn.Module,
        structure: Structure,
        tracked: list[str],
        calibration: torch.Tensor,
        batch_size: int | None,
        settings: ScoringSettings,
    ) -> None:
        """Forward and backward ``calibration`` in batches, scoring ``tracked`` parameters as their
        gradients complete; activations recomputed as ``settings`` say (:mod:`.checkpointing`)."""
        n = calibration.shape[0]
        per_sample = self.criterion.per_sample
        step = 1 if per_sample else (n if batch_size is None else max(1, batch_size))
        params = dict(model.named_parameters())
        full = selective = []
        if settings.checkpointing:
            full, selective = checkpoint_plan(model, structure, min(step, n) * calibration.shape[1], settings)
        linears = {} if per_sample else linear_weights(model, tracked)
        starts = list(range(0, n, step))
        handles = []
        if per_sample:
            handles = [
                params[k].register_post_accumulate_grad_hook(lambda p, k=k: self.on_sample(k, p)) for k in tracked
            ]
        with (
            checkpointed(full),
            checkpointed(selective, keep_matmuls),
            _grad_only_for(model, tracked),
            scored_linears(linears, self.on_linear),
        ):
            try:
                for start in _progress(starts, self.criterion.name):
                    if start == starts[-1] and not per_sample:
                        self.last = True  # each gradient completes the sum in this backward: score it then
                        handles = [
                            params[k].register_post_accumulate_grad_hook(lambda p, k=k: self.on_complete(k, p))
                            for k in tracked
                            if k not in linears
                        ]
                    self._step(model, calibration[start : start + step], n, settings)
            finally:
                for handle in handles:
                    handle.remove()
                release_free_heap()
            self.finish_rest(params, tracked)

    def _step(self, model: nn.Module, batch: torch.Tensor, n: int, settings: ScoringSettings) -> None:
        batch = batch.to(next(model.parameters()).device)
        with mmap_threshold(settings.forward_mmap_threshold):
            loss = calibration_loss(model, batch, settings)
        if not torch.isfinite(loss):
            raise LlmpError(f"calibration loss is {float(loss)}: the model or the data is broken")
        with mmap_threshold(settings.backward_mmap_threshold):
            (loss if self.criterion.per_sample else loss * (batch.shape[0] / n)).backward()


def _progress(starts: list[int], name: str):
    quiet = torch.distributed.is_initialized() and torch.distributed.get_rank() != 0  # one bar per job
    return tqdm(starts, desc=f"calibration ({name})", unit="batch", leave=False, disable=True if quiet else None)


@contextmanager
def _grad_only_for(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Only ``names`` require a gradient inside (the model in eval mode); everything as before after."""
    params = dict(model.named_parameters())
    before = {n: p.requires_grad for n, p in params.items()}
    grads = {n: p.grad for n, p in params.items()}
    was_training = model.training
    wanted = set(names)
    for n, p in params.items():
        p.requires_grad_(n in wanted)
        p.grad = None
    model.eval()
    try:
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(before[n])
            p.grad = grads[n]
        model.train(was_training)
