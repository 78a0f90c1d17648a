"""The ``llmp`` command: prune, eval ppl, generate.

Bad input ends with one ``error: ...`` line and exit status 2, before any model is loaded when
the problem can be seen without one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
import time
from pathlib import Path

from llmp.errors import LlmpError

_DEFAULTS_NOTE = (
    "defaults: MLP channels of every layer but the first and last, first-order Taylor on 16 x 128 C4 tokens"
)


def _field_help(cls) -> dict[str, str]:
    """The ``Attributes:`` section of a dataclass docstring, as ``{field: one-line help}``."""
    doc = cls.__doc__ or ""
    section = doc.split("Attributes:", 1)[-1]
    helps, current = {}, None
    for line in section.splitlines():
        match = re.match(r"\s{8}(\w+): (.*)", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2).strip()
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return helps


def _add_prune_args(parser: argparse.ArgumentParser) -> None:
    from llmp.pruner import PruneConfig

    helps = _field_help(PruneConfig)
    for field in dataclasses.fields(PruneConfig):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=helps.get(field.name)
            )
        else:
            kind = type(default) if default is not None else str
            parser.add_argument(
                flag, type=kind, default=default, help=f"{helps.get(field.name, '')} (default: {default})"
            )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmp", description="Structured pruning of LLMs (LLM-Pruner) with recovery.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
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
    _add_prune_args(p)

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

    g = sub.add_parser("generate", help="greedy text generation")
    g.add_argument("--model", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=48)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["fit"]:  # LightningCLI owns its own argument parsing
        from llmp.fit import main as fit_main

        return fit_main(argv[1:])
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "prune":
            return _prune(args)
        if args.command == "eval":
            return _eval_ppl(args)
        return _generate(args)
    except LlmpError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130


def _prune(args) -> int:
    from llmp.data import calibration_samples, read_text
    from llmp.data.resources import resolve
    from llmp.eval import perplexity
    from llmp.io import check_output_dir, save_pruned
    from llmp.models import load_model
    from llmp.pruner import PruneConfig, prune

    config = PruneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig)})
    if not 0.0 < config.ratio < 1.0:
        raise LlmpError(
            f"`--ratio` must be between 0 and 1 (a fraction of all parameters, e.g. 0.2); got {config.ratio}"
        )
    config.check()
    check_output_dir(args.output, args.overwrite)
    calibration_source = resolve(args.calibration)
    eval_source = resolve(args.eval_data) if args.eval_data else None
    for source in (calibration_source, eval_source):
        if source is not None and Path(source).suffix and not Path(source).is_file():
            raise LlmpError(f"data file {source} does not exist")

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    text = read_text(eval_source) if eval_source else None
    dense = perplexity(model, tokenizer, text, 128, args.eval_tokens) if text else None
    t1 = time.perf_counter()
    calib = None
    if config.criterion in ("taylor", "taylor2", "taylor_mix", "vectorwise"):
        calib = calibration_samples(calibration_source, tokenizer, args.num_samples, args.seq_len, config.seed)
    report = prune(model, config, calib)
    prune_s = time.perf_counter() - t1
    report["model"] = args.model
    report["calibration"] = {"source": str(args.calibration), "num_samples": args.num_samples, "seq_len": args.seq_len}
    report["timings"].update(load_s=round(load_s, 3), prune_s=round(prune_s, 3))
    print(
        f"parameters: {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['achieved_ratio']:.2%} removed, asked {config.ratio:.2%}) in {prune_s:.1f} s"
    )
    if text:
        pruned = perplexity(model, tokenizer, text, 128, args.eval_tokens)
        report["perplexity"] = {
            "data": str(args.eval_data),
            "dense": dense.ppl,
            "pruned": pruned.ppl,
            "protocol": dense.protocol,
        }
        print(f"perplexity on {args.eval_data}: {dense.ppl:.2f} -> {pruned.ppl:.2f} ({dense.protocol})")
    out = save_pruned(model, args.output, tokenizer, report, overwrite=args.overwrite)
    print(f"saved to {out}")
    return 0


def _eval_ppl(args) -> int:
    from llmp.data import read_text
    from llmp.data.resources import resolve
    from llmp.eval import perplexity
    from llmp.models import load_model

    if args.seq_len < 2:
        raise LlmpError(f"`--seq-len` must be at least 2; got {args.seq_len}")
    source = resolve(args.data)
    if Path(source).suffix and not Path(source).is_file():
        raise LlmpError(f"data file {source} does not exist")
    model, tokenizer = load_model(args.model)
    result = perplexity(model, tokenizer, read_text(source), args.seq_len, args.max_tokens)
    if args.json:
        print(json.dumps({**result.as_dict(), "model": args.model, "data": args.data}))
    else:
        print(f"perplexity {result.ppl:.3f} on {args.data} ({result.protocol})")
    return 0


def _generate(args) -> int:
    import torch

    from llmp.models import load_model

    model, tokenizer = load_model(args.model)
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
