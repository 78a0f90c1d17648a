"""``llmp fit``: prune → recover → save → evaluate, read from a recipe (LightningCLI).

Every YAML key can be overridden on the command line (``--trainer.max_epochs 1``). Under
``fabric run`` (torchrun) the launcher's ``LT_*`` settings are mapped onto the Trainer, so N
launched processes form one N-process job::

    fabric run --accelerator cpu --devices 2 --strategy ddp recipes/launch.py --config recipes/X.yaml

After the fit, rank 0 merges the adapters and writes ``--output`` (the folder ``llmp prune``
writes), then measures perplexity of the dense, pruned and recovered models (``--eval.*``) into
its ``pruning_report.json``. DeepSpeed runs save a ZeRO checkpoint first, which is consolidated
to fp32 and turned back into the pruned model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from llmp import (
    fitsave,
    outdir,
    strategies,  # noqa: F401 (registers the llmp_deepspeed* strategy names)
)
from llmp.checkpoints import weights_only_loads
from llmp.data import calibration_samples, read_text
from llmp.data.recovery import RecoveryData
from llmp.errors import LlmpError, raise_all
from llmp.eval.stages import Stages
from llmp.export import beside, check_export, export
from llmp.models import input_paths, load_model
from llmp.outcheck import check_output_dir, check_space, weights_bytes
from llmp.outdir import write_atomic
from llmp.pruning import PruneConfig, prune, replay
from llmp.record import Perplexity, Recovery, read_record, write_record
from llmp.recovery import RecoveryModule
from llmp.report import write_report
from llmp.targets import export_problems
from llmp.workflow import check_data

log = logging.getLogger(__name__)

# What `fabric run` sets (only Fabric reads it) → the Trainer argument it means.
LAUNCHER_ENV = {
    "LT_ACCELERATOR": "accelerator",
    "LT_DEVICES": "devices",
    "LT_STRATEGY": "strategy",
    "LT_PRECISION": "precision",
    "LT_NUM_NODES": "num_nodes",
}


@dataclass
class EvalSettings:
    """Perplexity measured by rank 0 after the fit.

    Attributes:
        data: text to measure on: a file, or ``wikitext2`` (shipped head of the test set);
            ``None`` skips evaluation.
        seq_len: tokens per window (the paper: 128).
        max_tokens: use the first N tokens of the text (``None``: all).
        dense: also measure the model before pruning (one more load).
        samples: greedy generations of each model for the report's side-by-side (0: none).
    """

    data: str | None = "wikitext2"
    seq_len: int = 128
    max_tokens: int | None = 16384
    dense: bool = True
    samples: int = 3

    def problems(self) -> list[str]:
        """What would fail only after the whole fit, each naming the key, the value and the fix."""
        problems = []
        try:
            check_data("eval.data", self.data)
        except LlmpError as err:
            problems.append(str(err))
        if self.seq_len < 2:
            problems.append(f"`eval.seq_len` must be at least 2; got {self.seq_len}")
        if self.max_tokens is not None and self.max_tokens < 1:
            problems.append(f"`eval.max_tokens` must be a positive number of tokens or null; got {self.max_tokens}")
        if self.samples < 0:
            problems.append(f"`eval.samples` must be 0 (none) or more; got {self.samples}")
        return problems


def launcher_args(environ: dict[str, str] | None = None) -> list[str]:
    """Trainer arguments from ``fabric run``'s ``LT_*`` variables (empty outside it).

    DeepSpeed names map to llmp's strategy of the same stage, which also runs on CPU.
    """
    environ = os.environ if environ is None else environ
    args = []
    for var, name in LAUNCHER_ENV.items():
        value = environ.get(var)
        if not value:
            continue
        if name == "strategy" and value.startswith("deepspeed"):
            value = f"llmp_{value}" if value != "deepspeed" else "llmp_deepspeed"
        args.append(f"--trainer.{name}={value}")
    return args


class FitCLI(LightningCLI):
    def parse_arguments(self, parser, args) -> None:
        # `llmp fit` always passes its arguments as `args` (sys.argv holds `llmp fit ...` too):
        # parse them without LightningCLI's warning about both.
        self.config = parser.parse_args(args)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--output", type=str | None, default=None, help="model folder to write after the fit")
        parser.add_argument("--overwrite", type=bool, default=False, help="replace --output if it exists")
        parser.add_argument("--ckpt_path", type=str | None, default=None, help="Lightning checkpoint to resume from")
        parser.add_argument(
            "--export",
            type=Literal["gguf", "decilm"] | None,
            default=None,
            help="also write OUTPUT.gguf (llama.cpp) or the folder OUTPUT.decilm (vLLM) after the fit",
        )
        parser.add_argument("--export_dtype", type=str, default="auto", help="auto, f32, f16, bf16 or q8_0 (gguf)")
        parser.add_dataclass_arguments(EvalSettings, "eval")
        parser.link_arguments("model.model", "data.tokenizer")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    overrides = launcher_args()
    if overrides:
        log.info("fabric run settings mapped onto the Trainer: %s", " ".join(overrides))

    def work() -> int:
        cli = FitCLI(
            RecoveryModule,
            RecoveryData,
            args=argv + overrides,
            run=False,
            seed_everything_default=42,
            save_config_callback=None,  # the resolved recipe is saved into --output instead
            parser_kwargs={"prog": "llmp fit"},
        )
        return _run(cli)

    return outdir.run_command(work)  # Lightning sets its own SIGTERM handler while it trains


def _run(cli: FitCLI) -> int:

    config, trainer, module = cli.config, cli.trainer, cli.model
    output = Path(config.output) if config.output else None
    _check_outputs(config, trainer, module, output)
    for callback in trainer.callbacks:  # a schedule the fit never reaches, before the data is tokenized
        if hasattr(callback, "check_epochs"):
            callback.check_epochs(trainer)
    if config.ckpt_path:
        # Set before `fit`, so StructuredPruning sees it at setup and rebuilds the pruned shapes.
        trainer.ckpt_path = _checkpoint_path(trainer, config.ckpt_path)
    start = time.perf_counter()
    # Lightning loads a checkpoint file with weights_only; DeepSpeed's own resume asks for full
    # unpickling: every load of the resumed checkpoint takes tensors and plain data only.
    with weights_only_loads() if trainer.ckpt_path else contextlib.nullcontext():
        try:
            trainer.fit(module, datamodule=cli.datamodule)
        except (KeyboardInterrupt, SystemExit) as stop:
            # Lightning turns SIGTERM and Ctrl-C into its own shutdown and `exit(1)`: say what is kept, exit 130.
            if not (isinstance(stop, KeyboardInterrupt | SIGTERMException) or trainer.interrupted):
                raise
            _interrupted(trainer)
            raise KeyboardInterrupt from stop
    fit_s = time.perf_counter() - start
    module.teacher = None  # its memory, before the export and the evaluation load models again
    if output is None:
        return _leave()
    recovery = _recovery(module, trainer, fit_s)
    fitsave.save(trainer, module, output, recovery, config.overwrite)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return _leave()
    write_atomic(output / "recipe.yaml", cli.parser.dump(config, skip_none=False))  # what produced it
    if config.eval.data:
        evaluate(output, EvalSettings(**vars(config.eval)))
    print(f"saved {output}; summary in {write_report(output)[0]}")
    if config.export:
        result = export(output, config.export, beside(output, config.export), config.export_dtype, config.overwrite)
        print(f"exported to {result.path} ({config.export}, {result.details['dtype']})")
    return _leave()


def _leave() -> int:
    """Tear the process group down before the interpreter does: a rank that exits with gloo's
    threads alive aborts ("terminate called without an active exception"), and the launcher then
    fails the job after its work is done. No collective follows: destroying it is local."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def _check_outputs(config, trainer, module, output: Path | None) -> None:
    """Everything the run will write, checked before hours of training, not after."""
    if config.export and output is None:
        raise LlmpError(f"`--export {config.export}` exports the saved model: give `--output` too")
    if output is None:
        return
    check_output_dir(output, config.overwrite, input_paths(module.spec), flag="--output")
    # at most the dense weights (and their export beside them)
    check_space(output, weights_bytes(input_paths(module.spec)) * (2 if config.export else 1), flag="--output")
    raise_all(EvalSettings(**vars(config.eval)).problems())
    if config.export:
        check_export(
            output, config.export, beside(output, config.export), config.export_dtype, config.overwrite,
            dtype_name="export_dtype",
        )  # fmt: skip
        pruning = [c.config for c in trainer.callbacks if isinstance(getattr(c, "config", None), PruneConfig)]
        raise_all([p for c in pruning for p in export_problems(c, config.export)])


def _recovery(module: RecoveryModule, trainer, fit_s: float) -> Recovery:
    """The record's account of the training that just ended."""
    return Recovery(
        mode=module.mode,
        lora=asdict(module.lora) if module.mode == "lora" else None,
        learning_rate=module.learning_rate,
        distill=asdict(module.distill) if module.distill is not None else None,
        epochs=trainer.current_epoch,
        optimizer_steps=trainer.global_step,
        world_size=trainer.world_size,
        strategy=type(trainer.strategy).__name__,
        precision=str(trainer.precision),
        fit_s=round(fit_s, 2),
        val_ppl=_metric(trainer, "val_ppl"),
    )


def _interrupted(trainer) -> None:
    """The checkpoints a stopped fit leaves (resume with ``--ckpt_path last``), for the interruption message."""
    kept = [Path(c.last_model_path or c.best_model_path) for c in trainer.checkpoint_callbacks]
    kept = [path for path in kept if str(path) not in ("", ".") and path.exists()]
    outdir.WRITTEN.extend(kept)
    hint = "resume with `--ckpt_path last`" if kept else "no checkpoint was written (enable one to resume)"
    print(f"training stopped (SIGTERM or Ctrl-C); {hint}", file=sys.stderr)


def _checkpoint_path(trainer, value: str) -> str | None:
    """``last``: the newest ``last*.ckpt`` in the folders of the recipe's ModelCheckpoint callbacks
    (none yet starts afresh, so a requeued job can always pass it); ``hpc``: SLURM's newest
    ``hpc_ckpt_N.ckpt`` in the Trainer's ``default_root_dir``; a path unchanged. Resolved here,
    before ``fit``, so that StructuredPruning sees the path at setup (Lightning resolves these
    names only after setup).

    Raises:
        LlmpError: ``hpc`` without an HPC checkpoint, or a path that does not exist.
    """
    if value == "last":
        found = [
            path
            for callback in trainer.checkpoint_callbacks
            if isinstance(callback, ModelCheckpoint) and callback.dirpath
            for path in Path(callback.dirpath).glob(f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}")
        ]
        if not found:
            log.info("`--ckpt_path last`: no last checkpoint yet, so the fit starts from the beginning")
            return None
        return str(max(found, key=lambda p: p.stat().st_mtime))
    if value == "hpc":
        versions = {int(m.group(1)): p for p in Path(trainer.default_root_dir).glob("hpc_ckpt_*.ckpt")
                    if (m := re.fullmatch(r"hpc_ckpt_(\d+)", p.stem))}  # fmt: skip
        if not versions:
            raise LlmpError(f"`--ckpt_path hpc`: no hpc_ckpt_N.ckpt in {trainer.default_root_dir}")
        return str(versions[max(versions)])
    if not Path(value).exists():
        raise LlmpError(f"`--ckpt_path` {value} does not exist: give a checkpoint file or folder, `last` or `hpc`")
    return value


def _metric(trainer, name: str) -> float | None:
    value = trainer.callback_metrics.get(name)
    return round(float(value), 4) if value is not None else None


def prune_again(model, tokenizer, record):
    """``model`` (the dense original) pruned as ``record`` did, without recovery; ``None`` where no
    such model exists.

    The recorded removals are replayed. Compensation refits the kept weights to values no plan
    holds, so a one-step compensated run is pruned again with its settings and calibration text.
    Pruning is deterministic, so this gives the same model; its plan is checked against the record.
    Several compensated steps refit a model trained in between: ``None``. Calibration from the
    datamodule cannot be drawn again: the replayed model lacks the refit and a warning says so.
    """
    known = {f.name for f in dataclasses.fields(PruneConfig)}  # an older record may hold other keys
    settings = {k: v for k, v in record.settings.items() if k in known}
    config = PruneConfig(**settings).resolved(model) if settings else None
    compensated = config is not None and config.compensate != "none"
    if compensated and len(record.steps) > 1:
        return None
    calibration = record.calibration
    if compensated and len(record.steps) == 1 and calibration and calibration.source != "datamodule":
        step = record.steps[0]
        tokens = calibration_samples(
            calibration.source, tokenizer, calibration.num_samples, calibration.seq_len, config.seed
        )
        config = dataclasses.replace(config, ratio=step.target_ratio or config.fraction, steps=1)
        if step.allocation is not None and step.allocation.generations:  # the same search, not the same time
            config = dataclasses.replace(config, search_generations=step.allocation.generations, search_seconds=1e9)
        again = prune(model, config, tokens, reference_params=record.params_before)
        if again.steps[0].plan == step.plan:
            return model
        log.warning("pruning again gave another plan than the record's; measuring the replayed removals")
        model, _ = load_model(record.model)
    replay(model, record.steps)
    if compensated:
        log.warning("the `pruned` perplexity is of the removals without the compensation's refit")
    return model


def evaluate(output: Path, settings: EvalSettings) -> Perplexity:
    """Perplexity of the dense, pruned (no recovery) and recovered models, into the folder's record."""
    record = read_record(output)
    stages = Stages(
        str(settings.data), read_text(settings.data), settings.seq_len, settings.max_tokens, settings.samples
    )

    def measure(stage: str, model, tokenizer) -> None:
        print(f"perplexity {stage:>9}: {stages.measure(stage, model, tokenizer):.2f}")

    with torch.inference_mode(False):
        model, tokenizer = load_model(record.model)
        if settings.dense:
            measure("dense", model, tokenizer)
        model = prune_again(model, tokenizer, record)
        if model is None:
            print(f"perplexity    pruned: none ({len(record.steps)} steps refit a model trained in between)")
        else:
            measure("pruned", model, tokenizer)
        del model
        model, tokenizer = load_model(str(output))
        measure("recovered", model, tokenizer)
    stages.write(record)
    write_record(output, record)
    return record.perplexity
