"""`pspctl analyze` and `merge --policy measured` end to end: exit codes, the text, what is written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pspctl.analysis import SCHEMA, analyze
from pspctl.cli import app
from pspctl.fileformat import SuperposedFile
from tests.conftest import mlp, save_models
from tests.test_analysis import TASK

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def flat(result) -> str:
    """The output with rich's line wrapping undone."""
    return " ".join(result.output.split())


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The user's merge directory: 3 models, a task file, `w.safetensors` merged with --task."""
    (tmp_path / "task.py").write_text(TASK)
    save_models([mlp(i) for i in range(3)], tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run(
        "merge", "model0.pt", "model1.pt", "model2.pt", "--superpose", "2.weight", "--task", "task.py", "-q"
    )
    assert result.exit_code == 0, result.output
    return tmp_path


def test_bare_analyze_finds_everything(workdir):
    result = run("analyze", "-q")
    assert result.exit_code == 0, result.output
    out = flat(result)
    assert out.index("summary") < out.index("function-space error per layer")  # summary first
    assert "storage ratio" in out and "winner" in out and "2.weight" in out
    assert "not what decides quality" in out
    assert "not found" not in out and "probe" not in out
    # The baseline's kept fraction, per context, as the summary's "kept" column shows it.
    kept = [f"{c.same_budget_density:.1%}" for c in analyze("w.safetensors").contexts]
    # Summary rows; narrow terminals wrap the label onto a second line without numbers.
    summary = result.output.split("function-space error per layer")[0]
    rows = [line.split("│") for line in summary.splitlines() if line.startswith("│ ")]
    rows = [r for r in rows if r[1].strip()[:1].isdigit()]
    assert [r[5].strip() for r in rows] == kept  # context, original, retrieved, same-budget, kept


def test_json_schema_matches_the_library(workdir):
    result = run("analyze", "--json", "report.json", "--sparsity", "0.5,0.9", "-q")
    assert result.exit_code == 0, result.output
    assert "wrote report.json" in result.output
    data = json.loads((workdir / "report.json").read_text())
    assert data["schema"] == SCHEMA and data["num_contexts"] == 3 and data["inputs"] == "calib"
    assert [p["sparsity"] for p in data["pruning"]] == [0.5, 0.9]
    lib = analyze("w.safetensors", sparsities=(0.5, 0.9)).to_dict()
    assert data["contexts"] == lib["contexts"] and data["layers"] == lib["layers"]
    for key in ("weights", "magnitudes", "edges", "advice", "storage_ratio", "notes"):
        assert key in data
    densities = [c["same_budget_density"] for c in data["contexts"]]
    assert len(densities) == 3 and all(0 < d < 1 for d in densities)


def test_an_existing_report_is_replaced_only_with_force(workdir):
    (workdir / "report.json").write_text("keep me")
    result = run("analyze", "--json", "report.json", "-q")
    assert result.exit_code == 8, result.output
    assert "report.json: already exists (pass --force to overwrite)" in flat(result)
    assert (workdir / "report.json").read_text() == "keep me"  # refused before any work
    result = run("analyze", "--json", "report.json", "--force", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads((workdir / "report.json").read_text())["num_contexts"] == 3


def test_json_and_plot_on_one_path_are_refused_before_any_work(workdir):
    result = run("analyze", "--json", "same.png", "--plot", "same.png", "-q")
    assert result.exit_code == 8 and "--json and --plot name one file" in flat(result)
    assert not (workdir / "same.png").exists()


def test_missing_originals_is_one_line_and_still_reports(workdir):
    (workdir / "gone").mkdir()
    for i in range(3):
        (workdir / f"model{i}.pt").rename(workdir / "gone" / f"model{i}.pt")
    result = run("analyze", "-q")
    assert result.exit_code == 0, result.output
    assert "originals not found (model0.pt, model1.pt, model2.pt): weight-space error skipped" in flat(result)
    explicit = ",".join(f"gone/model{i}.pt" for i in range(3))
    result = run("analyze", "--originals", explicit, "-q")
    assert result.exit_code == 0 and "not found" not in result.output


@pytest.mark.parametrize(
    ("task_text", "code", "message"),
    [
        ("x = 1\n", 9, "has no build_model() function"),
        (
            TASK.replace("48", "32"),
            3,
            "does not fit the task's model: other shape: 0.weight [48, 16] (model: [32, 16])",
        ),
        (
            TASK.split("def load_data")[0] + "def load_data(c, s):\n    return iter(())\n",
            9,
            "returned no batches",
        ),
    ],
)
def test_bad_task_one_error_line_nothing_written(workdir, task_text, code, message):
    (workdir / "bad.py").write_text(task_text)
    result = run("analyze", "--task", "bad.py", "--json", "r.json", "-q")
    assert result.exit_code == code
    assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (workdir / "r.json").exists()


def test_originals_with_wrong_hash_say_which(workdir):
    result = run("analyze", "--originals", "model1.pt,model1.pt,model2.pt", "--json", "r.json", "-q")
    assert result.exit_code == 3
    assert (
        "model1.pt does not match the sha256 recorded for context 0 (model0, merged from model0.pt)"
        in result.output
    )
    assert not (workdir / "r.json").exists()
    result = run("analyze", "--originals", "model0.pt,model1.pt", "-q")
    assert result.exit_code == 3 and "2 originals given for a file of 3 contexts" in result.output


def test_plot_without_matplotlib_says_how_to_install(workdir, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    result = run("analyze", "--plot", "p.png", "-q")
    assert result.exit_code == 1
    assert "pip install 'pspctl[plot]'" in result.output and not (workdir / "p.png").exists()


def test_plot_writes_a_png(workdir):
    pytest.importorskip("matplotlib")
    result = run("analyze", "--plot", "p.png", "-q")
    assert result.exit_code == 0, result.output
    assert (workdir / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_merge_policy_measured_records_measured_reasons(workdir):
    result = run(
        "merge", "model0.pt", "model1.pt", "model2.pt", "--task", "task.py", "--policy", "measured",
        "--max-drop", "100", "-o", "m.safetensors", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = {t["name"]: t for t in json.loads(result.output)["tensors"]}
    for name in ("0.weight", "2.weight", "4.weight"):
        assert rows[name]["role"] == "superposed" and rows[name]["reason"] == "measured"
    assert rows["0.bias"]["role"] == "per_context"
    assert SuperposedFile("m.safetensors").header.tensors["0.weight"].reason == "measured"

    result = run(
        "merge", "model0.pt", "model1.pt", "model2.pt", "--task", "task.py", "--policy", "measured",
        "--max-drop", "100", "--max-output-error", "1e-9", "-o", "s.safetensors", "--json",
    )  # fmt: skip
    rows = {t["name"]: t for t in json.loads(result.output)["tensors"]}
    assert all(
        rows[n]["role"] == "per_context" and rows[n]["reason"] == "measured" for n in ("0.weight", "2.weight")
    )

    result = run("merge", "model0.pt", "model1.pt", "--policy", "measured", "-o", "n.safetensors")
    assert result.exit_code == 7 and "--policy measured needs --task" in result.output
    result = run("merge", "model0.pt", "model1.pt", "--policy", "magic", "--task", "task.py")
    assert result.exit_code == 2 and "Invalid value for '--policy'" in result.output


def test_analyze_max_drop_recommends(workdir):
    result = run("analyze", "--max-drop", "100", "-q")
    assert result.exit_code == 0, result.output
    assert "measured policy for --max-drop 100" in flat(result)


def test_recorded_task_gone_is_a_note(workdir):
    (workdir / "task.py").rename(workdir / "elsewhere.py")
    result = run("analyze", "-q")
    assert result.exit_code == 0, result.output
    assert "task task.py (recorded by merge) not found: pass --task" in flat(result)
    assert "random probe inputs" not in flat(result) and "function-space error per layer" in flat(result)
    assert {r.method for r in analyze("w.safetensors").layers} == {"matrix"}


def test_analyze_and_info_fold_at_80_columns_never_cut(workdir, monkeypatch):
    """At 80 columns rich would cut cells to "conte…"/"model…", and layers could not be told
    apart; every table folds them onto more lines instead, and keeps numbers whole where they fit."""
    layers = analyze("w.safetensors").to_dict()["layers"]
    for columns in ("80", "60"):
        monkeypatch.setenv("COLUMNS", columns)
        for args in (("analyze", "-q"), ("info", "w.safetensors")):
            result = run(*args)
            assert result.exit_code == 0, result.output
            assert "…" not in result.output, args
            assert max(len(line) for line in result.output.splitlines()) <= int(columns)
            rows = [line for line in result.output.splitlines() if line.startswith("│")]
            assert rows and all(line.endswith("│") for line in rows), args  # no table cropped at the edge
            if args[0] == "analyze":  # the per-layer table's measured errors, each on one line
                assert all(f"{e['measured']:.3f}" in result.output for e in layers), columns
