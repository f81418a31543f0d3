"""The README's examples, run as written (from a temporary copy of the samples)."""

import re
import shlex
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pspctl.cli import app

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.fixture
def repo_copy(tmp_path, monkeypatch):
    shutil.copytree(ROOT / "samples", tmp_path / "samples", ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_by_hand_commands_and_python_snippet(repo_copy):
    commands = [
        line.split("#")[0].strip() for line in blocks("bash")[1].splitlines() if line.startswith("pspctl ")
    ]
    assert len(commands) == 4
    for command in commands:
        args = shlex.split(command)[1:]
        # The shell expands the glob; CliRunner does not.
        args = [str(p) for a in args for p in (sorted(repo_copy.glob(a)) if "*" in a else [a])]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (command, result.output)
    assert sorted(p.name for p in (repo_copy / "models").iterdir())[-1] == "digits_3.safetensors"

    snippet = blocks("python")[0]
    expected = float(re.search(r"# \{'accuracy': ([\d.]+)\}", snippet).group(1))
    scope: dict = {}
    exec(snippet.replace("print(", "result = ("), scope)  # noqa: S102 - our own README
    # ±0.5: another CPU's BLAS may round one borderline test digit (1/450 = 0.22 points) the other way.
    assert scope["result"]["accuracy"] == pytest.approx(expected, abs=0.5)
