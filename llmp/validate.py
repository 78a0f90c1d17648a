"""The one validation convention of llmp's settings dataclasses.

Each has ``problems() -> list[str]``: one message per bad field, naming the field (as the user
writes it: ``\\`distill.loss\\``` in a recipe), the value and what is allowed; choices come from
the field's ``Literal`` type (:func:`literal_problems`). The boundary that takes the settings
raises them all at once (:func:`llmp.errors.raise_all`): :class:`~llmp.PruneConfig` when it is
made, ``llmp fit`` and :class:`~llmp.RecoveryModule` before any model loads."""

from __future__ import annotations

import dataclasses
import typing
from typing import Literal


def literal_choices(hint) -> tuple:
    """The values a ``Literal[...]`` (or ``Literal[...] | None``) type hint allows."""
    if typing.get_origin(hint) is Literal:
        return typing.get_args(hint)
    return next((literal_choices(arg) for arg in typing.get_args(hint) if typing.get_origin(arg) is Literal), ())


def literal_problems(settings, prefix: str = "") -> list[str]:
    """One message per ``Literal`` field of the dataclass ``settings`` whose value is not allowed
    (``None`` passes where the type admits it: a field decided later); ``prefix`` names the
    settings' key (``distill.``)."""
    hints = typing.get_type_hints(type(settings))
    problems = []
    for field in dataclasses.fields(settings):
        allowed = literal_choices(hints[field.name])
        value = getattr(settings, field.name)
        if not allowed or value in allowed or (value is None and type(None) in typing.get_args(hints[field.name])):
            continue
        problems.append(f"`{prefix}{field.name}` must be one of {', '.join(map(str, allowed))}; got {value!r}")
    return problems
