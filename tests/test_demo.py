"""The README's main job: the bundled samples survive superposition with every kind."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pspctl.cli import app
from pspctl.demo import run_demo
from pspctl.errors import InputError

SAMPLES = Path(__file__).parents[1] / "samples"


def test_every_kind_retrieves_every_sample_model_within_two_points(tmp_path):
    rows = run_demo(SAMPLES, tmp_path)
    assert {(r.kind, r.context) for r in rows} == {
        (k, c) for k in ("binary", "complex", "rotation", "onepower") for c in range(4)
    }
    for r in rows:
        assert r.original > 96
        assert r.retrieved > r.original - 2, r
    ratios = {r.kind: r.storage_ratio for r in rows}
    # Binary stores one superposed copy + bits; complex doubles it; rotation pays K·M² for contexts.
    assert ratios["binary"] > 2 > ratios["complex"] > 1.5
    assert ratios["rotation"] == pytest.approx(
        1.0, abs=0.02
    )  # its contexts outweigh the saving: kept per context


def test_demo_command(tmp_path):
    result = CliRunner().invoke(
        app, ["demo", "--samples", str(SAMPLES), "-o", str(tmp_path), "--kind", "binary"]
    )
    assert result.exit_code == 0, result.output
    assert "binary" in result.output and "digits_3" in result.output
    assert (tmp_path / "binary.safetensors").is_file()


def test_demo_without_samples(tmp_path):
    with pytest.raises(InputError, match="no bundled samples here"):
        run_demo(tmp_path, tmp_path)


def test_models_that_do_not_fit_the_task_are_one_clear_error(tmp_path):
    import shutil

    import torch

    from pspctl.errors import MismatchError
    from tests.conftest import mlp

    (tmp_path / "models").mkdir()
    shutil.copy(SAMPLES / "digits_task.py", tmp_path / "digits_task.py")
    for i in range(2):  # consistent with each other, so the merge succeeds, but not digits-shaped
        torch.save(mlp(i).state_dict(), tmp_path / "models" / f"m{i}.pt")
    with pytest.raises(
        MismatchError,
        match=r"m0\.pt does not fit the task's model: other shape: 0\.weight \[48, 16\] \(model: \[256, 64\]\)",
    ):
        run_demo(tmp_path, tmp_path, kinds=["binary"])
