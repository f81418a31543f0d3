"""A task a superposed file names runs only if this user ran it with pspctl (pspctl.trust):
a header is data anyone can write, and loading a task runs its code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from pspctl import trust
from pspctl.cli import app
from pspctl.outputs import write_safetensors
from tests.conftest import MLP_TASK, save_models

runner = CliRunner()

TASK = MLP_TASK


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def merged(tmp_path, monkeypatch):
    """w.safetensors merged with `--task task.py`, in a fresh list of trusted tasks."""
    from tests.conftest import mlp

    monkeypatch.setenv(trust.ENV, str(tmp_path / "state" / "trusted.json"))
    monkeypatch.chdir(tmp_path)
    Path("task.py").write_text(TASK)
    save_models([mlp(i) for i in range(3)], tmp_path)
    result = run(
        "merge", "model0.pt", "model1.pt", "model2.pt", "--task", "task.py", "--superpose", "2.weight", "-q"
    )
    assert result.exit_code == 0, result.output
    return tmp_path / "w.safetensors"


def name_task(src: Path, dst: Path, task: str) -> None:
    """A copy of `src` whose header names `task`, checksums recomputed (anyone can)."""
    from pspctl.fileformat import SuperposedFile

    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["pspctl.header"])
    header["task"] = task
    meta["pspctl.header"] = json.dumps(header)
    import zlib

    from pspctl.outputs import crc32

    checksums = json.loads(meta["pspctl.checksums"])
    checksums["header"] = f"{zlib.crc32(meta['pspctl.header'].encode()):08x}"
    checksums["tensors"] = {n: crc32(t) for n, t in tensors.items()}
    meta["pspctl.checksums"] = json.dumps(checksums)
    write_safetensors(tensors, dst, meta)
    assert SuperposedFile(dst).header.task == task


def test_the_task_named_at_merge_runs_bare_and_is_remembered_by_content(merged):
    listed = json.loads(Path("state/trusted.json").read_text())
    assert listed["tasks"] == {trust.fingerprint(Path("task.py")): str(Path("task.py").resolve())}
    result = run("analyze", "-q", "--json", "a.json")
    assert result.exit_code == 0, result.output
    report = json.loads(Path("a.json").read_text())
    assert report["task"] == "task.py" and report["contexts"][0]["retrieved_metric"] is not None  # it ran
    assert run("export", "--context", "0", "-o", "m.onnx", "-q").exit_code == 0


def test_a_header_naming_a_task_never_run_does_not_run_it(merged):
    Path("payload.py").write_text(TASK + "\nimport pathlib\npathlib.Path('PWNED').write_text('ran')\n")
    name_task(merged, Path("evil.safetensors"), str(Path("payload.py").resolve()))
    for args in (
        ["export", "evil.safetensors", "--context", "0", "-o", "m.onnx"],
        ["tune", "evil.safetensors"],
    ):
        result = run(*args)
        assert result.exit_code == 4, result.output
        assert "names task file" in result.output and "running it executes its code" in result.output
        assert f"pass --task {Path('payload.py').resolve()}" in result.output
    result = run("analyze", "evil.safetensors", "-q")  # analyze goes on without it, and says so
    assert result.exit_code == 0, result.output
    assert "running it executes its code" in " ".join(result.output.split())
    assert not Path("PWNED").exists() and not Path("m.onnx").exists()
    name_task(merged, Path("mod.safetensors"), "this")  # a module name too: `import this` prints
    result = run("export", "mod.safetensors", "--context", "0", "-o", "m.onnx")
    assert result.exit_code == 4 and "The Zen of Python" not in result.output, result.output

    # The user's --task is consent: from then on the file's own name for it works too.
    result = run("export", "evil.safetensors", "--task", "payload.py", "--context", "0", "-o", "m.onnx", "-q")
    assert result.exit_code == 0 and Path("PWNED").exists(), result.output
    Path("PWNED").unlink()
    assert run("export", "evil.safetensors", "--context", "0", "-o", "m2.onnx", "-q").exit_code == 0


def test_an_edited_task_needs_task_again(merged):
    Path("task.py").write_text(TASK + "\n# edited\n")
    result = run("export", "--context", "0", "-o", "m.onnx")
    assert result.exit_code == 4 and "not with this content" in result.output, result.output
    assert run("export", "--task", "task.py", "--context", "0", "-o", "m.onnx", "-q").exit_code == 0
    assert run("export", "--context", "0", "-o", "m2.onnx", "-q").exit_code == 0


@pytest.mark.parametrize("store", ["corrupt", "a file as its folder"])
def test_a_list_that_cannot_be_read_or_written_only_asks_for_task_again(merged, monkeypatch, store):
    if store == "corrupt":
        Path("state/trusted.json").write_text("{not json")
    else:
        Path("blocker").write_text("")
        monkeypatch.setenv(trust.ENV, str(Path("blocker") / "trusted.json"))
    result = run("export", "--context", "0", "-o", "m.onnx")
    assert result.exit_code == 4, result.output
    result = run("export", "--task", "task.py", "--context", "0", "-o", "m.onnx", "-q")
    assert result.exit_code == 0, result.output
    assert trust.trusted(Path("task.py")) is (store == "corrupt")  # rewritten whole; or left as it is
