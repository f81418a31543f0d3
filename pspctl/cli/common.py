"""What every command shares: the typer app and its root options, the consoles, the one-line
error handling, the progress bar and small renderers. The commands (analyze, core, export,
train) import this module; pspctl.cli imports them to register them on `app`.

Every error is one line on stderr: a `PspctlError` with its exit code; anything else is a bug,
shown as one line (exit 1) that says which command failed, or with `--debug` as its traceback.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import shlex
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from pspctl import digests  # standard library only: cheap at start-up

try:  # typer vendors click since 0.2x; before, it used click itself
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException  # type: ignore[no-redef,assignment,unused-ignore]


class _RootGroup(TyperGroup):
    """The root command. It runs click in non-standalone mode so that click's own errors (an
    unknown option, a bad value, a missing argument) come back here and are printed as one
    line like every other error, instead of click's usage box. Exit codes stay click's."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        standalone = kwargs.get("standalone_mode", True)
        kwargs["standalone_mode"] = False
        if not standalone:
            return super().main(*args, **kwargs)
        try:
            # Non-standalone, click returns a command's result, or the code of a typer.Exit.
            result = super().main(*args, **kwargs)
        except ClickException as e:
            # NoArgsIsHelpError: bare `pspctl`; its message is the help, which typer has printed.
            if type(e).__name__ != "NoArgsIsHelpError":
                error_line(e.format_message() + _help_hint(e))
            sys.exit(e.exit_code)
        except typer.Abort:
            error_line("aborted")
            sys.exit(1)
        sys.exit(result if isinstance(result, int) else 0)

    # A command's own Ctrl-C is one line (`handle_errors`); one while click parses (the digest
    # prefetch runs as a callback) reached typer, which turns it into a silent exit 130.
    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _interrupt_in_one_line():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _interrupt_in_one_line():
            return super().invoke(ctx)


@contextmanager
def _interrupt_in_one_line() -> Iterator[None]:
    try:
        yield
    except KeyboardInterrupt:
        error_line("interrupted")
        raise typer.Exit(130) from None


def _help_hint(e: ClickException) -> str:
    ctx = getattr(e, "ctx", None)  # set on usage errors
    if ctx is None or ctx.command.get_help_option(ctx) is None:
        return ""
    return f" (see {ctx.command_path} {ctx.help_option_names[0]})"


app = typer.Typer(
    name="pspctl",
    cls=_RootGroup,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


@dataclass
class State:
    """Options of the root command, set before a command runs."""

    debug: bool = False  # show an unexpected error's traceback instead of one line


state = State()


def _print_version(value: bool) -> None:
    if value:
        from pspctl import __version__

        console.print(f"pspctl {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
    debug: bool = typer.Option(
        False, "--debug", help="Show the traceback of an unexpected error, or of what caused an error."
    ),
) -> None:
    """Parameter superposition for PyTorch checkpoints: merge K models into one file and get each back."""
    state.debug = debug


F = TypeVar("F", bound=Callable[..., Any])


def error_line(message: str) -> None:
    """`error: <message>` on stderr, on one line whatever the message holds."""
    from rich.markup import escape

    err_console.print(
        f"[bold red]error:[/] {escape(' '.join(message.split()))}", markup=True, highlight=False
    )


def handle_errors(fn: F) -> F:
    """Turn any exception a command raises into one stderr line and an exit code.

    A PspctlError gets its own exit code (with --debug, after the traceback of the exception
    it wraps, if any), Ctrl-C 130, a full disk or a denied permission 8 when
    writing (2 when reading). Anything else is a bug: one line naming the command and the
    exception, exit 1; with --debug it is raised, traceback and all.
    """
    command = fn.__name__.removesuffix("_command")
    inner = _one_line_errors(fn, command)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _refuse_nonfinite(kwargs)
        try:
            return inner(*args, **kwargs)
        finally:
            _name_pickled_code()
            digests.forget_prefetched()

    return wrapper  # type: ignore[return-value]


def _refuse_nonfinite(options: dict[str, Any]) -> None:
    """A float option that is NaN or ±inf is a bad value (exit 2), as click's own are: no
    range check catches NaN, and none of pspctl's numbers means anything infinite."""
    for name, value in options.items():
        if isinstance(value, float) and not math.isfinite(value):
            flag = "--" + name.replace("_", "-")
            raise typer.BadParameter(f"{value} is not a finite number", param_hint=f"'{flag}'")


P = TypeVar("P", list[Path], str)


def prefetch_digests(value: P) -> P:
    """Callback of the checkpoint arguments whose sha256 the command records (merge's inputs
    and base): start hashing them as soon as they are parsed, on the other core, while the
    command imports torch (`pspctl.digests.prefetch`). A value that names no file (`--base
    auto`) is left alone."""
    digests.prefetch(value if isinstance(value, list) else [value])
    return value


def _import_libraries() -> None:
    """Import torch and the file format (pydantic) with the garbage collector paused, then
    freeze what they made and resume it. Their imports create about a million objects, and
    the collections that these allocations trigger walk all of them again and again: 0.4–0.6 s
    of every command's start-up on the 2-core CI machine, and 0.35 s more at exit
    (`benchmarks/merge_speed.py`). Frozen objects are never collected; module objects live as
    long as the process anyway. `main` pauses the collector from the start (parsing imports
    pydantic too); a command run in-process (tests) pauses it here."""
    global _paused
    try:
        if "torch" not in sys.modules:
            _paused = _paused or gc.isenabled()
            gc.disable()
            from pspctl import interrupts  # imports nothing more

            with interrupts.held():  # not safe to interrupt (pspctl.interrupts)
                import torch  # noqa: F401

                import pspctl.fileformat  # noqa: F401

            gc.freeze()
    finally:
        if _paused:
            gc.enable()
        _paused = False


_paused = False  # whether `main` or `_import_libraries` paused the garbage collector


def _name_pickled_code() -> None:
    """With --trust-pickle, say which files' pickled code ran (merge, analyze, tune alike).

    Runs on every way out, a Ctrl-C included, so it imports nothing: pspctl.checkpoints
    imports torch, and after an interrupted or failed start-up that import fails in its turn
    (a traceback instead of the one line). A command that never imported it ran no pickle."""
    checkpoints = sys.modules.get("pspctl.checkpoints")
    ran_pickled = getattr(checkpoints, "RAN_PICKLED", None)
    if ran_pickled:
        ran = ", ".join(dict.fromkeys(str(p) for p in ran_pickled))
        err_console.print(f"warning: executed pickled code from {ran}", markup=False)
        ran_pickled.clear()


def _interrupted() -> NoReturn:
    """Exit 130 for a Ctrl-C, saying which outputs it came too late to stop."""
    from pspctl import interrupts

    written = interrupts.written()
    error_line(f"interrupted after writing {', '.join(written)} (complete)" if written else "interrupted")
    raise typer.Exit(130) from None


def _one_line_errors(fn: F, command: str) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from pspctl import interrupts
        from pspctl.errors import PspctlError, one_line, os_error

        with interrupts.noted():  # reported inside: it forgets its Ctrl-Cs when it ends
            try:
                _import_libraries()  # inside: Ctrl-C while torch is imported is one line too
                result = fn(*args, **kwargs)
                interrupts.check()  # a Ctrl-C that a library swallowed
                return result
            except (typer.Exit, typer.Abort, ClickException):  # typer's own; _RootGroup renders them
                raise
            except KeyboardInterrupt:
                _interrupted()
            except Exception as e:
                if interrupts.interrupted():  # whatever failed after a Ctrl-C failed for it
                    if state.debug:
                        traceback.print_exception(e, file=sys.stderr)
                    _interrupted()
                if isinstance(e, PspctlError):
                    if state.debug and e.__cause__ is not None:  # e.g. where a task file's function failed
                        traceback.print_exception(e, file=sys.stderr)
                    error_line(str(e))
                    raise typer.Exit(e.exit_code) from None
                known = os_error(e) if isinstance(e, OSError) else None  # a full disk, a read-only dir
                if known is not None:
                    if state.debug:
                        traceback.print_exception(e, file=sys.stderr)
                    error_line(str(known))
                    raise typer.Exit(known.exit_code) from None
                if state.debug:
                    raise
                error_line(f"pspctl {command} failed: {one_line(e)} (run with --debug for the traceback)")
                raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    """JSON on stdout, nothing else, so that scripts can pipe it."""
    typer.echo(json.dumps(data, indent=2, default=str))


@contextmanager
def progress_bar(description: str, *, quiet: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar driven by callbacks of (done, total, item); silent with quiet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pspctl.interrupts import check  # each step: a Ctrl-C that a library swallowed stops here

    if quiet or not err_console.is_terminal:  # no bar in logs and pipes
        yield lambda done, total, item: check()
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"), console=err_console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(description, total=None, item="")

        def update(done: int, total: int, item: str) -> None:
            check()
            bar.update(task, completed=done, total=total, item=item)

        yield update


def command_line() -> str:
    """The command as the user typed it, for the recipe recorded in output files."""
    return shlex.join(["pspctl", *sys.argv[1:]])


def folded(table: Table) -> Table:
    """`table` with every column folding at the terminal's width: a long name takes more lines
    rather than being cut to '…' (rich's default), so rows stay told apart. Right-aligned
    columns (numbers) keep their widest cell where the table still fits with them so (names and
    headers fold first), so `0.028` does not read as `0.02` over `8`."""
    import io

    from rich.text import Text

    for column in table.columns:
        column.overflow = "fold"
    numbers = [c for c in table.columns if c.justify == "right"]
    widest = [max((Text.from_markup(str(cell)).cell_len for cell in c.cells), default=1) for c in numbers]

    def fits() -> bool:
        out = io.StringIO()
        Console(width=console.width, file=out, color_system=None).print(table)
        rows = [line for line in out.getvalue().splitlines() if line[:1] in "│┃"]
        return all(line[-1:] in "│┃" for line in rows)  # not cropped at the edge

    for column, w in zip(numbers, widest, strict=True):
        column.min_width = w
    if not fits():
        padding, table.padding = table.padding, (0, 0)  # a narrow terminal: padding goes first
        if not fits():  # still too narrow: let the numbers fold too
            table.padding = padding
            for column in numbers:
                column.min_width = None
    return table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> None:
    global _paused
    if gc.isenabled():  # until the command's libraries are imported (`_import_libraries`)
        gc.disable()
        _paused = True
    try:
        app()
    except KeyboardInterrupt:  # while typer builds the click command, before _RootGroup runs it
        sys.stderr.write("error: interrupted\n")
        code: Any = 130
    except SystemExit as e:
        code = e.code
    _finished(0 if code is None else code)


def _finished(code: Any) -> NoReturn:
    """End the process with the command's own code, once the command is over and has said
    so, without Python's shutdown: its atexit callbacks and the clean-up of torch's modules
    take 40–250 ms and have nothing left to do (every output is closed and in place, pspctl's
    threads only served the command). A Ctrl-C there interrupted nothing, yet printed
    "Exception ignored in atexit callback" or ended the process by the signal."""
    import os
    import signal

    with contextlib.suppress(ValueError):  # ValueError: not the main thread
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # nothing left to interrupt
    if code is not None and not isinstance(code, int):  # sys.exit("message") prints it
        with contextlib.suppress(Exception):
            sys.stderr.write(f"{code}\n")
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code or 0)
