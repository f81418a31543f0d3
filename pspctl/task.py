"""Task files: how pspctl learns to build a model, feed it data and score it.

A task file is a Python module with ``build_model()`` and, optionally,
``example_inputs()``, ``load_data(context, split)`` and ``evaluate(model, context)``;
see docs/task-file.md and samples/digits_task.py.

Loading a task file imports it, which runs its code with your permissions (like a
config-as-code tool). Only load task files you trust.
"""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pspctl.errors import InputError, MismatchError, TaskError, listed, one_line

Batch = tuple[torch.Tensor, torch.Tensor]
OPTIONAL = ("example_inputs", "load_data", "evaluate")

_counter = itertools.count()


@dataclass(frozen=True)
class Task:
    """The functions of one loaded task file; ``source`` names it in error messages."""

    source: str
    build_model: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]] | None = None
    load_data: Callable[[int, str], Any] | None = None
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None

    def require(self, *names: str) -> None:
        """Raise TaskError for the first of the optional functions ``names`` that is missing.

        Raises:
            TaskError: the task file does not define one of ``names``.
        """
        for name in names:
            if getattr(self, name, None) is None:
                raise self._missing(name)

    def batches(self, context: int, split: str) -> list[Batch]:
        """All ``(inputs, targets)`` batches of ``load_data(context, split)``.

        Raises:
            TaskError: there is no ``load_data()``, or it returned no batches.
        """
        if self.load_data is None:
            raise self._missing("load_data")
        batches = list(self.load_data(context, split))
        if not batches:
            raise TaskError(f"task file {self.source}: load_data({context}, {split!r}) returned no batches")
        return batches

    def metric(self, model: nn.Module, context: int) -> dict[str, float]:
        """Metrics of ``model`` on task ``context``.

        Uses the task's ``evaluate()`` when it has one; otherwise argmax accuracy in
        percent over ``load_data(context, "test")``, in eval mode without gradients.

        Raises:
            TaskError: no ``evaluate()`` and no usable ``load_data()``.
        """
        if self.evaluate is not None:
            result = self.evaluate(model, context)
            try:
                return {str(k): float(v) for k, v in result.items()}
            except (AttributeError, TypeError, ValueError) as exc:
                raise TaskError(
                    f"task file {self.source}: evaluate() must return a dict of numbers, "
                    f"got {type(result).__name__}"
                ) from exc
        batches = self.batches(context, "test")
        was_training = model.training
        model.eval()
        correct = total = 0
        try:
            with torch.no_grad():
                for inputs, targets in batches:
                    correct += int((model(inputs).argmax(dim=-1) == targets).sum())
                    total += targets.numel()
        finally:
            model.train(was_training)
        if total == 0:
            raise TaskError(f"task file {self.source}: the test split of context {context} is empty")
        return {"accuracy": 100.0 * correct / total}

    def _missing(self, name: str) -> TaskError:
        return TaskError(
            f"task file {self.source} has no {name}() function; add one (see samples/digits_task.py)"
        )


def load_task(spec: str | Path) -> Task:
    """Import a task file and collect its functions.

    ``spec`` is a path to a ``.py`` file or a dotted module name (``samples.digits_task``).
    Importing runs the module's code: only load task files you trust.

    Raises:
        InputError: ``spec`` looks like a path and no such file exists.
        TaskError: importing it fails, or it has no callable ``build_model``.
    """
    source = str(spec)
    module = _import(spec)
    functions = {name: getattr(module, name, None) for name in ("build_model", *OPTIONAL)}
    for name, value in functions.items():
        if value is not None and not callable(value):
            raise TaskError(f"task file {source}: {name} is a {type(value).__name__}, not a function")
    build_model = functions.pop("build_model")
    if build_model is None:
        raise TaskError(
            f"task file {source} has no build_model() function; "
            f"it must return the torch.nn.Module the checkpoints belong to"
        )
    return Task(source=source, build_model=build_model, **functions)


def _looks_like_path(spec: str | Path) -> bool:
    text = str(spec)
    return isinstance(spec, Path) or text.endswith(".py") or "/" in text or "\\" in text


def _import(spec: str | Path) -> ModuleType:
    if _looks_like_path(spec):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"task file {path} does not exist (or is not a file)")
        # A fresh name per load: two task files both called task.py must not collide.
        name = f"_pspctl_task_{next(_counter)}_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise TaskError(f"task file {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        # Registered before exec so dataclasses and pickling inside the file can find it.
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise TaskError(f"task file {path} failed to import: {one_line(exc)}") from exc
        return module
    try:
        return importlib.import_module(str(spec))
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if str(spec) == missing or str(spec).startswith(missing + "."):
            raise InputError(
                f"task module {spec} not found; pass a path to a .py file or an importable module name"
            ) from exc
        raise TaskError(f"task module {spec} failed to import: {one_line(exc)}") from exc
    except Exception as exc:
        raise TaskError(f"task module {spec} failed to import: {one_line(exc)}") from exc


def check_fits(
    model: nn.Module, given: Mapping[str, Sequence[int]], what: str, whose: str = "the task's"
) -> None:
    """`given` (the shapes of a state_dict or of a file's tensors) must have exactly `model`'s keys and shapes.

    Raises:
        MismatchError: naming `what`, with the first keys missing, not in the model, and of another shape.
    """
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    groups = {
        "missing": [k for k in own if k not in given],
        "not in the model": [k for k in given if k not in own],
        "other shape": [
            f"{k} {list(given[k])} (model: {own[k]})" for k in own if k in given and list(given[k]) != own[k]
        ],
    }
    problems = [f"{kind}: {listed(keys)}" for kind, keys in groups.items() if keys]
    if problems:
        raise MismatchError(f"{what} does not fit {whose} model: {'; '.join(problems)}")


def load_model(task: Task, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """task.build_model() with `state` loaded, in eval mode.

    Raises:
        MismatchError: the state_dict does not fit the model (lists the first mismatched keys).
    """
    model = task.build_model()
    check_fits(model, {k: v.shape for k, v in state.items()}, what)
    # assign=True makes the parameters the given tensors instead of copies, so a model and
    # its state_dict take the memory of one model; only where the dtypes already agree.
    params = model.state_dict()
    same = all(params[k].dtype == v.dtype for k, v in state.items())
    model.load_state_dict(dict(state), strict=True, assign=same)
    return model.eval()
