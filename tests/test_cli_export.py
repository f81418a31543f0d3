"""`pspctl export` end to end: exit codes, the validation table, and one line per bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pspctl.cli import app
from pspctl.cli import export as cli_export
from pspctl.onnx_export import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL
from tests.conftest import MLP_TASK, mlp, save_models

runner = CliRunner()

TASK = MLP_TASK.split("def load_data")[0]  # no data: validated on example_inputs()


def _reference(model, inputs):
    from pspctl.onnx_export.validate import torch_outputs

    return torch_outputs(model, inputs)


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    save_models([mlp(i) for i in range(3)], tmp_path)
    (tmp_path / "task.py").write_text(TASK)
    (tmp_path / "no_inputs.py").write_text(TASK.split("def example_inputs")[0])
    monkeypatch.chdir(tmp_path)
    result = run("merge", "model0.pt", "model1.pt", "model2.pt", "--labels", "a,b,c", "--task", "task.py",
                 "--superpose", "*", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    return tmp_path


def test_defaults_match_the_library():
    assert (cli_export.DEFAULT_OPSET, cli_export.DEFAULT_ATOL, cli_export.DEFAULT_RTOL) == (
        DEFAULT_OPSET, DEFAULT_ATOL, DEFAULT_RTOL,
    )  # fmt: skip


def test_multi_uses_the_recorded_task_and_prints_the_table(workdir):
    result = run("export", "--multi", "-o", "model.onnx")
    assert result.exit_code == 0, result.output
    assert "onnxruntime vs PyTorch on example_inputs()" in result.output
    for label in ("0 (a)", "1 (b)", "2 (c)"):
        assert label in result.output
    assert result.output.count(" ok ") == 3 and "wrote model.onnx" in result.output
    assert "multi-context graph" in result.output and "3 per-context graphs" in result.output
    assert (workdir / "model.onnx").is_file()


def test_per_context_all_json(workdir):
    result = run("export", "w.safetensors", "--context", "all", "-o", "graphs", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["passed"] and not data["multi"] and data["opset"] == DEFAULT_OPSET
    assert sorted(p.name for p in (workdir / "graphs").iterdir()) == ["a.onnx", "b.onnx", "c.onnx"]
    assert [c["label"] for c in data["checks"]] == ["a", "b", "c"]


def test_failed_validation_exits_10_and_writes_nothing(workdir, monkeypatch):
    from pspctl.onnx_export import api

    # A reference 1e-3 off: whether W(c ⊙ x) and (W ⊙ c)x round alike depends on the CPU, so an
    # atol of 0 alone does not fail everywhere; a shifted reference does.
    monkeypatch.setattr(
        api, "torch_outputs", lambda model, inputs: [o + 1e-3 for o in _reference(model, inputs)]
    )
    result = run("export", "--multi", "-o", "b.onnx", "--atol", "1e-4", "--rtol", "0")
    assert result.exit_code == 10, result.output
    assert "FAIL" in result.output and "differ from PyTorch beyond atol=0.0001, rtol=0" in result.output
    assert not (workdir / "b.onnx").exists()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--multi", "--context", "0"], 2, "pass exactly one of --context K|LABEL|all and --multi"),
        (["--multi", "--atol", "-1"], 2, "--atol -1 / --rtol 0.001: tolerances cannot be negative"),
        (["--multi", "--batch", "0"], 2, "batch 0: the batch size to tune for must be at least 1"),
        (["--context", "d"], 6, "unknown context 'd'; labels are a, b, c"),
        (["--context", "7"], 6, "context 7 out of range: this file holds contexts 0..2"),
        (["--multi", "--task", "no_inputs.py"], 9, "task file no_inputs.py has no example_inputs() function"),
        (["--multi", "--task", "missing.py"], 2, "task file missing.py does not exist"),
        (["--context", "all", "-o", "task.py"], 8, "task.py: is a file; --context all needs a directory"),
    ],
)
def test_bad_input_one_line(workdir, args, code, message):
    if "-o" not in args:
        args = [*args, "-o", "out.onnx"]
    result = run("export", *args)
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}")
    assert not (workdir / "out.onnx").exists()


def test_no_recorded_task(workdir):
    assert run("merge", "model0.pt", "model1.pt", "-o", "plain.safetensors", "-q").exit_code == 0
    result = run("export", "plain.safetensors", "--multi", "-o", "m.onnx")
    assert result.exit_code == 9
    assert result.output.strip() == "error: plain.safetensors records no task file; pass --task"


def test_multi_json_says_how_each_tensor_is_served(workdir):
    """--superpose '*': every weight bound on the input side, the biases gathered."""
    result = run("export", "--multi", "-o", "m.onnx", "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.output)["layers"]
    assert layers == {f"{i}.weight": "input side" for i in (0, 2, 4)} | {
        f"{i}.bias": "gather" for i in (0, 2, 4)
    }


def test_a_task_file_importing_its_neighbour(workdir):
    """`--task sub/task.py` whose file does `from net import build` (sub/net.py) works from any cwd."""
    sub = workdir / "sub"
    sub.mkdir()
    (sub / "net.py").write_text("from tests.conftest import mlp\n\ndef build():\n    return mlp(0)\n")
    (sub / "task.py").write_text(TASK.replace("from tests.conftest import mlp", "from net import build as mlp_0")
                                 .replace("return mlp(0)", "return mlp_0()"))  # fmt: skip
    result = run("export", "--multi", "--task", "sub/task.py", "-o", "n.onnx")
    assert result.exit_code == 0, result.output
    assert (workdir / "n.onnx").is_file()
