"""What the commands share: options derived from the library's dataclasses, and messages that
name the command's flags."""

from __future__ import annotations

import argparse
import dataclasses
import re
import typing

from llmp.errors import LlmpError

ALIASES = {"criterion": ("--importance",)}  # DESIGN.md's name for the option


def field_help(cls) -> dict[str, str]:
    """A dataclass's attribute docstrings, as ``{field: one-line help}``."""
    import docstring_parser

    return {p.arg_name: " ".join(p.description.split()) for p in docstring_parser.parse_from_object(cls).params}


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    """One option per :class:`~llmp.PruneConfig` field, its help from the field's docstring
    (``llmp prune`` and ``bench/prune.py`` take the same options)."""
    from llmp.pruning import PruneConfig
    from llmp.validate import literal_choices

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


def prune_config(args: argparse.Namespace):
    """The :class:`~llmp.PruneConfig` of the parsed options (checked as it is made)."""
    from llmp.pruning import PruneConfig

    with flags_named():
        return PruneConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(PruneConfig)})


def add_dtype_arg(parser: argparse.ArgumentParser) -> None:
    from llmp.models import DTYPES

    parser.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="the weights' dtype: auto keeps the checkpoint's (a bf16 model stays bf16, and is saved so); "
        "on a CPU without bf16 units bf16 is slower than float32 (default: auto)",
    )


class flags_named:
    """Inside, a library error that names one of the command's options by its argument name
    (```num_samples```) names the flag instead (```--num-samples```): the library speaks of its
    arguments, the command of its flags."""

    def __init__(self, names: typing.Iterable[str] | None = None):
        from llmp.pruning import PruneConfig

        self.names = {f.name for f in dataclasses.fields(PruneConfig)} | set(names or ())

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if isinstance(err, LlmpError):
            text = re.sub(r"`([a-z_]+)`", lambda m: self._flag(m.group(1)), str(err))
            if text != str(err):
                raise LlmpError(text) from err.__cause__
        return False

    def _flag(self, name: str) -> str:
        return f"`--{name.replace('_', '-')}`" if name in self.names else f"`{name}`"


def positive(args, *names: str, allow_none: bool = False) -> list[str]:
    """One message per ``--name`` that is not a positive whole number."""
    problems = []
    for name in names:
        value = getattr(args, name)
        if value is None and allow_none:
            continue
        if value is None or value < 1:
            problems.append(f"`--{name.replace('_', '-')}` must be a positive whole number; got {value}")
    return problems
