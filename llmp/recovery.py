"""Recovery training: a LightningModule around a (pruned) Hugging Face causal LM.

Two modes: ``lora`` (peft adapters on every linear layer but the head, the paper's setting:
r 8, alpha 16, dropout 0.05, lr 1e-4) and ``full`` fine-tuning. The module owns the
:class:`~llmp.record.PruningRecord` of the run (which pruning steps were applied to the base
model), so a Lightning checkpoint can be turned back into the right shapes, and :meth:`RecoveryModule.export` merges the
adapters and writes the same folder as ``llmp prune``.

Example::

    module = RecoveryModule("smollm2-135m", mode="lora")
    trainer = L.Trainer(max_epochs=2, callbacks=[StructuredPruning(PruneConfig(ratio=0.2))])
    trainer.fit(module, InstructionData("alpaca-1k", tokenizer="smollm2-135m"))
    module.export("out/recovered")
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from peft import PeftModel, get_peft_model
from torchmetrics.text import Perplexity

from llmp.checkpoints import CHECKPOINT_KEY, CheckpointEntry, entry_of, read_trained
from llmp.distill import DistillSettings, Teacher, recovery_loss
from llmp.errors import LlmpError, raise_all
from llmp.io import save_pruned
from llmp.lora import LoraSettings
from llmp.models import input_paths, load_model
from llmp.outcheck import check_output_dir
from llmp.outdir import temp_dir
from llmp.pruning import RunInput, count_parameters, replay, unpruned_record
from llmp.record import Calibration, PruningRecord, Recovery
from llmp.structure import adapter_for

log = logging.getLogger(__name__)


class RecoveryModule(L.LightningModule):
    """Recover a pruned model's quality by LoRA or full fine-tuning, on the language-model loss or
    by distillation from the unpruned model (``distill``).

    Args:
        model: the model to train: a folder (pruned by ``llmp prune`` or not), a built-in name,
            a ``.gguf`` file or a hub id. A :class:`~llmp.callbacks.StructuredPruning` callback
            prunes it at fit start.
        mode: ``lora`` (adapters, merged at export) or ``full`` (every weight trains).
        lora: adapter settings for ``mode=lora``.
        learning_rate: peak learning rate (the paper: 1e-4 for LoRA).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up optimizer steps, then linear decay to 0 at the last step.
        gradient_checkpointing: recompute activations in the backward pass to save memory.
        dtype: dtype of the loaded weights (``bfloat16`` halves memory; use a Trainer precision
            of ``bf16-true`` or ``bf16-mixed`` with it).
        seed: initialises the LoRA adapters (offset by the pruning steps done), so a resumed fit
            re-creates the adapters an uninterrupted one did.
        distill: distil from a teacher (by default the model as loaded, before any pruning, which
            stays the dense original across a pruning schedule); ``None``: the language-model loss
            only. See :mod:`llmp.distill`.
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        mode: Literal["lora", "full"] = "lora",
        lora: LoraSettings | None = None,
        learning_rate: float = 1e-4,
        weight_decay: float = 0.0,
        warmup_steps: int = 100,
        gradient_checkpointing: bool = False,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        seed: int = 0,
        distill: DistillSettings | None = None,
    ) -> None:
        super().__init__()
        lora = lora or LoraSettings()
        problems = []
        if mode not in ("lora", "full"):
            problems.append(f"`mode` must be lora or full; got {mode!r}")
        if learning_rate <= 0:
            problems.append(f"`learning_rate` must be > 0; got {learning_rate}")
        if weight_decay < 0:
            problems.append(f"`weight_decay` must be >= 0; got {weight_decay}")
        if warmup_steps < 0:
            problems.append(f"`warmup_steps` must be >= 0; got {warmup_steps}")
        problems += lora.problems()
        if dtype not in ("float32", "bfloat16", "float16"):
            problems.append(f"`dtype` must be float32, bfloat16 or float16; got {dtype!r}")
        if distill is not None:
            problems += distill.problems()
        raise_all(problems)
        self.spec, self.mode, self.lora = str(model), mode, lora
        self.learning_rate, self.weight_decay, self.warmup_steps = learning_rate, weight_decay, warmup_steps
        self.gradient_checkpointing, self.dtype_name, self.seed = gradient_checkpointing, dtype, seed
        self.model = None  # the Hugging Face model (a peft model in LoRA mode), loaded in setup
        self.tokenizer = None
        # What was pruned so far (steps, settings, shapes before and now), made when the model loads.
        self.record: PruningRecord | None = None
        self.val_ppl = Perplexity(ignore_index=-100)
        self.distill = distill
        # Frozen, outside the registered children: in no optimizer, state dict, checkpoint or engine.
        self.teacher: Teacher | None = None
        self.teacher_cache = None  # its top-k logits from disk (`distill.cache`), read at fit start

    # -- the model ------------------------------------------------------------------------------

    def load_base(self) -> None:
        """Load the model and tokenizer named by ``model`` (once)."""
        if self.model is not None:
            return

        self.model, self.tokenizer = load_model(self.spec, getattr(torch, self.dtype_name))
        self.model.config.use_cache = False
        self.model.train()
        self.record = unpruned_record(self.model, RunInput(self.spec))
        top_k = self.distill.top_k if self.distill is not None else None
        vocab = self.model.get_output_embeddings().weight.shape[0]
        if top_k is not None and top_k > vocab:
            raise LlmpError(
                f"`distill.top_k` {top_k} exceeds the model's vocabulary ({vocab:,} tokens); give at most {vocab}"
            )
        cached = self.distill is not None and self.distill.cache is not None and Path(self.distill.cache).is_file()
        if self.distill is not None and self.teacher is None and not cached:  # before any pruning: the dense model
            self.teacher = Teacher.for_student(self.distill, self.model, self.spec, self.tokenizer)

    @property
    def base_model(self):
        """The Hugging Face model without LoRA wrapping (the one pruning operates on)."""
        self.load_base()
        return self.model.get_base_model() if self.is_lora_wrapped else self.model

    @property
    def is_lora_wrapped(self) -> bool:

        return isinstance(self.model, PeftModel)

    def add_adapters(self) -> None:
        """Wrap the model with fresh LoRA adapters (``mode=lora``); the base weights freeze."""
        if self.mode != "lora" or self.is_lora_wrapped:
            return

        config = self.lora.peft_config(self.model)
        # Seeded by the pruning step: a resumed fit re-creates the adapters an uninterrupted one did.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + len(self.record.steps))
            self.model = get_peft_model(self.model, config)

    def merge_adapters(self) -> None:
        """Fold the LoRA updates into the base weights and drop the adapters."""
        if self.is_lora_wrapped:
            self.model = self.model.merge_and_unload()

    def prepare(self) -> None:
        """Ready the (pruned) model for training: LoRA adapters, gradient checkpointing."""
        self.add_adapters()
        if self.gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.is_lora_wrapped:
                self.model.enable_input_require_grads()

    def setup(self, stage: str) -> None:
        self.load_base()
        self.prepare()

    def on_fit_start(self) -> None:
        if self.distill is not None and self.distill.cache is not None:
            self.teacher_cache = self.read_teacher_cache()
            self.teacher = None  # the cache stands in for it

    def read_teacher_cache(self):
        """The ``distill.cache`` of this fit's training examples; rank 0 computes it first when
        the file does not exist (the other ranks wait).

        Raises:
            LlmpError: the fit's data is not a RecoveryData, or the file was made for other data.
        """
        from llmp.data.recovery import RecoveryData
        from llmp.distill import original_of, select_rows
        from llmp.teacher_cache import TeacherCache, fingerprint

        data, settings = self.trainer.datamodule, self.distill
        if not isinstance(data, RecoveryData):
            raise LlmpError("`distill.cache` needs the fit's data from llmp.data.RecoveryData (a datamodule)")
        source = settings.teacher or original_of(self.spec) or self.spec
        key = fingerprint(data.train_set, source, settings.top_k, settings.tokens)
        path = Path(settings.cache)
        if not path.is_file() and self.trainer.is_global_zero:
            if self.teacher is None:  # the file was there when the model loaded, so no teacher was kept
                raise LlmpError(f"`distill.cache` {path} disappeared after the model loaded: run the fit again")
            teacher = self.teacher
            teacher.to(self.model)
            start = time.perf_counter()
            cache = TeacherCache.build(
                teacher, data.train_set, data.collate, lambda b: select_rows(b, settings), settings.top_k
            )
            cache.write(path, key)
            log.info(
                "wrote the teacher's top-%d logits of %d examples to %s in %.1f s",
                settings.top_k,
                len(data.train_set),
                path,
                time.perf_counter() - start,
            )
        self.trainer.strategy.barrier()
        return TeacherCache.read(path, key)

    # -- training -------------------------------------------------------------------------------

    def forward(self, **batch: torch.Tensor):
        return self.model(**{k: v for k, v in batch.items() if k != "example"})

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.teacher is not None:
            self.teacher.to(self.model, self.global_rank)
        loss, parts = recovery_loss(self.model, batch, self.distill, self.teacher, self.teacher_cache)
        size = batch["input_ids"].shape[0]
        self.log("train_loss", loss, prog_bar=True, batch_size=size)
        if self.distill is not None:
            self.log_dict({f"train_{k}": v for k, v in parts.items()}, batch_size=size)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        labels = batch["labels"]
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        self.val_ppl.update(logits[:, :-1].float(), labels[:, 1:])
        # Logged as a metric object: Lightning computes it over all ranks at epoch end, then resets it.
        self.log("val_ppl", self.val_ppl, on_step=False, on_epoch=True, prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise LlmpError("no trainable parameters: `mode` lora found no `lora.target_modules` in the model")
        optimizer = torch.optim.AdamW(params, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = max(1, int(self.trainer.estimated_stepping_batches))

        def factor(step: int) -> float:  # step: optimizer steps of the whole fit
            if step < self.warmup_steps:
                return (step + 1) / (self.warmup_steps + 1)
            return max(0.0, (total - step) / max(1, total - self.warmup_steps))

        # The scheduler counts the fit's steps, not its own: an optimizer rebuilt after pruning
        # between epochs continues the schedule, and a checkpoint of a rebuilt one resumes it.
        for group in optimizer.param_groups:
            group["initial_lr"] = group["lr"]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=self.trainer.global_step - 1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # -- checkpoints ----------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The record's shapes were taken at each pruning step: under ZeRO-3 the live weights are partitioned.
        entry = CheckpointEntry(self.spec, self.mode, self.lora, self.dtype_name, self.record, self.distill)
        checkpoint[CHECKPOINT_KEY] = entry.to_json()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        entry = entry_of(checkpoint)
        if entry is None or entry.record.steps == self.record.steps:
            return
        saved = entry.record
        # The checkpoint's model was pruned differently from this one (a resume that did not go
        # through StructuredPruning's replay): rebuild its shapes before its weights load.
        if self._trainer is not None and self.trainer.strategy.restore_checkpoint_after_setup:
            raise LlmpError(
                "this checkpoint's pruned shapes differ from the model's, and the strategy "
                f"({type(self.trainer.strategy).__name__}) builds its engine before loading checkpoints: "
                "resume through `llmp fit --ckpt_path ...`, or set `trainer.ckpt_path` before `fit` so "
                "StructuredPruning rebuilds the shapes at setup"
            )
        if self.record.steps:
            # `trainer.fit(ckpt_path=...)` tells the callbacks the path only after setup, so the
            # model was pruned afresh first; `trainer.ckpt_path = ...` before `fit` avoids that.
            log.warning(
                "the checkpoint's pruning history differs from the model's: rebuilding its shapes "
                "(set `trainer.ckpt_path` before `fit` to skip the needless pruning at setup)"
            )
        self.rebuild(saved)

    def start_schedule(self, settings: dict, schedule: dict[str, float], calibration: Calibration) -> None:
        """What :class:`~llmp.callbacks.StructuredPruning` will run (resolved settings, epoch →
        ratio, calibration), kept in the record: the module is the record's one writer."""
        self.record.settings, self.record.schedule, self.record.calibration = settings, schedule, calibration

    def add_pruning(self, result: PruningRecord, epoch: int, target_ratio: float) -> None:
        """A pruning step the callback just applied at ``epoch``: into the record, which checkpoints carry."""
        (step,) = result.steps
        step.epoch, step.target_ratio = epoch, target_ratio
        self.record.extend(result)

    def rebuild(self, saved: PruningRecord | None) -> None:
        """Reload the original model and repeat ``saved``'s steps on it (``None``: none), ready to
        train (see :meth:`prepare`)."""
        started, self.model = self.record, None
        self.load_base()
        steps = list(saved.steps) if saved is not None else []
        replay(self.model, steps)
        plan = saved or started or self.record  # nothing pruned: the schedule already started
        adapter = adapter_for(self.model)
        self.record = dataclasses.replace(
            self.record,
            params_after=count_parameters(self.model),
            layer_shapes=adapter.layer_shapes(self.model),
            settings=plan.settings,
            hidden_size=self.model.config.hidden_size,
            num_layers=len(adapter.layers(self.model)),
            steps=steps,
            timings=_summed_timings(steps),
            calibration=plan.calibration,
            schedule=plan.schedule,
        )
        self.prepare()

    # -- export ---------------------------------------------------------------------------------

    def export(self, output: str | Path, recovery: Recovery | None = None, overwrite: bool = False) -> Path:
        """Merge adapters and save a model folder loadable with :func:`llmp.load_pruned`.

        The folder's pruning record lists the pruning steps and ``recovery`` (settings and
        results of the recovery run). ``overwrite`` replaces only a folder llmp wrote.
        """
        self.merge_adapters()
        model = self.model
        model.config.use_cache = True
        record = dataclasses.replace(self.record, recovery=recovery)
        return save_pruned(model, output, self.tokenizer, record, overwrite=overwrite, inputs=input_paths(self.spec))


def _summed_timings(steps) -> dict[str, float]:
    """Seconds per phase over ``steps`` (those done before a resume included)."""
    timings: dict[str, float] = {}
    for step in steps:
        for key, seconds in step.timings.items():
            timings[key] = round(timings.get(key, 0.0) + seconds, 4)
    return timings


def export_checkpoint(checkpoint: str | Path, output: str | Path, recovery: Recovery | None = None, overwrite=False):
    """Turn a Lightning checkpoint of a :class:`RecoveryModule` into a pruned model folder.

    A DeepSpeed ZeRO checkpoint (a folder of shards) is consolidated to fp32 first. The original
    model is loaded, the recorded pruning steps repeated, the adapters re-created, the trained
    weights loaded, and the adapters merged (see :meth:`RecoveryModule.export`).

    Raises:
        LlmpError: the checkpoint is unreadable or was not written by a RecoveryModule.
    """
    check_output_dir(output, overwrite)  # before the consolidation, which takes a while
    # The consolidated fp32 file goes beside the ZeRO folder: its file system held the larger shards.
    with temp_dir(checkpoint if Path(checkpoint).is_dir() else output) as scratch:
        state, entry = read_trained(checkpoint, scratch)
        module = RecoveryModule(entry.model, mode=entry.mode, lora=entry.lora, dtype=entry.dtype)
        module.rebuild(entry.record)
        module.load_state_dict(state["state_dict"])
        return module.export(output, recovery, overwrite=overwrite)
