"""docs/analyze.md's Python example, run as written on the bundled samples merged with their task."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pspctl.cli import app

ROOT = Path(__file__).parents[1]
DOC = (ROOT / "docs" / "analyze.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC, flags=re.S)


@pytest.fixture
def merged_samples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`w.safetensors` in the working directory, merged from the samples with --task, as the doc assumes."""
    shutil.copytree(ROOT / "samples", tmp_path / "samples", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    models = sorted(
        str(p.relative_to(tmp_path)) for p in (tmp_path / "samples" / "models").glob("digits_*.pt")
    )
    assert len(models) == 4
    result = CliRunner().invoke(
        app,
        ["merge", *models, "--task", "samples/digits_task.py", "--base", "none", "--max-error", "0.6", "-q"],
    )
    assert result.exit_code == 0, result.output
    return tmp_path


def test_in_python_example_runs(merged_samples):
    blocks = python_blocks()
    assert len(blocks) == 1  # a new block needs its own assertions here
    scope: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(blocks[0], scope)  # noqa: S102 - our own documentation
    report = scope["report"]
    # It found the originals and the task that merge recorded, and measured real numbers.
    assert report.originals is not None and report.inputs == "calib"
    assert [c.label for c in report.contexts] == [f"digits_{k}" for k in range(4)]
    lines = printed.getvalue().splitlines()
    assert len(lines) == 5
    for c, line in zip(report.contexts, lines, strict=False):
        assert line.split()[0] == c.label and line.split()[-1] in ("psp", "pruning", "tie")
        assert 90 < c.original_metric <= 100 and 90 < c.retrieved_metric <= 100
    worst = report.worst_layers()[0]
    assert lines[4] == f"{worst.name} {worst.measured} {worst.predicted}"
    assert worst.name == "2.weight" and worst.measured == pytest.approx(worst.predicted, rel=0.2)
