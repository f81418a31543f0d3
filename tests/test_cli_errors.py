"""No tracebacks, ever: every failure is one line on stderr and a documented exit code."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pspctl.cli import app, state
from tests.conftest import mlp, save_models

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code: int) -> str:
    """The single stderr line of a failed command, after checking its exit code and stdout."""
    assert result.exit_code == code, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.output
    assert result.stderr.startswith("error: ")
    return result.stderr.rstrip("\n")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    save_models([mlp(i, width=8) for i in range(2)], tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def merge_raises(monkeypatch):
    """Make the library's merge raise `exc`: a stand-in for a bug."""

    def install(exc: BaseException) -> None:
        def boom(*args, **kwargs):
            raise exc

        # By module object: `pspctl.merge` is also the lazily exported function.
        monkeypatch.setattr(importlib.import_module("pspctl.merge"), "merge", boom)

    return install


# --- unexpected exceptions ------------------------------------------------------------------


def test_a_bug_is_one_line_naming_the_command_and_the_exception(workdir, merge_raises):
    merge_raises(RuntimeError("boom\n  on two lines"))
    line = one_line(run("merge", "model0.pt", "model1.pt", "-q"), 1)
    assert line == (
        "error: pspctl merge failed: RuntimeError: boom on two lines (run with --debug for the traceback)"
    )


def test_debug_raises_the_exception_itself(workdir, merge_raises):
    merge_raises(RuntimeError("boom"))
    result = run("--debug", "merge", "model0.pt", "model1.pt", "-q")
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)
    assert str(result.exception) == "boom" and result.stderr == ""
    # --debug lasts for one invocation: the next one without it is one line again.
    assert run("merge", "model0.pt", "model1.pt", "-q").exit_code == 1 and not state.debug


def test_ctrl_c_is_one_line_and_exit_130(workdir, merge_raises):
    merge_raises(KeyboardInterrupt())
    assert one_line(run("merge", "model0.pt", "model1.pt", "-q"), 130) == "error: interrupted"


def test_pspctl_errors_keep_their_exit_code(workdir):
    line = one_line(run("merge", "model0.pt", "missing.pt", "-q"), 2)
    assert line == "error: missing.pt: no such file"


SCRIPT = """
import sys
import pspctl.merge

def boom(*args, **kwargs):
    raise ZeroDivisionError("division by zero")

pspctl.merge.merge = boom
sys.argv = ["pspctl", *sys.argv[1:]]
from pspctl.cli import main
main()
"""


@pytest.mark.parametrize("debug", [False, True])
def test_the_installed_entry_point(workdir, debug):
    """main() as the `pspctl` script runs it: one line, or with --debug Python's traceback."""
    args = ["--debug"] * debug + ["merge", "model0.pt", "model1.pt", "-q"]
    out = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True)
    assert out.returncode == 1 and out.stdout == ""
    if debug:
        assert out.stderr.startswith("Traceback (most recent call last):")
        assert out.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    else:
        assert out.stderr == (
            "error: pspctl merge failed: ZeroDivisionError: division by zero "
            "(run with --debug for the traceback)\n"
        )


# --- click's own errors: options that do not parse ----------------------------------------


@pytest.mark.parametrize(
    ("args", "start", "hint"),
    [
        (["merge", "a.pt", "b.pt", "--seed", "abc"], "Invalid value for '--seed': ", "pspctl merge --help"),
        (["merge", "a.pt", "b.pt", "--frob"], "No such option: --frob", "pspctl merge --help"),
        (["merge"], "Missing argument 'inputs'.", "pspctl merge --help"),
        (["extract"], "Missing option '--context' / '-c'.", "pspctl extract --help"),
        (["mrege"], "No such command 'mrege'. Did you mean 'merge'?", "pspctl --help"),
    ],
)  # fmt: skip
def test_usage_errors_are_one_line_with_a_help_hint(workdir, args, start, hint):
    line = one_line(run(*args), 2)
    assert line.startswith(f"error: {start}") and line.endswith(f" (see {hint})")


def test_help_version_and_bare_pspctl_still_work():
    for args in (["--help"], ["merge", "--help"]):
        result = run(*args)
        assert result.exit_code == 0 and "Usage: pspctl" in result.stdout and result.stderr == ""
    assert run("--version").exit_code == 0
    bare = run()  # click's no_args_is_help: the help, exit 2
    assert bare.exit_code == 2 and "Usage: pspctl" in bare.stdout and bare.stderr == ""


def test_usage_error_from_the_entry_point():
    out = subprocess.run(
        [sys.executable, "-m", "pspctl", "merge", "a.pt", "b.pt", "--seed", "abc"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: Invalid value for '--seed': ")
    assert out.stderr.endswith(" (see python -m pspctl merge --help)\n")
