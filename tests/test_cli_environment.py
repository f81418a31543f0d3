"""A full disk, a read-only directory, a denied permission: one line naming the path, exit 8
when writing (2 when reading), and no traceback.

Tests run as root in CI, where chmod does not stop writes; so the writers are made to raise
the OSError the OS would, and the real chmod variants run only for other users.
"""

from __future__ import annotations

import errno
import importlib
import os

import pytest
from typer.testing import CliRunner

from pspctl.cli import app
from tests.conftest import mlp, save_models

runner = CliRunner()
not_root = pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories")

TASK = """
import torch
from tests.conftest import mlp

def build_model():
    return mlp(0, width=8)

def example_inputs():
    return (torch.randn(3, 16, generator=torch.Generator().manual_seed(0)),)

def load_data(context, split):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(context))
    return [(x, (x[:, context] > 0).long())]
"""


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line(result, code: int) -> str:
    assert result.exit_code == code, result.output
    assert result.stdout == "" and result.stderr.count("\n") == 1, result.output
    return result.stderr.rstrip("\n")


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    save_models([mlp(i, width=8) for i in range(2)], tmp_path)
    (tmp_path / "task.py").write_text(TASK)
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def disk_full(monkeypatch, module: str, name: str) -> None:
    """`module.name(..., path, ...)` raises ENOSPC for its path argument, as a full disk does."""

    def full(*args, **kwargs):
        path = next(str(a) for a in args if isinstance(a, (str, os.PathLike)))
        raise OSError(errno.ENOSPC, "No space left on device", path)

    monkeypatch.setattr(importlib.import_module(module), name, full)


def read_only(monkeypatch) -> None:
    """Creating a file or directory in out/ is denied, as in a read-only directory."""
    real_open, real_mkdir = os.open, os.mkdir

    def in_out(path) -> bool:
        return os.path.basename(os.path.dirname(os.path.abspath(path))) == "out"

    def deny_open(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and in_out(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    def deny_mkdir(path, *args, **kwargs):
        if in_out(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_mkdir(path, *args, **kwargs)

    def deny_into(real):
        def move(src, dst, *args, **kwargs):
            if in_out(dst):
                raise PermissionError(errno.EACCES, "Permission denied", os.fspath(src), None, os.fspath(dst))
            return real(src, dst, *args, **kwargs)

        return move

    monkeypatch.setattr(os, "open", deny_open)
    monkeypatch.setattr(os, "mkdir", deny_mkdir)
    for name in ("link", "replace", "rename"):
        monkeypatch.setattr(os, name, deny_into(getattr(os, name)))


def merged(workdir) -> None:
    result = run("merge", "model0.pt", "model1.pt", "--task", "task.py", "--superpose", "*", "-q")
    assert result.exit_code == 0, result.output


# --- a full disk --------------------------------------------------------------------------


def test_merge_on_a_full_disk(workdir, monkeypatch):
    disk_full(monkeypatch, "pspctl.fileformat", "write_safetensors")
    line = one_line(run("merge", "model0.pt", "model1.pt", "-o", "out/w.safetensors", "-q"), 8)
    # The atomic write's temporary file is named as the output it stands for.
    assert line == "error: out/w.safetensors: cannot write: No space left on device"
    assert os.listdir("out") == []


def test_extract_on_a_full_disk(workdir, monkeypatch):
    merged(workdir)
    disk_full(monkeypatch, "pspctl.checkpoints", "write_safetensors")
    line = one_line(run("extract", "--context", "0", "-o", "out/m0.safetensors"), 8)
    assert line == "error: out/m0.safetensors: cannot write: No space left on device"


def test_export_on_a_full_disk(workdir, monkeypatch):
    merged(workdir)
    disk_full(monkeypatch, "pspctl.onnx_export.api", "to_onnx")
    line = one_line(run("export", "--multi", "-o", "out/m.onnx"), 8)
    # Named as the output, not as the staging directory the graph is written to first.
    assert line == "error: out/m.onnx: cannot write: No space left on device"
    assert os.listdir("out") == []


def test_train_on_a_full_disk(workdir, monkeypatch):
    disk_full(monkeypatch, "pspctl.fileformat", "write_safetensors")
    result = run(
        "train", "--task", "task.py", "--contexts", "2", "--steps", "2", "-o", "out/t.safetensors", "-q"
    )
    assert one_line(result, 8) == "error: out/t.safetensors: cannot write: No space left on device"


# --- a read-only directory ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "output"),
    [
        (["merge", "model0.pt", "model1.pt", "-q", "-o"], "out/w.safetensors"),
        (["extract", "--context", "1", "-o"], "out/m1.pt"),
        (["export", "--context", "0", "-o"], "out/m.onnx"),
        (["train", "--task", "task.py", "--contexts", "2", "--steps", "2", "-q", "-o"], "out/t.safetensors"),
        (["tune", "--steps", "2", "-q", "-o"], "out/tuned.safetensors"),
    ],
)  # fmt: skip
def test_read_only_output_directory(workdir, monkeypatch, command, output):
    merged(workdir)
    read_only(monkeypatch)
    line = one_line(run(*command, output), 8)
    assert line == f"error: {output}: cannot write: Permission denied"


@not_root
def test_read_only_output_directory_for_real(workdir):
    os.chmod("out", 0o555)
    try:
        line = one_line(run("merge", "model0.pt", "model1.pt", "-o", "out/w.safetensors", "-q"), 8)
    finally:
        os.chmod("out", 0o755)
    assert line == "error: out/w.safetensors: cannot write: Permission denied"


# --- reading --------------------------------------------------------------------------------


def test_unreadable_input_is_an_input_error(workdir, monkeypatch):
    def denied(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(importlib.import_module("pspctl.checkpoints"), "_torch_load", denied)
    line = one_line(run("merge", "model0.pt", "model1.pt", "-q"), 2)
    assert line == "error: model0.pt: cannot read: Permission denied"


@not_root
def test_unreadable_input_for_real(workdir):
    os.chmod("model1.pt", 0)
    try:
        line = one_line(run("merge", "model0.pt", "model1.pt", "-q"), 2)
    finally:
        os.chmod("model1.pt", 0o644)
    assert line == "error: model1.pt: cannot read: Permission denied"


def test_debug_shows_the_os_error_and_keeps_the_exit_code(workdir, monkeypatch):
    disk_full(monkeypatch, "pspctl.fileformat", "write_safetensors")
    result = run("--debug", "merge", "model0.pt", "model1.pt", "-o", "out/w.safetensors", "-q")
    assert result.exit_code == 8 and result.stderr.startswith("Traceback (most recent call last):")
    assert "OSError: [Errno 28] No space left on device" in result.stderr
    assert result.stderr.endswith("error: out/w.safetensors: cannot write: No space left on device\n")
