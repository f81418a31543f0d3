"""The `pspctl` command line: parse, call one library function, render with rich.

Heavy modules (torch, onnx) are imported inside the commands so that `pspctl --help` is fast.
Only `PspctlError` is caught: it becomes one line on stderr and its exit code. Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import json
import shlex
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.console import Console

app = typer.Typer(
    name="pspctl",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


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
) -> None:
    """Parameter superposition for PyTorch checkpoints: merge K models into one file and get each back."""


F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn a PspctlError into one stderr line and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from rich.markup import escape

        from pspctl.errors import PspctlError

        try:
            return fn(*args, **kwargs)
        except PspctlError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", markup=True, highlight=False)
            raise typer.Exit(e.exit_code) from None

    return wrapper  # type: ignore[return-value]


def print_json(data: Any) -> None:
    """JSON on stdout, nothing else, so that scripts can pipe it."""
    typer.echo(json.dumps(data, indent=2, default=str))


@contextmanager
def progress_bar(description: str, *, quiet: bool) -> Iterator[Callable[[int, int, str], None]]:
    """A rich progress bar driven by callbacks of (done, total, item); silent with quiet."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet or not err_console.is_terminal:  # no bar in logs and pipes
        yield lambda done, total, item: None
        return
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"), console=err_console, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task(description, total=None, item="")

        def update(done: int, total: int, item: str) -> None:
            bar.update(task, completed=done, total=total, item=item)

        yield update


def command_line() -> str:
    """The command as the user typed it, for the recipe recorded in output files."""
    return shlex.join(["pspctl", *sys.argv[1:]])


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def main() -> None:
    app()


# Command modules register themselves on `app`; import them last.
from pspctl.cli import analyze, core, export, train  # noqa: E402,F401
