"""Errors pspctl raises for bad input. The CLI prints their message on one line and exits with `exit_code`.

Any other exception escaping the library is a bug: the CLI still prints one line for it
(exit 1), or its traceback with `pspctl --debug`.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_LISTED = 5


def listed(items: Sequence[str], sep: str = ", ") -> str:
    """The first MAX_LISTED items for an error message, and how many more there are.

    >>> listed(["a", "b", "c", "d", "e", "f", "g"])
    'a, b, c, d, e (+2 more)'
    """
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return sep.join(items[:MAX_LISTED]) + more


def one_line(exc: BaseException) -> str:
    """`Type: message` with the message's whitespace (newlines too) collapsed, for an error line.

    >>> one_line(ValueError("bad\\n  value"))
    'ValueError: bad value'
    """
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class PspctlError(Exception):
    """Base class: a user-facing problem with a one-line message."""

    exit_code = 1


class InputError(PspctlError):
    """A path is missing, unreadable, not a checkpoint, truncated or corrupt."""

    exit_code = 2


class MismatchError(PspctlError):
    """Inputs disagree with each other (keys, shapes, dtypes) or with a model."""

    exit_code = 3


class UnsafeCheckpointError(PspctlError):
    """A checkpoint would need arbitrary pickle execution to load."""

    exit_code = 4


class FormatError(PspctlError):
    """A file is not a pspctl superposed file, or has an unknown format version."""

    exit_code = 5


class ContextError(PspctlError):
    """A context index is out of range or a label is unknown."""

    exit_code = 6


class PolicyError(PspctlError):
    """A merge cannot be done as asked: non-finite weights, rotation fan-in over the limit, ..."""

    exit_code = 7


class OutputError(PspctlError):
    """The output path is unusable: exists without --force, equals an input, is a file not a dir."""

    exit_code = 8


class TaskError(PspctlError):
    """A task file is missing a required function, or its model/data do not fit."""

    exit_code = 9


class ValidationError(PspctlError):
    """An exported graph or a trained model failed its check against PyTorch."""

    exit_code = 10
