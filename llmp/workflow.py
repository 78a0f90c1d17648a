"""``prune_folder``: what ``llmp prune`` does as a whole, as one library call.

::

    model ─► load ─► (perplexity, generations: dense) ─► calibration ─► prune ─► (perplexity,
        generations: pruned) ─► save + report.md ─► (export beside it)

    streamed: model folder ─► calibration ─► prune_streamed (read, prune, write a layer at a time)
        ─► report.md ─► (export beside it)

Every argument is checked, and the output claimed, before the model is read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from llmp import pruning
from llmp.errors import LlmpError, raise_all
from llmp.pruning import PruneConfig, RunInput
from llmp.pruning.experts import check_experts_config
from llmp.pruning.streamed import stream_problems
from llmp.record import Calibration, PruningRecord
from llmp.targets import export_problems


@dataclass
class PruneFolderResult:
    """Where the pruned model went, its record, and the export written beside it (if any)."""

    output: Path
    record: PruningRecord
    report: Path
    export: Path | None = None
    export_details: dict | None = None  # the export's dtype and its notes for the user
    prune_s: float = 0.0


def prune_folder(
    model: str,
    output: str | Path,
    config: PruneConfig,
    calibration: str = "c4",
    num_samples: int = 16,
    seq_len: int = 128,
    eval_data: str | None = None,
    eval_tokens: int = 16384,
    samples: int = 4,
    stream: bool = False,
    export: str | None = None,
    export_dtype: str = "auto",
    overwrite: bool = False,
    dtype: str = "auto",
) -> PruneFolderResult:
    """Prune ``model`` (a built-in name, folder, ``.gguf`` or hub id) into the folder ``output``.

    Args:
        model: the model to prune.
        output: the folder to write (weights, config, tokenizer, ``pruning_report.json``, ``report.md``).
        config: what to remove.
        calibration: calibration text: ``c4`` (built-in sample), a .txt/.jsonl file or a datasets id.
        num_samples: calibration samples.
        seq_len: tokens per calibration sample.
        eval_data: also measure perplexity before and after on this text (in memory only).
        eval_tokens: token budget of that perplexity.
        samples: greedy generations before and after, kept in the report (in memory only).
        stream: read, prune and write one decoder layer at a time (a local folder; activation criteria).
        export: also write the export of ``output`` beside it: ``gguf`` or ``decilm``.
        export_dtype: that export's weights.
        overwrite: replace an output (and export) that llmp wrote before.
        dtype: the weights' dtype (``auto`` keeps the checkpoint's).

    Raises:
        LlmpError: bad arguments (checked before the model is read), or as the steps it runs.
    """
    from llmp.models import input_paths, local_config
    from llmp.outlock import output_lock

    run = _Run(
        model, output, config, calibration, num_samples, seq_len, eval_data, eval_tokens, samples, overwrite, dtype
    )
    raise_all(run.problems(stream) + export_problems(config, export))
    calibration_file = check_data("calibration", calibration)
    eval_file = check_data("eval_data", eval_data)
    check_seq_len("seq_len", seq_len, model)
    check_experts_config(config, local_config(model))
    run.inputs = [*input_paths(model), calibration_file, eval_file]
    real = _check_outputs(run, export, export_dtype)
    with output_lock(real):  # held from here: a second run to the same output stops now
        result = _streamed(run, calibration_file) if stream else _in_memory(run, calibration_file, eval_file)
    if export:
        result = _export_beside(result, export, export_dtype, overwrite)
    return result


@dataclass
class _Run:
    """The arguments of one :func:`prune_folder` run, checked before anything is read."""

    model: str
    output: str | Path
    config: PruneConfig
    calibration: str
    num_samples: int
    seq_len: int
    eval_data: str | None
    eval_tokens: int
    samples: int
    overwrite: bool
    dtype: str
    inputs: list = field(default_factory=list)  # what the output must not overwrite

    def given(self, load_s: float | None = None) -> RunInput:
        """What the record keeps of this run's input (the calibration only where the criterion reads it)."""
        used = self.config.needs_calibration
        calibration = Calibration(str(self.calibration), self.num_samples, self.seq_len) if used else None
        local = Path(self.model).expanduser()
        model = str(local.resolve()) if local.exists() else self.model  # a teacher found from any folder later
        return RunInput(model, calibration, load_s)

    def problems(self, stream: bool) -> list[str]:
        """One message per bad argument (checked before the model is read)."""
        problems = [
            f"`{name}` must be a positive whole number; got {value}"
            for name, value in (("num_samples", self.num_samples), ("eval_tokens", self.eval_tokens))
            if value is None or value < 1
        ]
        if self.samples < 0:
            problems.append(f"`samples` must be 0 (none) or more; got {self.samples}")
        if self.seq_len < 2:
            problems.append(f"`seq_len` must be at least 2; got {self.seq_len}")
        if self.config.allocation == "search" and self.num_samples == 1:
            problems.append(
                f"`allocation` search judges candidates on calibration samples kept out of their statistics: "
                f"`num_samples` must be at least 2 (32 is usual); got {self.num_samples}"
            )
        if stream and self.eval_data:
            problems.append(
                "`stream` keeps one layer in memory, so it cannot measure perplexity before and after: drop "
                f"`eval_data` {self.eval_data} and run `llmp eval ppl --model OUTPUT --data {self.eval_data}` afterwards"
            )
        return problems + (stream_problems(self.config) if stream else [])


def check_data(name: str, source: str | None) -> str | None:
    """A data argument's file (built-in names resolved); a missing file is refused now, not after loading."""
    from llmp.data.resources import resolve

    if source is None:
        return None
    path = resolve(source)
    if (Path(path).suffix or str(source).startswith((".", "/", "~"))) and not Path(path).is_file():
        raise LlmpError(f"`{name}` file {source} does not exist; give a .txt/.jsonl file or a built-in name")
    return path


def check_seq_len(name: str, seq_len: int, spec: str) -> None:
    from llmp.models import max_positions

    limit = max_positions(spec)
    if limit is not None and seq_len > limit:
        raise LlmpError(
            f"`{name}` {seq_len} exceeds the model's max_position_embeddings ({limit}); give at most {limit}"
        )


def _check_outputs(run: _Run, export: str | None, export_dtype: str) -> Path:
    """The output (and its export beside it) may be written, and has room: checked before any work."""
    from llmp.models import input_paths
    from llmp.outcheck import check_output_dir, check_space, weights_bytes

    real = check_output_dir(run.output, run.overwrite, run.inputs, flag="output")
    kept = round(
        weights_bytes(input_paths(run.model)) * (1 - run.config.fraction)
    )  # the pruned weights, and their export
    check_space(real, kept * (2 if export else 1), flag="output")
    if export:
        from llmp.export import beside, check_export

        check_export(run.output, export, beside(real, export), export_dtype, run.overwrite, dtype_name="export_dtype")
    return real


def _in_memory(run: _Run, calibration_file: str | None, eval_file: str | None) -> PruneFolderResult:
    from llmp.data import calibration_samples, read_text
    from llmp.data.text import read_documents
    from llmp.eval.stages import Stages
    from llmp.io import save_pruned
    from llmp.models import load_model
    from llmp.report import write_report

    # Local data is read (and refused if unreadable) before the model loads.
    text = read_text(eval_file) if eval_file else None
    needed = run.config.needs_calibration
    source = read_documents(calibration_file) if needed and Path(calibration_file).is_file() else calibration_file
    t0 = time.perf_counter()
    model, tokenizer = load_model(run.model, run.dtype)
    load_s = time.perf_counter() - t0
    stages = Stages(str(run.eval_data) if text else None, text, 128, run.eval_tokens, run.samples)
    stages.measure("dense", model, tokenizer)
    t1 = time.perf_counter()
    calib = None
    if run.config.needs_calibration:
        calib = calibration_samples(source, tokenizer, run.num_samples, run.seq_len, run.config.seed)
    record = pruning.prune(model, run.config, calib, given=run.given(load_s))
    prune_s = time.perf_counter() - t1
    stages.measure("pruned", model, tokenizer)
    stages.write(record)
    out = save_pruned(model, run.output, tokenizer, record, overwrite=run.overwrite, inputs=run.inputs)
    return PruneFolderResult(out, record, write_report(out)[0], prune_s=prune_s)


def _streamed(run: _Run, calibration_file: str | None) -> PruneFolderResult:
    from llmp.data import calibration_samples
    from llmp.data.text import read_documents
    from llmp.models import model_folder, resolve_dtype
    from llmp.outdir import real_path
    from llmp.report import write_report

    source = read_documents(calibration_file) if Path(calibration_file).is_file() else calibration_file
    folder, tokenizer = model_folder(run.model)
    t0 = time.perf_counter()
    calib = calibration_samples(source, tokenizer, run.num_samples, run.seq_len, run.config.seed)
    dtype = resolve_dtype(run.dtype)
    given = run.given()
    record = pruning.prune_streamed(folder, run.output, run.config, calib, tokenizer, given, run.overwrite, dtype)
    out = real_path(run.output)
    return PruneFolderResult(out, record, write_report(out)[0], prune_s=time.perf_counter() - t0)


def _export_beside(result: PruneFolderResult, format: str, dtype: str, overwrite: bool) -> PruneFolderResult:
    from llmp.export import beside, export

    done = export(result.output, format, beside(result.output, format), dtype, overwrite)
    result.export, result.export_details = done.path, done.details
    return result
