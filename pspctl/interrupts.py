"""Ctrl-C during a command: noted, so that a library cannot swallow it, and held back where
stopping halfway would leave a half-done thing (torch's import, the moves that publish outputs).

Python raises a KeyboardInterrupt wherever the main thread happens to be. Two places lose it:
a library that catches it and fails later for it (torch's exporter, interrupted while it
imports its modules, fails with "partially initialized module 'torch._dynamo'"), and a
callback whose exceptions Python cannot raise (a weakref callback or `__del__`, where it
prints "Exception ignored" and goes on). `noted` records every Ctrl-C of a command, so that
its outputs are not published after one (`check`, called before each move into place) and
the command reports the interruption rather than what failed after it.

Only Python's own handler, in the main thread, is ever replaced: a handler set by someone else
(or SIG_IGN) is theirs to keep, and then this module changes nothing.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["check", "held", "interrupted", "noted", "publishing", "written"]

_noted: list[int] = []  # the Ctrl-Cs since `noted` began
_written: list[str] = []  # the outputs published since then
_noting = False


def _note(signum: int, frame: Any) -> None:
    _noted.append(signum)
    raise KeyboardInterrupt


def _ours() -> bool:
    """Whether SIGINT is Python's own handler (or ours), in the main thread."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) in (
        signal.default_int_handler,
        _note,
    )


def _quiet_unraisable(hook: Any) -> Any:
    def unraisable(args: Any) -> None:
        if not (isinstance(args.exc_type, type) and issubclass(args.exc_type, KeyboardInterrupt)):
            hook(args)  # a Ctrl-C is noted already; anything else is printed as Python does

    return unraisable


@contextmanager
def noted() -> Iterator[None]:
    """Note every Ctrl-C of the block (raised as Python's own handler does), and do not print
    one that lands where Python cannot raise it: `check` stops the command at its next output.
    What was noted is forgotten when the block ends: report it inside."""
    global _noting
    if not _ours():
        yield
        return
    previous, hook = signal.getsignal(signal.SIGINT), sys.unraisablehook
    signal.signal(signal.SIGINT, _note)
    sys.unraisablehook = _quiet_unraisable(hook)
    _noting = True
    try:
        yield
    finally:
        _noting = False
        _noted.clear()
        _written.clear()
        signal.signal(signal.SIGINT, previous)
        sys.unraisablehook = hook


def interrupted() -> bool:
    """Whether a Ctrl-C came since `noted` began (raised, held, or swallowed by a library)."""
    return bool(_noted)


def written() -> list[str]:
    """The outputs published since `noted` began: a Ctrl-C after them left them complete."""
    return list(_written)


def check() -> None:
    """Raise KeyboardInterrupt if a Ctrl-C came and was swallowed: call before publishing."""
    if _noted:
        raise KeyboardInterrupt


@contextmanager
def held() -> Iterator[None]:
    """Hold a Ctrl-C back until the block ends, then raise it there (and note it).

    For torch's import, which is not safe to interrupt (a KeyboardInterrupt in its C++ start-up
    aborts the process, one in its Python part leaves a half-made `torch` in sys.modules), and
    for the moves that publish a command's outputs, which must all happen or none."""
    if not _ours():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        if previous is _note:
            _noted.extend(held)
        raise KeyboardInterrupt


@contextmanager
def publishing(*paths: object) -> Iterator[None]:
    """Around the moves that put outputs in place: none after a Ctrl-C, and all or none of
    them. A Ctrl-C meanwhile is raised once they are done, with `written` naming `paths`
    (the outputs as the user knows them; none for a file that is not one, the trust store)."""
    check()
    with held():
        yield
        if _noting:
            _written.extend(str(p) for p in paths)
