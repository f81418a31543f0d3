"""Tests for pspctl.task: loading task files and the default metric."""

from __future__ import annotations

import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch
from torch import nn

import samples.digits_task
from pspctl.errors import InputError, TaskError
from pspctl.task import Task, load_task

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "digits_task.py"


def write_task(directory: Path, body: str, name: str = "task.py") -> Path:
    path = directory / name
    path.write_text(textwrap.dedent(body))
    return path


def test_load_sample_by_path() -> None:
    task = load_task(SAMPLE)
    assert task.source == str(SAMPLE)
    model = task.build_model()
    assert list(model.state_dict()) == [
        "0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"
    ]  # fmt: skip
    task.require("example_inputs", "load_data", "evaluate")
    (x,) = task.example_inputs()
    assert model(x).shape == (len(x), 10)


def test_load_sample_by_module_name() -> None:
    task = load_task("samples.digits_task")
    assert task.build_model.__wrapped__ is samples.digits_task.build_model
    assert task.evaluate.__wrapped__ is samples.digits_task.evaluate


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.py"
    with pytest.raises(InputError, match="^task file .*nope.py does not exist"):
        load_task(path)


def test_unknown_module_is_input_error() -> None:
    with pytest.raises(InputError, match="^task module no_such_pkg.task not found"):
        load_task("no_such_pkg.task")


def test_import_failure_is_one_line_task_error(tmp_path: Path) -> None:
    path = write_task(tmp_path, "raise RuntimeError('bad\\nconfig')\n")
    with pytest.raises(TaskError) as info:
        load_task(path)
    assert str(info.value) == f"task file {path} failed to import: RuntimeError: bad config"


def test_missing_build_model(tmp_path: Path) -> None:
    path = write_task(tmp_path, "def load_data(context, split):\n    return []\n")
    with pytest.raises(TaskError) as info:
        load_task(path)
    assert str(info.value) == (
        f"task file {path} has no build_model() function; "
        "it must return the torch.nn.Module the checkpoints belong to"
    )


def test_non_callable_function_is_rejected(tmp_path: Path) -> None:
    path = write_task(tmp_path, "build_model = 3\n")
    with pytest.raises(TaskError, match="build_model is a int, not a function"):
        load_task(path)


def test_same_file_name_in_two_dirs_does_not_collide(tmp_path: Path) -> None:
    body = "import torch\ndef build_model():\n    return torch.nn.Linear({}, 1)\n"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = load_task(write_task(tmp_path / "a", body.format(2)))
    second = load_task(write_task(tmp_path / "b", body.format(3)))
    assert first.build_model().in_features == 2
    assert second.build_model().in_features == 3


def test_require_names_the_missing_function(tmp_path: Path) -> None:
    task = load_task(write_task(tmp_path, "def build_model():\n    return None\n"))
    assert task.load_data is None and task.example_inputs is None and task.evaluate is None
    with pytest.raises(TaskError) as info:
        task.require("load_data")
    assert str(info.value) == (
        f"task file {task.source} has no load_data() function; add one (see samples/digits_task.py)"
    )


def test_empty_load_data(tmp_path: Path) -> None:
    body = """
        import torch
        def build_model():
            return torch.nn.Linear(2, 2)
        def load_data(context, split):
            yield from ()
    """
    task = load_task(write_task(tmp_path, body))
    message = f"task file {task.source}: load_data(0, 'test') returned no batches"
    with pytest.raises(TaskError) as info:
        task.batches(0, "test")
    assert str(info.value) == message
    with pytest.raises(TaskError) as info:
        task.metric(task.build_model(), 0)
    assert str(info.value) == message


def test_metric_without_data_is_task_error() -> None:
    task = Task(source="t.py", build_model=lambda: nn.Linear(2, 2))
    with pytest.raises(TaskError, match="has no load_data"):
        task.metric(nn.Linear(2, 2), 0)


def test_default_metric_matches_hand_computed_accuracy() -> None:
    # Identity weights: the predicted class is the larger of the two inputs.
    model = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 1.0], [0.0, 3.0], [5.0, 4.0]])
    y = torch.tensor([0, 1, 1, 1, 0])  # the third label is wrong on purpose: 4 of 5 right

    def load_data(context: int, split: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
        assert (context, split) == (7, "test")
        return [(x[:2], y[:2]), (x[2:], y[2:])]  # uneven batches: counts, not mean of means

    task = Task(source="t.py", build_model=lambda: model, load_data=load_data)
    model.train()
    assert task.metric(model, 7) == {"accuracy": 80.0}
    assert model.training  # mode restored


def test_metric_prefers_evaluate() -> None:
    task = Task(
        source="t.py",
        build_model=lambda: nn.Linear(2, 2),
        evaluate=lambda model, context: {"accuracy": 12, "loss": context},
    )
    assert task.metric(nn.Linear(2, 2), 3) == {"accuracy": 12.0, "loss": 3.0}


def test_evaluate_returning_garbage_is_task_error() -> None:
    task = Task(source="t.py", build_model=lambda: nn.Linear(2, 2), evaluate=lambda m, c: 0.5)
    with pytest.raises(TaskError, match="evaluate\\(\\) must return a dict of numbers, got float"):
        task.metric(nn.Linear(2, 2), 0)


def test_docs_examples_run() -> None:
    # Every ```python block of docs/task-file.md that uses the sample must run as written.
    text = (SAMPLE.parents[1] / "docs" / "task-file.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    runnable = [b for b in blocks if "samples/digits_task.py" in b]
    assert runnable
    for block in runnable:
        exec(compile(block, "docs/task-file.md", "exec"), {})


def test_a_failing_function_is_a_task_error_naming_the_call() -> None:
    def load_data(context: int, split: str):
        yield torch.zeros(2, 2), torch.zeros(2, dtype=torch.long)
        raise OSError("disk went away")  # a generator fails while iterated, not when called

    task = Task(source="t.py", build_model=lambda: nn.Linear(2, 2), load_data=load_data)
    with pytest.raises(TaskError) as info:
        task.batches(1, "train")
    assert str(info.value) == "task file t.py: load_data(1, 'train') failed: OSError: disk went away"
    assert isinstance(info.value.__cause__, OSError)  # --debug shows its traceback


def test_task_functions_must_return_what_the_contract_says() -> None:
    task = Task(source="t.py", build_model=lambda: "a model", load_data=lambda c, s: 3)
    with pytest.raises(
        TaskError, match=r"^task file t.py: build_model\(\) returned str, not a torch.nn.Module$"
    ):
        task.build_model()
    with pytest.raises(TaskError, match=r"load_data\(0, 'test'\) returned int, not an iterable of batches$"):
        task.batches(0, "test")


def test_a_model_that_does_not_fit_its_data() -> None:
    task = Task(
        source="t.py",
        build_model=lambda: nn.Linear(3, 2),
        load_data=lambda c, s: [(torch.ones(4, 5), torch.zeros(4))],
    )
    with pytest.raises(TaskError) as info:
        task.metric(task.build_model(), 0)
    assert str(info.value) == (
        "task file t.py: its model does not fit load_data(0, 'test'): "
        "RuntimeError: mat1 and mat2 shapes cannot be multiplied (4x5 and 3x2)"
    )


def test_export_still_reads_valueerror_as_no_such_split(tmp_path: Path) -> None:
    from pspctl.merge import MergeOptions, merge
    from pspctl.onnx_export import export_contexts
    from pspctl.policy import Policy
    from tests.conftest import mlp, save_models

    def load_data(context: int, split: str):
        if split == "test":
            raise ValueError(f"unknown split {split!r}")  # docs/task-file.md's convention
        yield torch.zeros(2, 16), torch.zeros(2, dtype=torch.long)

    out = tmp_path / "w.safetensors"
    merge(save_models([mlp(0), mlp(1)], tmp_path), out, MergeOptions(policy=Policy(superpose=("*",))))
    task = Task("t.py", lambda: mlp(0), lambda: (torch.randn(3, 16),), load_data)
    report = export_contexts(out, task, 0, tmp_path / "m.onnx")
    assert report.passed and report.inputs_from == "example_inputs()"


def test_replace_names_the_new_source() -> None:
    import dataclasses

    task = Task(source="a.py", build_model=lambda: 3)
    other = dataclasses.replace(task, source="b.py")
    with pytest.raises(TaskError, match=r"^task file b.py: build_model\(\) returned int"):
        other.build_model()
    assert other.build_model.__wrapped__ is task.build_model.__wrapped__


def test_task_file_imports_its_neighbours(tmp_path: Path) -> None:
    """`from model import Net` works as under `python task.py`, and sys.path is restored."""
    path_before, modules_before = list(sys.path), set(sys.modules)
    tasks = []
    for width in (3, 5):
        folder = tmp_path / f"t{width}"
        folder.mkdir()
        write_task(folder, f"import torch\nclass Net(torch.nn.Linear):\n    WIDTH = {width}\n", "model.py")
        write_task(
            folder,
            """
            from model import Net

            def build_model():
                return Net(2, Net.WIDTH)
            """,
        )
        tasks.append(load_task(folder / "task.py"))
    # each task got its own model.py, though both are called `model`
    assert [t.build_model().out_features for t in tasks] == [3, 5]
    assert sys.path == path_before
    assert "model" not in sys.modules
    assert {m for m in set(sys.modules) - modules_before if not m.startswith("_pspctl_task_")} == set()


def test_neighbour_import_restores_sys_path_on_failure(tmp_path: Path) -> None:
    path_before = list(sys.path)
    write_task(tmp_path, "from model import Net\n")
    with pytest.raises(TaskError, match="failed to import: ModuleNotFoundError: No module named 'model'"):
        load_task(tmp_path / "task.py")
    assert sys.path == path_before


def test_a_module_imported_earlier_is_hidden_then_put_back(tmp_path: Path) -> None:
    """A cached module named like a neighbour does not shadow it, and comes back afterwards."""
    other = types.ModuleType("model")
    sys.modules["model"] = other
    try:
        write_task(tmp_path, "VALUE = 7\n", "model.py")
        write_task(
            tmp_path, "import model\nbuild_model = lambda: torch.nn.Linear(1, model.VALUE)\nimport torch\n"
        )
        task = load_task(tmp_path / "task.py")
        assert task.build_model().out_features == 7
        assert sys.modules["model"] is other
    finally:
        del sys.modules["model"]


def test_the_console_script_finds_a_task_module_in_the_working_directory(tmp_path):
    """`pspctl … --task mytask` from the folder holding mytask.py, as `python -m` would find it
    (the console script does not put the working directory on sys.path)."""
    import json
    import subprocess

    from tests.conftest import mlp, save_models

    script = Path(sys.executable).parent / "pspctl"
    if not script.exists():
        pytest.skip("no pspctl console script beside this interpreter")
    save_models([mlp(i) for i in range(2)], tmp_path)
    (tmp_path / "mytask.py").write_text(
        "from torch import nn\n\n\ndef build_model():\n"
        "    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))\n"
    )
    found = subprocess.run(
        [str(script), "merge", "model0.pt", "model1.pt", "--task", "mytask", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert (tmp_path / json.loads(found.stdout)["output"]).is_file()
    missing = subprocess.run(
        [str(script), "merge", "model0.pt", "model1.pt", "--task", "nosuchtask", "-o", "x.safetensors"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert missing.returncode != 0 and "task module nosuchtask not found" in missing.stderr
    assert not (tmp_path / "x.safetensors").exists()
