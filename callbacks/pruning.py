"""``StructuredPruning``: when to prune, and how much, inside a Lightning fit.

The pruning itself is :func:`llmp.prune`; this callback only schedules it::

    one-shot (schedule=None)     setup ─ prune to `ratio` ─ optimizers, DDP/DeepSpeed wrap ─ train ...
    iterative (schedule={0: .1, 2: .2})
                                 setup ─ prune to 10% ─ wrap ─ epoch 0 ─ epoch 1 ─┬ prune to 20% ─ epoch 2 ...
                                                                                  └ merge LoRA, prune, new LoRA,
                                                                                    new optimizer, new DDP wrapper

Rank 0's plan is broadcast, so every rank removes the same structures. The steps done go into
the module's :class:`~llmp.record.PruningRecord`, which checkpoints carry, and a resumed fit
rebuilds the pruned shapes before the weights load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from typing import Any, Protocol

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, SingleDeviceStrategy
from typing_extensions import override

from llmp.checkpoints import read_entry
from llmp.data.text import loader_samples
from llmp.errors import LlmpError, raise_all
from llmp.pruning import PruneConfig, count_parameters, prune
from llmp.record import Calibration, PruningRecord
from llmp.structure import Kind

log = logging.getLogger(__name__)


class Prunable(Protocol):
    """What :class:`StructuredPruning` needs of the module it prunes; :class:`~llmp.RecoveryModule` has it."""

    tokenizer: Any
    record: PruningRecord  # made by load_base: the original size and shapes; the steps so far

    @property
    def base_model(self) -> torch.nn.Module: ...  # the model without adapters or wrappers

    def load_base(self) -> None: ...  # load the (dense) model, before any strategy wraps it
    def merge_adapters(self) -> None: ...  # fold LoRA into the weights before a step
    def prepare(self) -> None: ...  # new adapters / trainable parameters after a step
    def rebuild(self, saved: PruningRecord | None) -> None: ...  # repeat a record's steps (resume)
    def start_schedule(self, settings: dict, schedule: dict[str, float], calibration: Calibration) -> None: ...
    def add_pruning(self, result: PruningRecord, epoch: int, target_ratio: float) -> None: ...
    def to(self, device) -> Any: ...


RAMPS = ("linear", "cubic")


def plan_digest(plan: dict[str, list[int]]) -> str:
    """A short fingerprint of a pruning plan (which elements of which groups), for the logs."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]


class StructuredPruning(L.Callback):
    """Prune the model of a :class:`~llmp.RecoveryModule` at fit start or between epochs.

    Args:
        config: what to remove; ``config.ratio`` is the final fraction of the original model's
            parameters removed.
        schedule: ``None`` prunes once at fit start. A mapping ``{epoch: ratio}`` prunes to each
            cumulative ratio at the start of that epoch (epoch 0 means fit start). ``"linear:N"``
            or ``"cubic:N"`` ramp to ``config.ratio`` over the starts of epochs 0..N-1 (cubic
            removes more early: r_k = R * (1 - (1 - k/N)^3)).
        calibration: a text corpus for the gradient criteria (a file, or ``c4``); ``None`` draws
            the tokens from the datamodule (its ``calibration_dataloader()`` if it has one, else
            its ``train_dataloader()``).
        num_samples: calibration sequences.
        seq_len: tokens per calibration sequence.

    Example::

        trainer = L.Trainer(callbacks=[StructuredPruning(PruneConfig(ratio=0.2, attention="kv"))])
        trainer.fit(RecoveryModule("smollm2-135m"), InstructionData(tokenizer="smollm2-135m"))
    """

    def __init__(
        self,
        config: PruneConfig | None = None,
        schedule: dict[int, float] | str | None = None,
        calibration: str | None = None,
        num_samples: int = 16,
        seq_len: int = 128,
    ) -> None:
        self.config = config or PruneConfig()  # checked when it was made
        problems = []
        if num_samples < 1:
            problems.append(f"`num_samples` must be >= 1; got {num_samples}")
        if seq_len < 2:
            problems.append(f"`seq_len` must be >= 2; got {seq_len}")
        if self.config.moe and schedule is not None:
            problems.append(
                "`config.experts` / `config.expert_channels` prune experts once, at fit start: drop `schedule` "
                f"({schedule!r}), or prune the experts first with `llmp prune --experts`"
            )
        try:
            self.targets = self._targets(schedule, self.config.fraction)
        except LlmpError as err:
            problems.append(str(err))
        raise_all(problems)
        self.schedule, self.calibration = schedule, calibration
        self.num_samples, self.seq_len = num_samples, seq_len
        self.done: list[int] = []  # epochs whose pruning step ran

    @staticmethod
    def _targets(schedule: dict[int, float] | str | None, final: float) -> dict[int, float]:
        """Epoch → cumulative ratio of the original parameters removed by then."""
        if schedule is None:
            return {0: final}
        if isinstance(schedule, str):
            kind, _, n = schedule.partition(":")
            if kind not in RAMPS or not n.isdigit() or int(n) < 1:
                raise LlmpError(f"`schedule` must be a mapping, 'linear:N' or 'cubic:N' (N >= 1); got {schedule!r}")
            n = int(n)
            curve = (lambda t: t) if kind == "linear" else (lambda t: 1 - (1 - t) ** 3)
            return {k - 1: round(final * curve(k / n), 6) for k in range(1, n + 1)}
        targets = {int(e): float(r) for e, r in dict(schedule).items()}
        ordered = [targets[e] for e in sorted(targets)]
        if not targets or min(targets) < 0 or any(not 0 < r < 1 for r in ordered):
            raise LlmpError(f"`schedule` needs epochs >= 0 and ratios in (0, 1); got {schedule!r}")
        if ordered != sorted(ordered) or len(set(ordered)) != len(ordered):
            raise LlmpError(f"`schedule` ratios must grow from epoch to epoch (cumulative); got {schedule!r}")
        if abs(ordered[-1] - final) > 1e-9:
            raise LlmpError(
                f"`schedule` ends at ratio {ordered[-1]} but `config.ratio` is {final}: the last step prunes to "
                f"the final ratio; make them equal (e.g. {{..., {max(targets)}: {final}}})"
            )
        return targets

    # -- hooks: a few lines each ----------------------------------------------------------------

    @override
    def setup(self, trainer: L.Trainer, pl_module: Prunable, stage: str) -> None:
        if stage != "fit":
            return
        self._check_strategy(trainer)
        self.check_epochs(trainer)
        pl_module.load_base()
        pl_module.start_schedule(
            dataclasses.asdict(self.config.resolved(pl_module.base_model)),  # what each step runs
            {str(epoch): ratio for epoch, ratio in self.targets.items()},
            Calibration(str(self.calibration or "datamodule"), self.num_samples, self.seq_len),
        )
        resumed = self._resumed(trainer)
        if resumed is not None:  # rebuild the checkpoint's shapes; its weights load next
            saved, self.done = resumed
            if (saved.steps if saved else []) != pl_module.record.steps:
                pl_module.rebuild(saved)
            return
        if 0 in self.targets and 0 not in self.done:
            self._step(trainer, pl_module, 0, rewrap=False)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Prunable) -> None:
        epoch = trainer.current_epoch
        if epoch in self.targets and epoch not in self.done:
            self._step(trainer, pl_module, epoch, rewrap=True)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"done": list(self.done), "targets": self.targets}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("targets") not in (None, self.targets):
            log.warning("resuming with another pruning schedule than the checkpoint's; the new one applies")
        self.done = list(state_dict.get("done", []))

    # -- the work -------------------------------------------------------------------------------

    def check_epochs(self, trainer: L.Trainer) -> None:
        """Refuse a scheduled epoch the fit never reaches (before the model loads)."""
        last = trainer.max_epochs
        late = sorted(e for e in self.targets if last is not None and last >= 0 and e >= last)
        if late:
            raise LlmpError(
                f"`schedule` prunes at epoch(s) {late}, but the fit ends after `trainer.max_epochs` {last} "
                f"(epochs 0..{last - 1}); raise max_epochs to at least {late[-1] + 1} or move those steps earlier"
            )

    def _check_strategy(self, trainer: L.Trainer) -> None:
        iterative = any(e > 0 for e in self.targets)
        strategy = trainer.strategy
        if iterative and isinstance(strategy, DeepSpeedStrategy | FSDPStrategy):
            raise LlmpError(
                f"`schedule` {self.schedule!r} prunes in the middle of the fit, but {type(strategy).__name__} "
                "partitions parameters, gradients or optimizer states into buffers built at setup, so their "
                "shapes cannot change mid-fit. Run the schedule as "
                "successive fits (one `llmp fit` per step, each starting from the last one's output "
                "folder), or use the ddp strategy"
            )
        if iterative and not isinstance(strategy, DDPStrategy | SingleDeviceStrategy):
            raise LlmpError(
                f"iterative pruning supports the single-device and ddp strategies; got {type(strategy).__name__}"
            )

    def _resumed(self, trainer: L.Trainer) -> tuple[PruningRecord | None, list[int]] | None:
        """The pruning record of the checkpoint a fit resumes from (``trainer.ckpt_path``), and
        the epochs whose step it had done."""
        path = trainer.ckpt_path
        if not path:
            return None
        entry = read_entry(path)
        if entry is None:  # not a RecoveryModule's: nothing pruned
            return None, []
        # Read at setup, before load_state_dict restores `done`: an epoch reached without a step re-checks it.
        return entry.record, entry.pruned_epochs()

    def _step(self, trainer: L.Trainer, pl_module: Prunable, epoch: int, rewrap: bool) -> None:
        if rewrap:
            pl_module.merge_adapters()
        model = pl_module.base_model
        original, current = pl_module.record.params_before, count_parameters(model)
        moe_kinds = {Kind.EXPERTS.value, Kind.EXPERT_CHANNELS.value}
        experts_left = self.config.moe and not any(moe_kinds & set(s.kinds) for s in pl_module.record.steps)
        if not experts_left and self.targets[epoch] * original <= original - current:  # already there
            self.done.append(epoch)
            return
        config = dataclasses.replace(self.config, ratio=self.targets[epoch], steps=1)  # of the original
        model.to(trainer.strategy.root_device)
        calibration = self._calibration(trainer, pl_module) if config.needs_calibration else None
        log.info(
            "epoch %d: pruning to %.1f%% of the original parameters removed (%s criterion%s)",
            epoch,
            100 * self.targets[epoch],
            config.resolved(model).criterion,
            f", {len(calibration)} x {calibration.shape[1]} calibration tokens" if calibration is not None else "",
        )
        strategy = trainer.strategy
        result = prune(
            model, config, calibration, agree=lambda plan: strategy.broadcast(plan, src=0), reference_params=original
        )
        pl_module.add_pruning(result, epoch, self.targets[epoch])
        self.done.append(epoch)
        params = count_parameters(model)
        metrics = {
            "pruning/params_before": float(current),
            "pruning/params": float(params),
            "pruning/ratio": 1 - params / original,
            "pruning/step": float(len(self.done)),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        log.info(
            "rank %d pruned at epoch %d: %s -> %s parameters (%.2f%% of the original removed), plan %s",
            trainer.global_rank,
            epoch,
            f"{current:,}",
            f"{params:,}",
            100 * metrics["pruning/ratio"],
            plan_digest(result.steps[0].plan),
        )
        if rewrap:
            pl_module.prepare()
            self._rewrap(trainer, pl_module)

    def _rewrap(self, trainer: L.Trainer, pl_module: Prunable) -> None:
        """New parameters: the precision's dtype (``bf16-true``), a new DDP wrapper, and new
        optimizers (their state starts empty)."""
        strategy = trainer.strategy
        strategy.precision_plugin.convert_module(pl_module)
        pl_module.to(strategy.root_device)
        if isinstance(strategy, DDPStrategy):
            strategy.model = pl_module
            strategy.configure_ddp()
        strategy.setup_optimizers(trainer)

    def _calibration(self, trainer: L.Trainer, pl_module: Prunable) -> torch.Tensor:
        n, length = self.num_samples, self.seq_len
        if self.calibration is not None:
            from llmp.data import calibration_samples

            return calibration_samples(self.calibration, pl_module.tokenizer, n, length, self.config.seed)
        data = trainer.datamodule
        if data is None:
            raise LlmpError(
                "StructuredPruning needs calibration text: set `calibration` (a text file or c4), "
                "or fit with a datamodule"
            )
        loader = data.calibration_dataloader() if hasattr(data, "calibration_dataloader") else data.train_dataloader()
        return loader_samples(loader, n, length)
