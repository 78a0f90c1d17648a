"""``llmp eval ppl`` and ``llmp eval tasks``: perplexity and zero-shot accuracies."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from llmp.cli.common import add_dtype_arg, flags_named, positive
from llmp.errors import LlmpError, raise_all
from llmp.workflow import check_data, check_seq_len


def add_parser(sub) -> None:
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


def run(args) -> int:
    return _eval_ppl(args) if args.what == "ppl" else _eval_tasks(args)


def _eval_ppl(args) -> int:
    from llmp.data import read_text
    from llmp.eval import perplexity
    from llmp.models import load_model

    problems = positive(args, "max_tokens", allow_none=True)
    if args.seq_len < 2:
        problems.append(f"`--seq-len` must be at least 2; got {args.seq_len}")
    raise_all(problems)
    source = check_data("--data", args.data)
    if args.engine == "llama.cpp":
        return _eval_ppl_llamacpp(args, read_text(source))
    check_seq_len("--seq-len", args.seq_len, args.model)
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
    with flags_named(("data_dir", "model")):
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
