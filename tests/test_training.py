"""`pspctl train` and `pspctl tune` end to end on a tiny task, and every bad input they refuse."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from pspctl.cli import app
from pspctl.digests import sha256_file
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.policy import Policy
from pspctl.task import load_task
from pspctl.training import Diverged, TrainOptions, train

runner = CliRunner()

TASK = """
import torch
from torch import nn

POISON = {poison}  # a context whose training inputs are Inf (to make the loss NaN)


def build_model():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3))


{load_data}
"""

LOAD_DATA = """
def load_data(context, split):
    gen = torch.Generator().manual_seed(100 * context + (split == "test"))
    x = torch.randn(96, 8, generator=gen)
    y = (x @ torch.randn(8, 3, generator=torch.Generator().manual_seed(context))).argmax(1)
    if context == POISON and split == "train":
        x = x * float("inf")
    return [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
"""


def write_task(folder: Path, *, poison: int = -1, with_data: bool = True, name: str = "task.py") -> Path:
    path = folder / name
    path.write_text(TASK.format(poison=poison, load_data=LOAD_DATA if with_data else ""))
    return path


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def accuracy(state: dict[str, torch.Tensor], task_path: Path, context: int) -> float:
    """Independent of pspctl's evaluation: a plain model with `state`, argmax on the test split."""
    task = load_task(task_path)
    model = task.build_model()
    model.load_state_dict(state)
    batches = list(task.load_data(context, "test"))
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def make_originals(folder: Path, task_path: Path, K: int = 2) -> list[Path]:
    """K plain models, model k trained on context k (a plain loop, not pspctl's)."""
    task = load_task(task_path)
    paths = []
    for k in range(K):
        torch.manual_seed(k)
        model = task.build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
        for _ in range(4):
            for x, y in task.load_data(k, "train"):
                optimizer.zero_grad()
                torch.nn.functional.cross_entropy(model(x), y).backward()
                optimizer.step()
        save_file(
            {n: t.contiguous() for n, t in model.state_dict().items()}, str(folder / f"orig{k}.safetensors")
        )
        paths.append(folder / f"orig{k}.safetensors")
    return paths


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_train_end_to_end(workdir):
    task = write_task(workdir)
    result = run("train", "--task", task, "-k", 2, "--steps", 5, "--eval-every", 2, "--superpose", "*weight",
                 "--lr", "0.01", "--plot", "first.png", "-q")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "binary superposition: accuracy after 10 steps" in result.output
    assert "wrote w.safetensors, w.metrics.json, first.png" in result.output
    metrics = json.loads(Path("w.metrics.json").read_text())
    assert [e["step"] for e in metrics["evaluations"]] == [0, 2, 4, 5, 6, 8, 10]
    assert [e["context"] for e in metrics["evaluations"]] == [0, 0, 0, 0, 1, 1, 1]
    assert metrics["final"] == metrics["evaluations"][-1]["metrics"] and metrics["steps"] == 10
    file = SuperposedFile("w.safetensors")
    assert file.kind.value == "binary" and file.num_contexts == 2
    assert file.names(role="superposed") == ["0.weight", "2.weight"]
    assert file.header.task == str(task) and file.header.recipe["train"]["steps"] == 5
    for k in range(2):  # the metrics describe the models a user extracts from the file
        assert metrics["final"][k]["accuracy"] == pytest.approx(accuracy(file.state_dict(k), task, k))
    assert Path("first.png").read_bytes()[:4] == b"\x89PNG"


def test_train_baseline_writes_a_plain_model(workdir):
    task = write_task(workdir)
    result = run("train", "--task", task, "-k", 2, "--steps", 3, "--baseline", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["options"]["baseline"] is True and report["output"] == "baseline.safetensors"
    state = load_file("baseline.safetensors")
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert report["final"][1]["accuracy"] == pytest.approx(accuracy(state, task, 1))


def test_tune_end_to_end(workdir):
    task = write_task(workdir)
    paths = make_originals(workdir, task)
    merge(paths, "w.safetensors", MergeOptions(base="none", kind="complex", task=str(task), policy=_all()))
    before_hash = sha256_file(Path("w.safetensors"))
    result = run("tune", "--steps", 6, "--eval-every", 3, "--metrics", "tune.json", "-q")
    assert result.exit_code == 0, result.output
    assert "distill objective, 6 steps at lr 0.0001" in " ".join(result.output.split())
    assert "wrote w.tuned.safetensors" in result.output
    assert sha256_file(Path("w.safetensors")) == before_hash  # the input is never modified
    report = json.loads(Path("tune.json").read_text())
    assert report["objective"] == "distill" and [c["step"] for c in report["curve"]] == [0, 3, 6]
    tuned = SuperposedFile("w.tuned.safetensors")
    merged = SuperposedFile("w.safetensors")
    assert tuned.kind.value == "complex" and tuned.header.inputs == merged.header.inputs
    step = tuned.header.history[-1]
    assert step["step"] == "tune" and step["objective"] == "distill" and step["input_sha256"] == before_hash
    for k in range(2):
        assert report["before"][k]["accuracy"] == pytest.approx(accuracy(merged.state_dict(k), task, k))
        assert report["after"][k]["accuracy"] == pytest.approx(accuracy(tuned.state_dict(k), task, k))
        assert report["originals"][k]["accuracy"] == pytest.approx(accuracy(load_file(paths[k]), task, k))
    assert not torch.equal(tuned.superposed("0.weight"), merged.superposed("0.weight"))

    # Without the originals, auto falls back to the task loss; distill says why it cannot run.
    for p in paths:
        p.unlink()
    result = run("tune", "--steps", 2, "-o", "t2.safetensors", "--json")
    assert result.exit_code == 0 and json.loads(result.output)["objective"] == "task"
    result = run("tune", "--steps", 2, "-o", "t3.safetensors", "--objective", "distill")
    assert (
        result.exit_code == 2 and "--objective distill needs the original models: original" in result.output
    )
    assert not Path("t3.safetensors").exists()


def _all() -> Policy:
    return Policy(superpose=("*weight",))


def test_tune_warns_when_the_tuned_file_is_worse(workdir):
    """A learning rate far too large makes the merge worse: tune still writes the file (exit 0)
    but says so on stderr, with a lower --lr to try; a tune that helps says nothing."""
    task = write_task(workdir)
    merge(make_originals(workdir, task), "w.safetensors",
          MergeOptions(base="none", kind="complex", task=str(task), policy=_all()))  # fmt: skip
    result = run("tune", "--steps", 6, "--lr", 10, "--metrics", "worse.json", "-q")
    assert result.exit_code == 0, result.output
    report = json.loads(Path("worse.json").read_text())
    assert report["mean_after"] < report["mean_before"] and report["worse"] is True
    before, after = report["mean_before"], report["mean_after"]
    warning = (
        f"warning: w.tuned.safetensors is worse than its input w.safetensors: mean accuracy "
        f"{before:.4g} → {after:.4g}; it was written anyway. Try a lower --lr (e.g. 1, a tenth of 10)\n"
    )
    assert result.stderr == warning and report["warnings"] == [warning.removeprefix("warning: ")[:-1]]
    assert "wrote w.tuned.safetensors" in result.stdout and Path("w.tuned.safetensors").exists()

    result = run("tune", "--steps", 6, "--lr", "1e-2", "-o", "better.safetensors", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["mean_after"] > report["mean_before"]
    assert report["worse"] is False and report["warnings"] == [] and result.stderr == ""
    result = run("tune", "--steps", 6, "--lr", "1e-2", "-o", "better.safetensors", "--force", "-q")
    assert result.exit_code == 0 and result.stderr == ""


def test_tune_without_lr_lowers_it_from_the_file_while_the_result_is_worse(workdir, monkeypatch):
    """Without --lr, tune tries AUTO_LRS in order, each from the file: the kept result is the
    one a plain --lr run at that rate gives, not a run continued from the damaged weights."""
    task = write_task(workdir)
    merge(make_originals(workdir, task), "w.safetensors",
          MergeOptions(base="none", kind="complex", task=str(task), policy=_all()))  # fmt: skip
    monkeypatch.setattr(
        sys.modules["pspctl.training.tune"], "AUTO_LRS", (10.0, 1e-2)
    )  # the first is far too large
    result = run("tune", "--steps", 6, "--metrics", "auto.json", "-q")
    assert result.exit_code == 0 and result.stderr == "", result.output
    report = json.loads(Path("auto.json").read_text())
    assert [(t["lr"], t["worse"]) for t in report["tried"]] == [(10.0, True), (1e-2, False)]
    assert report["lr"] == 1e-2 and report["worse"] is False and report["warnings"] == []
    assert report["tried"][0]["mean_after"] < report["mean_before"] < report["mean_after"]
    out = " ".join(result.stdout.split())
    assert f"note: lr 10 made the merge worse (mean accuracy {report['mean_before']:.4g} → " in out
    assert "tried lr 0.01 from the file again" in out and "6 steps at lr 0.01" in out
    assert [c["step"] for c in report["curve"]] == [0, 6]  # the kept run's curve
    auto = SuperposedFile("w.tuned.safetensors")
    record = auto.header.history[-1]
    assert record["lr"] == 1e-2 and record["lr_tried"] == [10.0, 1e-2]
    assert run("tune", "--steps", 6, "--lr", "1e-2", "-o", "plain.safetensors", "-q").exit_code == 0
    plain = SuperposedFile("plain.safetensors")
    for name in auto.names(role="superposed"):
        assert torch.equal(auto.superposed(name), plain.superposed(name)), name

    # Worse at every rate: the least bad is written, with a warning naming the rates tried.
    monkeypatch.setattr(sys.modules["pspctl.training.tune"], "AUTO_LRS", (10.0, 30.0))
    result = run("tune", "--steps", 6, "-o", "bad.safetensors", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    tried = {t["lr"]: t["mean_after"] for t in report["tried"]}
    assert set(tried) == {10.0, 30.0} and all(t["worse"] for t in report["tried"])
    assert report["mean_after"] == max(tried.values()) and report["lr"] == max(tried, key=tried.get)
    (warning,) = report["warnings"]
    assert "at every lr tried (10, 30)" in warning and "the least bad; it was written anyway" in warning


@pytest.mark.parametrize(
    ("metric", "before", "after", "worse"),
    [
        ("accuracy", [90.0, 80.0], [80.0, 80.0], True),
        ("accuracy", [90.0, 80.0], [95.0, 80.0], False),
        ("loss", [0.5, 0.3], [0.6, 0.3], True),  # lower is better
        ("output error", [0.035, 0.053, 0.029], [0.040, 0.042, 0.041], True),  # mean .039 → .041
        ("output error", [0.040, 0.042, 0.041], [0.035, 0.053, 0.029], False),
        ("accuracy", [90.0], [90.0], False),
        ("accuracy", [], [], False),  # a rank other than 0 measures nothing
    ],
)  # fmt: skip
def test_tune_report_worse_follows_the_metric_direction(metric, before, after, worse):
    from pspctl.training import TuneReport

    def rows(values: list[float]) -> list[dict[str, float]]:  # the primary metric comes first
        return [{metric: v, "other": 0.0} for v in values]

    report = TuneReport("w.safetensors", "t.safetensors", "distill", metric, rows(before), rows(after), None)
    assert report.worse is worse and report.to_dict()["worse"] is worse


def test_bad_input(workdir):
    no_data = write_task(workdir, with_data=False, name="nodata.py")
    result = run("train", "--task", no_data, "-k", 2, "--steps", 3)
    assert result.exit_code == 9 and f"task file {no_data} has no load_data() function" in result.output
    task = write_task(workdir)
    result = run("train", "--task", task, "-k", 2, "--steps", 0)
    assert result.exit_code == 2 and "error: --steps must be at least 1, got 0" in result.output
    result = run("train", "--task", task, "-k", 2, "--kind", "onepower", "--mixture", "-q")
    assert (
        result.exit_code == 7 and "a mixture of contexts needs --kind complex, not onepower" in result.output
    )
    result = run("train", "--task", task, "-k", 2, "--steps", 3, "--plot", "fig.py", "-q")
    assert result.exit_code == 2 and "--plot fig.py: not an image format matplotlib writes" in result.output
    assert sorted(workdir.iterdir()) == sorted([no_data, task])  # nothing written, not even trained

    merge(
        make_originals(workdir, task),
        "w.safetensors",
        MergeOptions(base="none", task=str(task), policy=_all()),
    )
    result = run("tune", "--steps", 0)
    assert result.exit_code == 2 and "--steps must be at least 1, got 0" in result.output
    result = run("tune", "--task", no_data, "--steps", 2, "-q")
    assert result.exit_code == 9 and "has no load_data() function" in result.output
    other = workdir / "wide.py"
    other.write_text(TASK.format(poison=-1, load_data=LOAD_DATA).replace("nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3)",
                                                                         "nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)"))  # fmt: skip
    result = run("tune", "--task", other, "--steps", 2, "-q")
    assert result.exit_code == 3
    assert (
        "error: w.safetensors does not fit the task's model: other shape: 0.weight [32, 8] (model: [16, 8])"
        in result.output
    )
    result = run("tune", "--steps", 2, "-o", "w.safetensors", "--force")
    assert result.exit_code == 8 and "tune never overwrites its input" in result.output
    result = run("tune", "--steps", 2, "-o", "w.tuned.pt")
    assert result.exit_code == 8 and "w.tuned.pt: a superposed file is a safetensors file" in result.output
    assert not Path("w.tuned.safetensors").exists()


def test_nan_stops_and_keeps_the_last_good_file(workdir):
    task = write_task(workdir, poison=1)
    result = run("train", "--task", task, "-k", 2, "--steps", 4, "--superpose", "*weight", "-q")
    assert result.exit_code == 10
    assert result.output.count("\n") == 1  # one line
    assert ("training diverged: loss is nan at step 5 (context 1); kept the last good file "
            "w.safetensors (step 4)") in result.output  # fmt: skip
    file = SuperposedFile("w.safetensors")  # the file of the last finished block, intact
    assert file.header.history[0]["steps"] == 4
    assert all(math.isfinite(float(file.retrieve(n, 1).abs().sum())) for n in file.names())
    assert json.loads(Path("w.metrics.json").read_text())["steps"] == 4

    with pytest.raises(Diverged, match=r"step 1 \(context 0\); nothing written \(no block had finished\)"):
        train(
            load_task(write_task(workdir, poison=0, name="p0.py")),
            "p0.safetensors",
            TrainOptions(num_contexts=2, steps=2),
        )
    assert not Path("p0.safetensors").exists()

    good = write_task(workdir, name="good.py")
    merge(make_originals(workdir, good), "m.safetensors", MergeOptions(base="none", policy=_all()))
    before = sha256_file(Path("m.safetensors"))
    result = run("tune", "m.safetensors", "--task", task, "--objective", "task", "--steps", 4)
    assert result.exit_code == 10
    assert (
        "training diverged: loss is nan at step 2 (context 1); nothing written; m.safetensors is unchanged"
        in result.output
    )
    assert sha256_file(Path("m.safetensors")) == before and not Path("m.tuned.safetensors").exists()
