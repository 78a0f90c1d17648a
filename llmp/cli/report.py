"""``llmp report``: report.md and report.png in a pruned model folder."""

from __future__ import annotations

from pathlib import Path

from llmp.errors import LlmpError


def add_parser(sub) -> None:
    r = sub.add_parser("report", help="write report.md and report.png into a pruned model folder")
    r.add_argument("dir", help="folder written by `llmp prune` or `llmp fit`")
    r.add_argument("--dense", help="dense model (spec) to generate from beside the pruned one, e.g. smollm2-135m")
    r.add_argument("--prompts", help="text file, one prompt per line (default: llmp's fixed prompts)")
    r.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per prompt with --dense")


def run(args) -> int:
    from llmp.eval.generation import DEFAULT_PROMPTS, compare_generations
    from llmp.record import read_record
    from llmp.report import write_report

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
