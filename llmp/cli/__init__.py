"""The ``llmp`` command: prune, eval ppl, eval tasks, report, generate, export (and fit).

One module per command, each a thin mapping of its flags onto a library call. Bad input ends
with one ``error: ...`` line and exit status 2, before any model is loaded when the problem can
be seen without one.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from llmp import outdir
from llmp.cli import evaluate, export, generate, prune, report
from llmp.cli.common import add_dtype_arg, add_prune_args, field_help
from llmp.memory import return_freed_memory
from llmp.remote_code import TRUST_ENV

__all__ = ["add_dtype_arg", "add_prune_args", "field_help", "main"]
COMMANDS = {"prune": prune, "eval": evaluate, "report": report, "export": export, "generate": generate}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmp", description="Structured pruning of LLMs (LLM-Pruner) with recovery.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="let a model folder's own Python code (config.json `auto_map`) run; off by default: read that code first",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS.values():
        command.add_parser(sub)
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
    return outdir.run_command(lambda: COMMANDS[args.command].run(args))


if __name__ == "__main__":
    sys.exit(main())
