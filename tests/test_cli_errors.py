"""No tracebacks, ever: every failure is one line on stderr and a documented exit code."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import signal
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
def python_sigint():
    """Python's own SIGINT handler, as in a pspctl process started from a terminal. A test run
    started as a background job (`pytest &`, as CI scripts may) inherits SIGINT ignored, which
    pspctl leaves alone by design: Ctrl-C tests without this failed only in such runs."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def merge_raises(monkeypatch):
    """Make the library's merge raise `exc`: a stand-in for a bug."""

    def install(exc: BaseException) -> None:
        def boom(*args, **kwargs):
            raise exc

        # By module object, as the CLI's lazy `from pspctl.merge import merge` finds it.
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


def test_ctrl_c_while_the_libraries_are_imported_is_one_line_too(workdir, monkeypatch):
    from pspctl.cli import common

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(common, "_import_libraries", interrupted)
    assert one_line(run("merge", "model0.pt", "model1.pt", "-q"), 130) == "error: interrupted"


def test_ctrl_c_after_an_interrupted_import_imports_nothing_more(workdir, monkeypatch):
    """The way out after a Ctrl-C in torch's import must not import torch again (it used to,
    through pspctl.checkpoints: a traceback of `partially initialized module 'torch'`)."""
    from pspctl.cli import common

    def interrupted() -> None:
        raise KeyboardInterrupt

    class HalfImported(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith(("torch.", "pspctl.")):
                raise AttributeError("partially initialized module 'torch' has no attribute 'autograd'")
            return None

    monkeypatch.setattr(common, "_import_libraries", interrupted)
    for name in [m for m in sys.modules if m == "torch" or m.startswith("pspctl.checkpoints")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [HalfImported(), *sys.meta_path])
    assert one_line(run("merge", "model0.pt", "model1.pt", "-q"), 130) == "error: interrupted"


def test_ctrl_c_during_the_import_of_torch_waits_for_it_to_finish(workdir, monkeypatch, python_sigint):
    """torch's import is not safe to interrupt (pybind11 aborts, or a half-made module is left
    in sys.modules): a Ctrl-C in it is held until it ends, then it is the usual one line.

    The import is stood in for inside the hold, not by removing torch from sys.modules: that
    is process-wide, and under load another thread of the test process re-imported torch
    first, so the stand-in never ran (a flaky pass of the whole merge)."""
    from pspctl import interrupts
    from pspctl.cli import common

    finished = []

    def slow_import() -> None:
        with interrupts.held():
            signal.raise_signal(signal.SIGINT)  # Ctrl-C, halfway through the import
            finished.append("torch")  # the import goes on to its end

    monkeypatch.setattr(common, "_import_libraries", slow_import)
    assert one_line(run("merge", "model0.pt", "model1.pt", "-q"), 130) == "error: interrupted"
    assert finished == ["torch"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back
    assert not (workdir / "w.safetensors").exists()  # nothing written


def test_a_failure_after_a_swallowed_ctrl_c_is_reported_as_the_interruption(
    workdir, monkeypatch, merge_raises, python_sigint
):
    """torch's exporter, interrupted while it imports its modules, swallows the
    KeyboardInterrupt and fails later ("partially initialized module"): that is the Ctrl-C,
    exit 130, not a trace failure (exit 9) or a bug (exit 1)."""
    import contextlib

    from pspctl.errors import TaskError

    for failure, code in (
        (AttributeError("partially initialized module 'torch._dynamo'"), 1),
        (TaskError("x"), 9),
    ):
        merge_raises(failure)  # without a Ctrl-C, the failure keeps its own code
        assert run("merge", "model0.pt", "model1.pt", "-q").exit_code == code

        def swallowing(*args, failure=failure, **kwargs):
            with contextlib.suppress(KeyboardInterrupt):  # what the library did with it
                signal.raise_signal(signal.SIGINT)
            raise failure

        monkeypatch.setattr(importlib.import_module("pspctl.merge"), "merge", swallowing)
        assert one_line(run("merge", "model0.pt", "model1.pt", "-q"), 130) == "error: interrupted"
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # given back


def test_a_ctrl_c_python_cannot_raise_stops_the_command_before_its_output(
    workdir, monkeypatch, python_sigint
):
    """A Ctrl-C that lands in a weakref callback (a sharded merge freeing its inputs) cannot be
    raised: Python printed "Exception ignored ... KeyboardInterrupt", the merge went on and
    exited 0. Now nothing is written, exit 130, one line."""
    import gc
    import weakref

    merge_module = importlib.import_module("pspctl.merge")
    real_merge = merge_module.merge

    class Freed:
        pass

    def merge_freeing(*args, **kwargs):
        freed = Freed()
        weakref.finalize(freed, signal.raise_signal, signal.SIGINT)  # Ctrl-C inside the callback
        del freed
        gc.collect()
        return real_merge(*args, **kwargs)  # goes on, as after an ignored exception

    monkeypatch.setattr(merge_module, "merge", merge_freeing)
    hook = sys.unraisablehook
    assert one_line(run("merge", "model0.pt", "model1.pt", "-q"), 130) == "error: interrupted"
    assert not (workdir / "w.safetensors").exists()
    assert sys.unraisablehook is hook  # given back


def test_a_ctrl_c_while_the_output_is_moved_into_place_names_it_complete(workdir, monkeypatch, python_sigint):
    """The moves that publish outputs are not interrupted halfway; a Ctrl-C during them says
    that the output is there and complete (it said "interrupted", as if nothing had been)."""
    from safetensors import safe_open

    from pspctl import outputs

    real_publish = outputs._publish

    def publish_interrupted(tmp, path, *, force):
        signal.raise_signal(signal.SIGINT)
        real_publish(tmp, path, force=force)

    monkeypatch.setattr(outputs, "_publish", publish_interrupted)
    line = one_line(run("merge", "model0.pt", "model1.pt", "-q"), 130)
    assert line == "error: interrupted after writing w.safetensors (complete)"
    with safe_open(workdir / "w.safetensors", "pt") as f:  # whole and readable
        assert len(list(f.keys())) > 0

    # Used as a library (no command noting Ctrl-C), it is raised once every move is done.
    (workdir / "out").mkdir()
    with pytest.raises(KeyboardInterrupt), outputs.staged_folder(workdir / "out", ["a", "b"]) as staging:
        for name in "ab":
            (staging / name).write_text(name)
    assert sorted(p.name for p in (workdir / "out").iterdir()) == ["a", "b"]


def test_ctrl_c_while_the_options_are_parsed_is_one_line_too(workdir, monkeypatch):
    """merge's inputs start hashing in a callback while click parses: typer made a Ctrl-C there
    a silent exit 130."""
    from pspctl.cli import common

    def interrupted(value):
        raise KeyboardInterrupt

    monkeypatch.setattr(common.digests, "prefetch", interrupted)
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


ENDS = """
import atexit, signal, sys
import typer.main

if sys.argv[1] == "building":  # Ctrl-C while typer builds the click command, before it runs
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    typer.main.get_command = interrupted
else:  # Ctrl-C while Python shuts down, after the command has finished
    atexit.register(signal.raise_signal, signal.SIGINT)
sys.argv = ["pspctl", "info", sys.argv[2]]
from pspctl.cli import main
main()
"""


LOADING = """
import sys

class Interrupted:  # Ctrl-C while typer loads, as pspctl's command line is imported
    def find_spec(self, name, path=None, target=None):
        if name == "typer":
            raise KeyboardInterrupt

sys.meta_path.insert(0, Interrupted())
import pspctl.cli
"""


def test_ctrl_c_while_the_command_line_loads_is_one_line_and_exit_130():
    """Raised as SystemExit out of that import, the process sometimes still died by the signal."""
    out = subprocess.run(
        [sys.executable, "-c", LOADING], capture_output=True, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    assert (out.returncode, out.stdout, out.stderr) == (130, "", "error: interrupted\n")


@pytest.mark.parametrize("when", ["building", "shutdown"])
def test_ctrl_c_before_and_after_the_command_is_one_line_or_its_own_exit(workdir, when):
    """A Ctrl-C while typer builds the command printed a KeyboardInterrupt traceback; one while
    Python shut down after the command printed "Exception ignored in atexit callback" or
    killed the process by the signal. The first is the usual one line, exit 130; after the
    command, the process ends at once with its own exit code and output, without Python's
    shutdown (the atexit callback that sends the Ctrl-C never runs)."""
    assert run("merge", "model0.pt", "model1.pt", "-q").exit_code == 0
    out = subprocess.run(
        [sys.executable, "-c", ENDS, when, "w.safetensors"],
        capture_output=True, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as from a terminal
    )  # fmt: skip
    if when == "building":
        assert (out.returncode, out.stdout, out.stderr) == (130, "", "error: interrupted\n")
    else:
        assert out.returncode == 0 and out.stderr == "" and "2 contexts" in out.stdout


def test_a_ctrl_c_while_analyze_plots_leaves_neither_output(workdir, monkeypatch):
    """analyze --json --plot moved the JSON into place before it plotted: a Ctrl-C or a
    failure while plotting left the JSON alone. Now the JSON waits for the plot."""
    from pspctl.analysis import plot

    assert run("merge", "model0.pt", "model1.pt", "-q").exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plot, "plot_report", interrupted)
    result = run("analyze", "--json", "a.json", "--plot", "a.png", "-q")
    assert result.exit_code == 130 and result.stderr == "error: interrupted\n"  # after the report
    assert not (workdir / "a.json").exists() and not (workdir / "a.png").exists()
    assert not list(workdir.glob(".*pspctl-tmp"))


def test_only_the_outputs_the_user_named_are_reported_written(tmp_path, python_sigint):
    """`interrupts.written` names the outputs as the user knows them: each file of a staged
    folder (not the folder, nor the temporary files staged in it), and not the trust store."""
    from pspctl import interrupts
    from pspctl.outputs import atomic_path, staged_folder

    with interrupts.noted():
        with staged_folder(tmp_path / "out", ["a.onnx", "b.onnx"]) as staging:
            for name in ("a.onnx", "b.onnx"):
                with atomic_path(staging / name) as tmp:  # extract --context all writes so
                    tmp.write_text(name)
        with atomic_path(tmp_path / "trusted.json", force=True, output=False) as tmp:
            tmp.write_text("{}")
        with atomic_path(tmp_path / "w.json") as tmp:
            tmp.write_text("{}")
        assert interrupts.written() == [
            str(tmp_path / "out" / "a.onnx"),
            str(tmp_path / "out" / "b.onnx"),
            str(tmp_path / "w.json"),
        ]
    assert interrupts.written() == []  # forgotten with the command


def test_a_second_ctrl_c_waits_for_the_clean_up(tmp_path, monkeypatch, python_sigint):
    """Two quick Ctrl-Cs: the second aborted the removal of the staging folder, which was left
    with its files (a sharded merge, extract --context all). It now waits for it."""
    from pspctl import outputs

    real_rmtree = outputs.shutil.rmtree

    def rmtree_interrupted(path, *args, **kwargs):
        signal.raise_signal(signal.SIGINT)  # the second Ctrl-C, as the clean-up starts
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(outputs.shutil, "rmtree", rmtree_interrupted)
    with pytest.raises(KeyboardInterrupt), outputs.staged_folder(tmp_path / "out", ["a", "b"]) as staging:
        (staging / "a").write_text("a")
        raise KeyboardInterrupt  # the first
    assert list(tmp_path.iterdir()) == []  # no staging folder, no files, no out/


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


# --- a task file's functions fail -----------------------------------------------------------

TASK = """
import torch
from tests.conftest import mlp

def build_model():
    return mlp(0, width=8)

def example_inputs():
    return (torch.randn(3, 16),)

def load_data(context, split):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(context))
    yield x, (x[:, context] > 0).long()
"""
BROKEN = {
    "build_raises": TASK.replace("return mlp(0, width=8)", "raise ValueError('width must be positive')"),
    "build_none": TASK.replace("return mlp(0, width=8)", "return None"),
    "data_raises": TASK.replace(
        "    x = torch.randn", "    raise KeyError('DATA_ROOT')\n    x = torch.randn"
    ),
    "inputs_raise": TASK.replace("return (torch.randn(3, 16),)", "raise FileNotFoundError('examples.npy')"),
    "evaluate_raises": TASK + "\ndef evaluate(model, context):\n    raise RuntimeError('no GPU')\n",
    "misfit": TASK.replace("randn(32, 16", "randn(32, 20").replace("randn(3, 16)", "randn(3, 20)"),
    "misfit_train": TASK.replace("randn(32, 16", "randn(32, 16 if split == 'test' else 20"),
}
TRAIN = ["train", "--contexts", "2", "--steps", "2", "-q", "-o", "t.safetensors", "--task"]
EXPORT = ["export", "--multi", "-o", "m.onnx", "--task"]


@pytest.fixture
def taskdir(workdir):
    (workdir / "task.py").write_text(TASK)
    for name, text in BROKEN.items():
        (workdir / f"{name}.py").write_text(text)
    result = run("merge", "model0.pt", "model1.pt", "--task", "task.py", "--superpose", "*", "-q")
    assert result.exit_code == 0, result.output
    return workdir


@pytest.mark.parametrize(
    ("command", "task", "message"),
    [
        (TRAIN, "build_raises", "build_model() failed: ValueError: width must be positive"),
        (EXPORT, "build_none", "build_model() returned NoneType, not a torch.nn.Module"),
        (TRAIN, "data_raises", "load_data(0, 'test') failed: KeyError: 'DATA_ROOT'"),
        (["analyze", "-q", "--task"], "data_raises", "load_data(0, 'calib') failed: KeyError: 'DATA_ROOT'"),
        (["export", "-c", "0", "-o", "m.onnx", "--task"], "inputs_raise", "example_inputs() failed: FileNotFoundError: examples.npy"),
        (["tune", "--steps", "2", "-q", "--task"], "evaluate_raises", "evaluate(model, 0) failed: RuntimeError: no GPU"),
        (TRAIN, "misfit", "its model does not fit load_data(0, 'test'): RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x20 and 16x8)"),
        (TRAIN, "misfit_train", "its model does not fit load_data(0, 'train'): RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x20 and 16x8)"),
        (EXPORT, "misfit", "its model does not fit example_inputs(): RuntimeError: mat1 and mat2 shapes cannot be multiplied (3x20 and 16x8)"),
        (["analyze", "-q", "--task"], "misfit", "its model does not fit load_data(0, 'calib'): RuntimeError: mat1 and mat2 shapes cannot be multiplied (32x20 and 16x8)"),
    ],
)  # fmt: skip
def test_a_failing_task_function_is_one_line_naming_it(taskdir, command, task, message):
    before = sorted(p.name for p in taskdir.iterdir())
    line = one_line(run(*command, f"{task}.py"), 9)
    assert line == f"error: task file {task}.py: {message}"
    assert sorted(p.name for p in taskdir.iterdir()) == before


def test_debug_shows_where_the_task_file_failed(taskdir):
    result = run("--debug", *TRAIN, "build_raises.py")
    assert result.exit_code == 9
    assert 'build_raises.py", line 6, in build_model' in result.stderr
    assert result.stderr.endswith(
        "error: task file build_raises.py: build_model() failed: ValueError: width must be positive\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["merge", "model0.pt", "model1.pt", "--eta", "0"],
            "--eta 0: η, the alignment of inputs with weights, is in (0, 1]",
        ),
        (["merge", "model0.pt", "model1.pt", "--eta", "nan"], "Invalid value for '--eta'"),
        (["merge", "model0.pt", "model1.pt", "--eta", "-0.1"], "Invalid value for '--eta'"),
        (["merge", "model0.pt", "model1.pt", "--max-error", "nan"], "Invalid value for '--max-error'"),
        (["merge", "model0.pt", "model1.pt", "--max-error", "-1"], "Invalid value for '--max-error'"),
        (
            ["merge", "model0.pt", "model1.pt", "--max-interference", "inf"],
            "Invalid value for '--max-interference'",
        ),
        (["merge", "model0.pt", "model1.pt", "--min-share", "2"], "Invalid value for '--min-share'"),
        (["tune", "--steps", "1", "--lr", "inf"], "Invalid value for '--lr': inf is not a finite number"),
        (
            ["train", "--task", "t.py", "-k", "2", "--dist-timeout", "inf"],
            "Invalid value for '--dist-timeout'",
        ),
        (["train", "--task", "t.py", "-k", "2", "--dist-timeout", "0"], "Invalid value for '--dist-timeout'"),
        (["tune", "--steps", "1", "--eval-every", "-2"], "Invalid value for '--eval-every'"),
        (
            ["export", "--context", "0", "-o", "x.onnx", "--atol", "nan"],
            "Invalid value for '--atol': nan is not a finite number",
        ),
        (["analyze", "--max-drop", "-1"], "Invalid value for '--max-drop'"),
    ],
)
def test_bad_numbers_are_usage_errors_and_nothing_is_written(workdir, args, message):
    """NaN, infinities and out-of-range numbers: exit 2 before any work, not a bug (exit 1),
    not a merge that superposes everything at a 'predicted' error of 0 (--eta inf)."""
    line = one_line(run(*args, "-q"), 2)
    assert message in line, line
    assert sorted(p.name for p in workdir.iterdir()) == ["model0.pt", "model1.pt"]


def test_the_library_refuses_what_no_prediction_can_use():
    import math

    from pspctl.errors import InputError
    from pspctl.policy import Policy

    assert Policy(max_interference=0.0).max_interference == 0  # every tensor per context
    for bad in (
        {"eta": 0.0},
        {"eta": 1.5},
        {"max_error": math.nan},
        {"max_error": -0.1},
        {"min_share": -1.0},
    ):
        with pytest.raises(InputError):
            Policy(**bad)
    assert Policy(max_error=math.inf).max_error == math.inf  # no budget: the shape rules' setting
