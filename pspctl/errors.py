"""Errors pspctl raises for bad input. The CLI prints their message on one line and exits with `exit_code`.

Any other exception escaping the library is a bug: the CLI still prints one line for it
(exit 1), or its traceback with `pspctl --debug`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
from collections.abc import Sequence
from pathlib import Path

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


class UntrustedTaskError(PspctlError):
    """A superposed file names a task file this user never ran with pspctl (`pspctl.trust`)."""

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


# OSErrors that are the environment's doing, not pspctl's or its input's (see `os_error`).
_NO_ROOM = frozenset({errno.ENOSPC, errno.EFBIG, errno.EROFS, getattr(errno, "EDQUOT", errno.ENOSPC)})
_DENIED = frozenset({errno.EACCES, errno.EPERM})
WRITE_ERRNOS = _NO_ROOM | _DENIED  # what an OSError while writing an output can mean
# outputs.atomic_path writes `.NAME.PID.RANDOM.pspctl-tmp` and renames it onto NAME.
_ATOMIC_TEMP = re.compile(r"\.(?P<name>.+)\.\d+\.[0-9a-f]{8}\.pspctl-tmp")


def os_error(exc: OSError) -> PspctlError | None:
    """The PspctlError a full disk, a read-only file system or a denied permission means, or
    None for any other OSError (one pspctl does not expect: a bug).

    pspctl writes every output to a new temporary file and renames it into place, so a
    permission denied on a path that exists was a read (InputError); on a path that does
    not (or no longer does), a write (OutputError).
    """
    path = None if exc.filename is None else Path(os.fsdecode(exc.filename))
    if exc.errno in _DENIED and path is not None and os.path.exists(path):
        return InputError(f"{path}: cannot read: {exc.strerror or exc}")
    if exc.errno in _NO_ROOM or exc.errno in _DENIED:
        return cannot_write(path, exc)
    return None


def cannot_write(path: str | Path | None, exc: OSError) -> OutputError:
    """OutputError naming `path` (an atomic write's temporary file as its target) and the OS's reason."""
    reason = exc.strerror or str(exc)
    if path is None:
        return OutputError(f"cannot write the output: {reason}")
    path = Path(path)
    temp = _ATOMIC_TEMP.fullmatch(path.name)
    if temp:  # mkstemp made it absolute; show it as the user most likely gave it
        path = path.with_name(temp["name"])
        with contextlib.suppress(ValueError):
            path = path.relative_to(Path.cwd())
    return OutputError(f"{path}: cannot write: {reason}")
