"""pspctl.sources: every command finds the originals and the task file the same way, also when
run from another directory than the merge's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pspctl.analysis import analyze
from pspctl.errors import InputError, TaskError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.policy import Policy
from pspctl.sources import locate_originals, recorded_task, require_task
from tests.test_training import make_originals, run, write_task


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A merge in `tmp_path/merge` with relative recorded paths; the user is now in `tmp_path`."""
    folder = tmp_path / "merge"
    folder.mkdir()
    monkeypatch.chdir(folder)
    task = write_task(folder)
    paths = [p.relative_to(folder) for p in make_originals(folder, task)]
    merge(paths, "w.safetensors", MergeOptions(task="task.py", policy=Policy(superpose=("*weight",))))
    monkeypatch.chdir(tmp_path)
    return folder / "w.safetensors"


def test_originals_and_task_are_found_beside_the_file(elsewhere):
    sf = SuperposedFile(Path("merge/w.safetensors"))
    assert [i["path"] for i in sf.header.inputs] == ["orig0.safetensors", "orig1.safetensors"]
    located = locate_originals(sf)
    assert located.found and located.paths == [
        Path("merge/orig0.safetensors"),
        Path("merge/orig1.safetensors"),
    ]
    assert recorded_task(sf) == ("merge/task.py", True)
    assert require_task(sf, None, "load_data").source == "merge/task.py"


def test_tune_from_another_directory_distills_like_analyze_finds_the_originals(elsewhere):
    report = analyze("merge/w.safetensors", max_samples=32)
    assert report.originals == ["merge/orig0.safetensors", "merge/orig1.safetensors"]
    assert not any("not found" in n for n in report.notes)
    result = run("tune", "merge/w.safetensors", "--steps", 2, "-o", "t.safetensors", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["objective"] == "distill" and data["originals"] is not None

    # Gone from both places: analyze notes it, tune falls back to the task loss or, asked to
    # distill, says why it cannot.
    for k in range(2):
        (elsewhere.parent / f"orig{k}.safetensors").unlink()
    assert any("originals not found" in n for n in analyze("merge/w.safetensors", max_samples=32).notes)
    result = run("tune", "merge/w.safetensors", "--steps", 2, "-o", "t2.safetensors", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["objective"] == "task"
    result = run(
        "tune", "merge/w.safetensors", "--steps", 2, "-o", "t3.safetensors", "--objective", "distill"
    )
    assert result.exit_code == 2 and "original orig0.safetensors not found" in result.output


def test_relative_paths_are_recorded_relative_to_the_file(tmp_path, monkeypatch):
    """Inputs, base, task in one folder, the merge written to another, from a third: the file
    records them relative to itself, so they are found from any working directory, and a file
    tune writes elsewhere records them relative to itself in turn."""
    models, out = tmp_path / "models", tmp_path / "out"
    models.mkdir()
    out.mkdir()
    task = write_task(models)
    paths = make_originals(models, task, K=3)
    monkeypatch.chdir(tmp_path)
    rel = [p.relative_to(tmp_path) for p in paths]
    options = MergeOptions(
        base=str(rel[2]), link_base=True, task="models/task.py", policy=Policy(superpose=("*weight",))
    )
    merge(rel[:2], "out/w.safetensors", options)
    sf = SuperposedFile(out / "w.safetensors")
    assert [i["path"] for i in sf.header.inputs] == [
        "../models/orig0.safetensors",
        "../models/orig1.safetensors",
    ]
    assert (sf.header.base["path"], sf.header.task) == ("../models/orig2.safetensors", "../models/task.py")

    for where in (out, models, Path("/")):
        monkeypatch.chdir(where)
        sf = SuperposedFile(out / "w.safetensors")
        assert locate_originals(sf).paths == [
            out / ".." / "models" / f"orig{k}.safetensors" for k in range(2)
        ]
        assert recorded_task(sf) == (str(out / ".." / "models" / "task.py"), True)
        assert sf.linked_base().path == out / ".." / "models" / "orig2.safetensors"

    result = run("tune", out / "w.safetensors", "--steps", 1, "-o", tmp_path / "t.safetensors")
    assert result.exit_code == 0, result.output
    tuned = SuperposedFile(tmp_path / "t.safetensors")
    assert [i["path"] for i in tuned.header.inputs] == [
        "models/orig0.safetensors",
        "models/orig1.safetensors",
    ]
    assert (tuned.header.base["path"], tuned.header.task) == ("models/orig2.safetensors", "models/task.py")
    assert (
        locate_originals(tuned).found
        and tuned.linked_base().path == tmp_path / "models" / "orig2.safetensors"
    )


def test_no_recorded_task_is_one_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = write_task(tmp_path)
    merge(make_originals(tmp_path, task), "w.safetensors", MergeOptions())
    sf = SuperposedFile("w.safetensors")
    assert recorded_task(sf) == (None, False)
    with pytest.raises(TaskError, match=r"^w.safetensors records no task file; pass --task$"):
        require_task(sf, None)
    result = run("tune", "--steps", 2)
    assert result.exit_code == 9 and "w.safetensors records no task file; pass --task" in result.output
    with pytest.raises(InputError, match="task file gone.py does not exist"):
        require_task(sf, "gone.py")
