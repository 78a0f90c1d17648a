"""The ``llmp`` command: prune, eval ppl, eval tasks, report, generate, export.

Bad input ends with one ``error: ...`` line and exit status 2, before any model is loaded when
the problem can be seen without one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
import typing
from pathlib import Path

from llmp.errors import LlmpError, raise_all
from llmp.memory import return_freed_memory

TRUST_ENV = "LLMP_TRUST_REMOTE_CODE"
ALIASES = {"criterion": ("--importance",)}  # DESIGN.md's name for the option  # read by llmp.models.allow_remote_code

_DEFAULTS_NOTE = (
    "defaults: MLP channels of every layer but the first and last, scored by FLAP's fluctuation on 16 x 128 C4 "
    "tokens layer by layer, the kept columns refit by least squares (docs/pruning.md)"
)


def field_help(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings, as ``{field: one-line help}``."""
    import docstring_parser

    return {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(cls).params}


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`~llmp.PruneConfig` field, its help from the field's docstring
    (``llmp prune`` and ``bench/prune.py`` take the same options)."""
    from llmp.pruner import PruneConfig, literal_choices

    helps = field_help(PruneConfig)
    hints = typing.get_type_hints(PruneConfig)
    for field in dataclasses.fields(PruneConfig):
        flags = ["--" + field.name.replace("_", "-"), *ALIASES.get(field.name, ())]
        default, text = field.default, helps[field.name]
        choices = literal_choices(hints[field.name]) or None
        kinds = [t for t in typing.get_args(hints[field.name]) or (hints[field.name],) if t is not type(None)]
        if isinstance(default, bool) or kinds == [bool]:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            kind = kinds[0] if kinds and kinds[0] in (int, float, str) else str
            shown = f"{text} (default: {'unset' if default is None else default})"
            metavar = "{" + ",".join(choices) + "}" if choices else None  # checked by PruneConfig, with its message
            parser.add_argument(*flags, type=kind, default=default, metavar=metavar, help=shown)


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    from llmp.models import DTYPES

    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="the weights' dtype: auto keeps the checkpoint's (a bf16 model stays bf16, and is saved so); "
        "on a CPU without bf16 units bf16 is slower than float32 (default: auto)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmp", description="Structured pruning of LLMs (LLM-Pruner) with recovery.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model folder's own Python code (config.json `auto_map`) run; off by default: read that code first",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model and save it", description=_DEFAULTS_NOTE)
    p.add_argument("--model", required=True, help="built-in name (smollm2-135m), model folder, .gguf file or hub id")
    p.add_argument("--output", required=True, help="folder to write (safetensors, config, tokenizer, report)")
    p.add_argument(
        "--calibration",
        default="c4",
        help="calibration text: c4 (built-in sample), a .txt/.jsonl file, or a datasets id",
    )
    p.add_argument("--num-samples", type=int, default=16, help="calibration samples (paper: 10)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration sample (paper: 64)")
    p.add_argument("--eval-data", help="also measure perplexity before and after on this text (e.g. wikitext2)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="token budget of that perplexity")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.add_argument("--samples", type=int, default=4, help="greedy generations before/after shown in report.md")
    p.add_argument(
        "--stream",
        action="store_true",
        help="never hold the whole model: read, prune and write one decoder layer at a time (a local folder; "
        "criterion flap or wanda; implies --layerwise; no --eval-data, no samples: evaluate the output after)",
    )
    p.add_argument(
        "--export",
        choices=("gguf", "decilm"),
        help="also write OUTPUT.gguf (llama.cpp) or the folder OUTPUT.decilm (vLLM) after saving; "
        "`--target` keeps the pruning inside what that engine loads",
    )
    p.add_argument("--export-dtype", default="auto", help="weights of that export: auto, f32, f16, bf16, q8_0 (gguf)")
    add_dtype_arg(p)
    add_prune_args(p)

    e = sub.add_parser("eval", help="evaluate a model")
    esub = e.add_subparsers(dest="what", required=True)
    ppl = esub.add_parser("ppl", help="perplexity (non-overlapping windows, no BOS)")
    ppl.add_argument("--model", required=True)
    ppl.add_argument(
        "--data", required=True, help="text: wikitext2 (built-in sample), a .txt/.raw/.jsonl file or a datasets id"
    )
    ppl.add_argument("--seq-len", type=int, default=128)
    ppl.add_argument("--max-tokens", type=int, default=None, help="use only the first N tokens")
    ppl.add_argument("--json", action="store_true", help="print a JSON object (key `ppl`)")
    ppl.add_argument(
        "--engine",
        choices=("transformers", "llama.cpp"),
        default="transformers",
        help="llama.cpp: run a .gguf file (e.g. from `llmp export`) in llama.cpp itself, tokenized by "
        "llama.cpp, with the same windows (needs llama-cpp-python: bash scripts/install_llamacpp.sh)",
    )
    add_dtype_arg(ppl)
    tasks = esub.add_parser("tasks", help="zero-shot multiple-choice accuracies (lm-evaluation-harness)")
    tasks.add_argument("--model", required=True)
    tasks.add_argument(
        "--tasks", required=True, help="comma-separated, e.g. boolq,piqa,hellaswag,winogrande,arc_easy,openbookqa"
    )
    tasks.add_argument(
        "--data-dir", help="folder of local task files (offline); without it the harness's tasks load from the hub"
    )
    tasks.add_argument("--limit", type=int, default=None, help="score only the first N items of every task")
    tasks.add_argument("--batch-size", type=int, default=8)
    tasks.add_argument("--output", help="also write the JSON results here (`llmp report` reads DIR/tasks*.json)")
    tasks.add_argument("--json", action="store_true", help="print a JSON object (key `tasks`)")
    add_dtype_arg(tasks)

    r = sub.add_parser("report", help="write report.md and report.png into a pruned model folder")
    r.add_argument("dir", help="folder written by `llmp prune` or `llmp fit`")
    r.add_argument("--dense", help="dense model (spec) to generate from beside the pruned one, e.g. smollm2-135m")
    r.add_argument("--prompts", help="text file, one prompt per line (default: llmp's fixed prompts)")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt with --dense")

    x = sub.add_parser(
        "export",
        help="write a model folder for a serving engine: GGUF (llama.cpp) or DeciLM (vLLM)",
        description="GGUF: llama.cpp's `deci` architecture, every layer with its own head, KV-head and MLP "
        "counts. DeciLM: a folder vLLM's DeciLMForCausalLM serves (equal query heads in every layer).",
    )
    x.add_argument(
        "dir", help="folder written by `llmp prune` or `llmp fit`, a Hugging Face folder, or a built-in name"
    )
    x.add_argument("--format", required=True, help="gguf (llama.cpp) or decilm (vLLM)")
    x.add_argument("--output", required=True, help="the .gguf file (gguf) or the folder (decilm) to write")
    x.add_argument(
        "--dtype",
        default="auto",
        help="weights: auto (as stored), f32, f16, bf16, or q8_0 (gguf only; norms and biases stay f32)",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export that llmp wrote")

    g = sub.add_parser("generate", help="greedy text generation")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    add_dtype_arg(g)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--trust-remote-code", "fit"]:
        argv = argv[1:]
        os.environ[TRUST_ENV] = "1"
    if argv[:1] == ["fit"]:  # LightningCLI owns its own argument parsing
        from llmp.fit import main as fit_main

        return fit_main(argv[1:])
    args = _parser().parse_args(argv)
    return_freed_memory()
    if args.trust_remote_code:
        os.environ[TRUST_ENV] = "1"
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from llmp import outdir

    written = len(outdir.WRITTEN)
    try:
        with outdir.sigterm_as_interrupt():
            if args.command == "prune":
                return _prune(args)
            if args.command == "eval":
                return _eval_ppl(args) if args.what == "ppl" else _eval_tasks(args)
            if args.command == "report":
                return _report(args)
            if args.command == "export":
                return _export(args)
            return _generate(args)
    except LlmpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: {outdir.written_summary(since=written)}", file=sys.stderr)
        return 130


def _positive(args, *names: str, allow_none: bool = False) -> list[str]:
    """One message per ``--name`` that is not a positive whole number."""
    problems = []
    for name in names:
        value = getattr(args, name)
        if value is None and allow_none:
            continue
        if value is None or value < 1:
            problems.append(f"`--{name.replace('_', '-')}` must be a positive whole number; got {value}")
    return problems


def _check_data(flag: str, source: str | None) -> str | None:
    """A data argument's file (built-in names resolved); refuse a missing file now, not after loading."""
    from llmp.data.resources import resolve

    if source is None:
        return None
    path = resolve(source)
    if (Path(path).suffix or str(source).startswith((".", "/", "~"))) and not Path(path).is_file():
        raise LlmpError(f"`{flag}` file {source} does not exist; give a .txt/.jsonl file or a built-in name")
    return path


def _check_seq_len(flag: str, seq_len: int, spec: str) -> None:
    from llmp.models import max_positions

    limit = max_positions(spec)
    if limit is not None and seq_len > limit:
        raise LlmpError(
            f"`{flag}` {seq_len} exceeds the model's max_position_embeddings ({limit}); give at most {limit}"
        )


def _prune(args) -> int:
    from llmp.models import input_paths
    from llmp.outdir import check_output_dir, output_lock
    from llmp.pruner import PruneConfig

    problems = _positive(args, "num_samples", "eval_tokens")
    if args.samples < 0:
        problems.append(f"`--samples` must be 0 (none) or more; got {args.samples}")
    if args.stream and args.eval_data:
        problems.append(
            "`--stream` keeps one layer in memory, so it cannot measure perplexity before and after: drop "
            f"`--eval-data {args.eval_data}` and run `llmp eval ppl --model OUTPUT --data {args.eval_data}` afterwards"
        )
    if args.stream and args.criterion not in (None, "flap", "wanda"):
        problems.append(
            f"`--stream` scores each layer from its activations, without gradients: use `--criterion flap` "
            f"(or wanda); got `--criterion {args.criterion}`"
        )
    if args.stream:
        args.layerwise = True  # and an unset criterion is flap
    if args.seq_len < 2:
        problems.append(f"`--seq-len` must be at least 2; got {args.seq_len}")
    raise_all(problems)
    if not 0.0 < args.ratio < 1.0:  # stricter than the library: a run that removes nothing is a mistake
        raise LlmpError(f"`--ratio` must be between 0 and 1 (a fraction of all parameters, e.g. 0.2); got {args.ratio}")
    config = PruneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig)})  # checks itself
    calibration = _check_data("--calibration", args.calibration)
    evaluation = _check_data("--eval-data", args.eval_data)
    _check_seq_len("--seq-len", args.seq_len, args.model)
    inputs = [*input_paths(args.model), calibration, evaluation]
    output = check_output_dir(args.output, args.overwrite, inputs, flag="--output")
    if args.export:
        from llmp.export import beside, check_export

        check_export(args.output, args.export, beside(output, args.export), args.export_dtype, args.overwrite)
    with output_lock(output):  # held from here: a second `llmp prune` to the same output stops now
        return _prune_locked(args, config, calibration, evaluation, inputs)


def _prune_locked(args, config, calibration_source, eval_source, inputs) -> int:
    from llmp.data import calibration_samples, read_text
    from llmp.data.text import read_documents
    from llmp.eval import perplexity
    from llmp.io import save_pruned
    from llmp.models import load_model
    from llmp.pruner import prune
    from llmp.record import Calibration, Perplexity
    from llmp.report import generate_samples, layer_shapes, samples_entry, write_report

    # Local data is read (and refused if unreadable) before the model loads.
    text = read_text(eval_source) if eval_source else None
    if config.needs_calibration and Path(calibration_source).is_file():
        calibration_source = read_documents(calibration_source)
    if args.stream:
        return _prune_streamed(args, config, calibration_source)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, args.dtype)
    load_s = time.perf_counter() - t0
    dense = perplexity(model, tokenizer, text, 128, args.eval_tokens) if text else None
    dense_shapes, dense_samples = layer_shapes(model), generate_samples(model, tokenizer, count=args.samples)
    t1 = time.perf_counter()
    calib = None
    if config.needs_calibration:
        calib = calibration_samples(calibration_source, tokenizer, args.num_samples, args.seq_len, config.seed)
    record = prune(model, config, calib)
    prune_s = time.perf_counter() - t1
    record.model = args.model
    record.calibration = Calibration(str(args.calibration), args.num_samples, args.seq_len)
    record.timings.update(load_s=round(load_s, 3), prune_s=round(prune_s, 3))
    record.dense_layer_shapes = dense_shapes
    if args.samples > 0:
        record.generations = samples_entry(dense_samples, generate_samples(model, tokenizer, count=args.samples))
    print(
        f"parameters: {record.params_before:,} -> {record.params_after:,} "
        f"({record.achieved_ratio:.2%} removed, asked {config.ratio:.2%}) in {prune_s:.1f} s"
    )
    if text:
        pruned = perplexity(model, tokenizer, text, 128, args.eval_tokens)
        record.perplexity = Perplexity(str(args.eval_data), dense.ppl, pruned.ppl, protocol=dense.protocol)
        print(f"perplexity on {args.eval_data}: {dense.ppl:.2f} -> {pruned.ppl:.2f} ({dense.protocol})")
    out = save_pruned(model, args.output, tokenizer, record, overwrite=args.overwrite, inputs=inputs)
    print(f"saved to {out}; summary in {write_report(out)[0]}")
    del model
    return _export_beside(args, out)


def _export_beside(args, folder: Path) -> int:
    """``--export``: the saved folder, exported beside it."""
    if not args.export:
        return 0
    from llmp.export import beside, export

    result = export(folder, args.export, beside(folder, args.export), args.export_dtype, args.overwrite)
    print(f"exported to {result.path} ({args.export}, {result.details['dtype']})")
    for note in result.details.get("notes", []):
        print(note)
    return 0


def _prune_streamed(args, config, calibration_source) -> int:
    from llmp.data import calibration_samples
    from llmp.models import model_folder, resolve_dtype
    from llmp.outdir import real_path
    from llmp.record import Calibration
    from llmp.report import write_report
    from llmp.streamed import prune_streamed

    folder, tokenizer = model_folder(args.model)
    t0 = time.perf_counter()
    calib = calibration_samples(calibration_source, tokenizer, args.num_samples, args.seq_len, config.seed)
    fields = {"model": args.model, "calibration": Calibration(str(args.calibration), args.num_samples, args.seq_len)}
    dtype = resolve_dtype(args.dtype)
    record = prune_streamed(folder, args.output, config, calib, tokenizer, fields, args.overwrite, dtype)
    print(
        f"parameters: {record.params_before:,} -> {record.params_after:,} ({record.achieved_ratio:.2%} removed, "
        f"asked {config.ratio:.2%}) in {time.perf_counter() - t0:.1f} s, streamed layer by layer"
    )
    print(f"saved to {real_path(args.output)}; summary in {write_report(real_path(args.output))[0]}")
    return _export_beside(args, real_path(args.output))


def _eval_ppl(args) -> int:
    from llmp.data import read_text
    from llmp.eval import perplexity
    from llmp.models import load_model

    problems = _positive(args, "max_tokens", allow_none=True)
    if args.seq_len < 2:
        problems.append(f"`--seq-len` must be at least 2; got {args.seq_len}")
    raise_all(problems)
    source = _check_data("--data", args.data)
    if args.engine == "llama.cpp":
        return _eval_ppl_llamacpp(args, read_text(source))
    _check_seq_len("--seq-len", args.seq_len, args.model)
    text = read_text(source)
    model, tokenizer = load_model(args.model, args.dtype)
    result = perplexity(model, tokenizer, text, args.seq_len, args.max_tokens)
    if args.json:
        print(json.dumps({**result.as_dict(), "model": args.model, "data": args.data}))
    else:
        print(f"perplexity {result.ppl:.3f} on {args.data} ({result.protocol})")
    return 0


def _eval_ppl_llamacpp(args, text: str) -> int:
    from llmp.eval import PerplexityResult
    from llmp.eval.llamacpp import LlamaCpp, available

    if Path(args.model).suffix != ".gguf" or not Path(args.model).is_file():
        raise LlmpError(f"`--engine llama.cpp` runs a .gguf file; `--model` {args.model} is not one")
    if not available():
        raise LlmpError("`--engine llama.cpp` needs llama-cpp-python: bash scripts/install_llamacpp.sh")
    with LlamaCpp(args.model, n_ctx=args.seq_len) as engine:
        ids = engine.tokenize(text)[: args.max_tokens]
        ppl, windows = engine.perplexity(ids, args.seq_len)
    result = PerplexityResult(ppl, math.log(ppl), windows * args.seq_len, windows, args.seq_len)
    if args.json:
        print(json.dumps({**result.as_dict(), "model": args.model, "data": args.data, "engine": "llama.cpp"}))
    else:
        print(f"perplexity {result.ppl:.3f} on {args.data} ({result.protocol}; llama.cpp)")
    return 0


def _eval_tasks(args) -> int:
    from llmp.eval.task_files import find_task_file
    from llmp.eval.tasks import evaluate_tasks
    from llmp.models import load_model

    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    if not names:
        raise LlmpError(f"`--tasks` names no task: {args.tasks!r}; give e.g. piqa,arc_easy")
    if args.limit is not None and args.limit < 1:
        raise LlmpError(f"`--limit` must be a positive number of items; got {args.limit}")
    if args.batch_size < 1:
        raise LlmpError(f"`--batch-size` must be at least 1; got {args.batch_size}")
    if args.output and Path(args.output).is_dir():
        raise LlmpError(
            f"`--output` {args.output} is a folder; give a file path, e.g. {Path(args.output) / 'tasks.json'}"
        )
    if args.output and not Path(args.output).parent.is_dir():
        raise LlmpError(f"`--output` {args.output}: its folder does not exist; create it or choose another path")
    if args.output and not os.access(Path(args.output).parent, os.W_OK | os.X_OK):
        raise LlmpError(f"`--output` {args.output}: its folder is not writable; choose another path")
    if args.data_dir is not None:
        for name in names:  # every file found before the model loads
            find_task_file(name, args.data_dir)
    model, tokenizer = load_model(args.model, args.dtype)
    results = evaluate_tasks(model, tokenizer, names, args.data_dir, args.limit, args.batch_size, str(args.model))
    if args.output:
        from llmp.io import write_json_atomic

        write_json_atomic(Path(args.output), results.as_dict())
    if args.json:
        print(json.dumps(results.as_dict()))
        return 0
    limit = f", first {args.limit} items per task" if args.limit else ", all items"
    print(f"{args.model}: zero-shot, lm-evaluation-harness {results.harness_version}{limit}")
    print(results.table())
    print(results.protocol)
    return 0


def _report(args) -> int:
    from llmp.record import read_record
    from llmp.report import DEFAULT_PROMPTS, compare_generations, write_report

    folder = Path(args.dir)
    if not folder.is_dir():
        raise LlmpError(f"{folder} is not a folder: give a folder written by `llmp prune` or `llmp fit`")
    if not (folder / "pruning_report.json").is_file():
        raise LlmpError(f"{folder} has no pruning_report.json: give a folder written by `llmp prune` or `llmp fit`")
    if args.max_new_tokens < 1:
        raise LlmpError(f"`--max-new-tokens` must be at least 1; got {args.max_new_tokens}")
    prompts = DEFAULT_PROMPTS
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise LlmpError(f"`--prompts` file {args.prompts} does not exist")
        prompts = tuple(line for line in Path(args.prompts).read_text().splitlines() if line.strip())
        if not prompts:
            raise LlmpError(f"`--prompts` file {args.prompts} holds no prompt; write one prompt per line")
    if args.prompts and not args.dense:
        raise LlmpError("`--prompts` needs `--dense`: the prompts are generated from the dense and the pruned model")
    generations = None
    if args.dense:
        # A folder from `llmp fit` holds the recovered model; its report has a `recovery` entry.
        recovered = read_record(folder).recovery is not None
        models = {"dense": args.dense, "recovered" if recovered else "pruned": str(folder)}
        generations = compare_generations(models, prompts, args.max_new_tokens)
    md, png = write_report(folder, generations)
    print(f"wrote {md} and {png}")
    return 0


def _export(args) -> int:
    from llmp.export import export

    t0 = time.perf_counter()
    result = export(args.dir, args.format, args.output, args.dtype, args.overwrite)
    size = sum(p.stat().st_size for p in ([result.path] if result.path.is_file() else result.path.rglob("*")))
    print(
        f"wrote {result.path} ({args.format}, {result.details['dtype']}, {size / 2**20:,.1f} MiB) "
        f"in {time.perf_counter() - t0:.1f} s"
    )
    for note in result.details.get("notes", []):
        print(note)
    return 0


def _generate(args) -> int:
    import torch

    from llmp.models import load_model

    if not args.prompt.strip():
        raise LlmpError("`--prompt` is empty; give the text to continue, e.g. --prompt 'The capital of France is'")
    if args.max_new_tokens < 1:
        raise LlmpError(f"`--max-new-tokens` must be at least 1; got {args.max_new_tokens}")
    model, tokenizer = load_model(args.model, args.dtype)
    prompt = args.prompt
    if args.chat and tokenizer.chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    print(tokenizer.decode(out[0, inputs.input_ids.shape[1] :], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
