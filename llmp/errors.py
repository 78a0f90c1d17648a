"""The one exception type llmp raises for bad input.

The CLI prints an :class:`LlmpError` as a single ``error: ...`` line and exits with status 2;
anything else is a bug and keeps its traceback.
"""


class LlmpError(ValueError):
    """Bad input or an impossible request, with a message that names the problem and the fix."""


def raise_all(problems: list[str]) -> None:
    """Raise one :class:`LlmpError` listing every problem found, or return if there are none."""
    if len(problems) == 1:
        raise LlmpError(problems[0])
    if problems:
        raise LlmpError("; ".join(problems))
