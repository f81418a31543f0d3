"""`--trust-pickle`: a corrupt file is still one line and an InputError, and pspctl says which
files ran pickled code.

Both need a change in pspctl/checkpoints.py (`_torch_load`, and a way for a Checkpoint to say
that it was unpickled with code); until then these tests are expected to fail.
"""

from __future__ import annotations

import io

import pytest
import torch
from typer.testing import CliRunner

from pspctl.cli import app
from tests.conftest import mlp

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save(mlp(0, width=8).state_dict(), "good.pt")
    return tmp_path


def _truncated(legacy: bool) -> bytes:
    buf = io.BytesIO()
    torch.save(mlp(1, width=8).state_dict(), buf, _use_new_zipfile_serialization=not legacy)
    data = buf.getvalue()
    return data[: len(data) // 2]


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_corrupt_file_with_trust_pickle_is_an_input_error(workdir, legacy):
    (workdir / "bad.pt").write_bytes(_truncated(legacy))
    assert run("merge", "good.pt", "bad.pt", "-q").exit_code == 2  # as without --trust-pickle
    result = run("merge", "good.pt", "bad.pt", "--trust-pickle", "-q")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith("error: bad.pt: corrupt or truncated checkpoint (")
    assert result.stderr.count("\n") == 1 and not (workdir / "w.safetensors").exists()


def test_trust_pickle_names_the_files_that_ran_pickled_code(workdir):
    torch.save(mlp(1, width=8), "whole.pt")  # a pickled module: only loads with --trust-pickle
    result = run("merge", "good.pt", "whole.pt", "--trust-pickle", "-q")
    assert result.exit_code == 0, result.output
    # good.pt is a plain state_dict, loaded without running code: not named.
    assert result.stderr == "warning: executed pickled code from whole.pt\n"
