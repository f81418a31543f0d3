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
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pspctl import trust
from pspctl.checkpoints import checkpoint_names, find_ties
from pspctl.errors import (
    InputError,
    MismatchError,
    PspctlError,
    TaskError,
    UntrustedTaskError,
    listed,
    one_line,
)

Batch = tuple[torch.Tensor, torch.Tensor]
OPTIONAL = ("example_inputs", "load_data", "evaluate")

_counter = itertools.count()


@dataclass(frozen=True)
class Signature:
    """How `export` calls a model whose graph should take more than example_inputs() gives: a
    Hugging Face text model takes its token ids and their attention mask, with the sequence
    length free (as optimum exports them). The model's forward takes `inputs()` positionally.

    `axes` names each input's dynamic dims, the batch (0) included; inputs that share a name
    share the size. `bounds` caps a named dim (the model's maximum positions)."""

    names: tuple[str, ...]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    axes: tuple[Mapping[int, str], ...]
    bounds: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """The functions of one loaded task file; ``source`` names it in error messages.

    pspctl calls them through these fields from many places, so each field holds the
    function wrapped in `_call`: whatever it raises (or its generator raises while iterated)
    becomes a TaskError naming the file, the call and the cause, e.g. ``task file t.py:
    load_data(0, 'train') failed: KeyError: 'x'``; the original is the wrapper's ``__wrapped__``.
    """

    source: str
    build_model: Callable[[], nn.Module]
    example_inputs: Callable[[], tuple[torch.Tensor, ...]] | None = None
    load_data: Callable[[int, str], Any] | None = None
    evaluate: Callable[[nn.Module, int], dict[str, float]] | None = None
    signature: Signature | None = None  # set by pspctl (`hf.hf_task`), not by task files

    def __post_init__(self) -> None:
        for name in ("build_model", *OPTIONAL):
            fn = getattr(self, name)
            if isinstance(fn, _TaskFunction):  # dataclasses.replace: wrap the original for this Task
                fn = fn.__wrapped__
            if fn is not None:
                object.__setattr__(self, name, _TaskFunction(self, name, fn))

    def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, the task file's function ``name``; see the class docstring."""
        call = f"{name}({', '.join('model' if isinstance(a, nn.Module) else repr(a) for a in args)})"
        try:
            result = fn(*args)
        except PspctlError:
            raise
        except Exception as exc:
            raise self._failed(call, exc) from exc
        if name == "build_model" and not isinstance(result, nn.Module):
            raise TaskError(
                f"task file {self.source}: build_model() returned {type(result).__name__}, not a torch.nn.Module"
            )
        if name == "load_data":
            return self._iterate(call, result)
        return result

    def _iterate(self, call: str, batches: Any) -> Iterator[Any]:
        """The batches of ``load_data``, lazily (it may be a generator: it fails when iterated)."""
        try:
            iterator = iter(batches)
        except TypeError:
            raise TaskError(
                f"task file {self.source}: {call} returned {type(batches).__name__}, not an iterable of batches"
            ) from None
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except PspctlError:
                raise
            except Exception as exc:
                raise self._failed(call, exc) from exc
            yield batch

    def _failed(self, call: str, exc: Exception) -> TaskError:
        return TaskError(f"task file {self.source}: {call} failed: {one_line(exc)}")

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

    def inputs(self, context: int, split: str, max_samples: int) -> tuple[torch.Tensor, ...]:
        """The first ``max_samples`` inputs of ``load_data(context, split)``, concatenated.

        A batch is ``(inputs, targets)``, ``(inputs,)`` or bare inputs; inputs are one tensor
        or a tuple of tensors (a model with several arguments).

        Raises:
            TaskError: there is no ``load_data()``, or it returned no batches.
        """
        xs, _ = self._take(context, split, max_samples)
        return tuple(torch.cat(parts)[:max_samples] for parts in zip(*xs, strict=True))

    def samples(
        self, context: int, split: str, max_samples: int
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``inputs(...)`` and their targets, or None for the targets unless every batch has a tensor one.

        Raises:
            TaskError: as ``inputs``.
        """
        xs, ys = self._take(context, split, max_samples)
        inputs = tuple(torch.cat(parts)[:max_samples] for parts in zip(*xs, strict=True))
        labels = [y for y in ys if isinstance(y, torch.Tensor)]
        targets = torch.cat(labels)[:max_samples] if len(labels) == len(ys) else None
        return inputs, targets

    def _take(
        self, context: int, split: str, max_samples: int
    ) -> tuple[list[tuple[torch.Tensor, ...]], list[Any]]:
        """Batches of ``load_data(context, split)`` until ``max_samples``: (inputs, targets) per batch."""
        xs: list[tuple[torch.Tensor, ...]] = []
        ys: list[Any] = []
        n = 0
        for batch in self.batches(context, split):
            if isinstance(batch, tuple | list):
                x, y = batch[0], (batch[1] if len(batch) > 1 else None)
            else:
                x, y = batch, None
            xs.append(tuple(x) if isinstance(x, tuple | list) else (x,))
            ys.append(y)
            n += len(xs[-1][0])
            if n >= max_samples:
                break
        return xs, ys

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
                    with on_task_data(self.source, f"load_data({context}, 'test')"):
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


class _TaskFunction:
    """A task file's function as a Task field: calling it goes through ``Task._call``."""

    def __init__(self, task: Task, name: str, fn: Callable[..., Any]):
        self._task, self._name = task, name
        self.__wrapped__ = fn

    def __call__(self, *args: Any) -> Any:
        return self._task._call(self._name, self.__wrapped__, *args)

    def __repr__(self) -> str:
        return f"<{self._name} of task file {self._task.source}>"


def primary_metric(metrics: Mapping[str, float]) -> tuple[str, float]:
    """The metric tables, plots and summaries use: the first one the task reports."""
    name = next(iter(metrics))
    return name, float(metrics[name])


def lower_is_better(metric: str) -> bool:
    """Metric direction from its name: losses, errors and perplexities go down."""
    return any(s in metric.lower() for s in ("loss", "error", "perplexity", "ppl"))


def as_tensor(output: Any) -> torch.Tensor:
    """The tensor to compare of a model's output: itself, `.logits`, or the first tensor inside."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, torch.Tensor):
        return output.logits
    items = output.values() if isinstance(output, Mapping) else output
    if isinstance(items, Sequence | type({}.values())):
        for item in items:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"cannot compare a model output of type {type(output).__name__}")


@torch.no_grad()
def run_model(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """``model(*inputs)`` as a float tensor (see `as_tensor`), without gradients."""
    return as_tensor(model(*inputs)).float()


@contextmanager
def on_task_data(source: str, what: str) -> Iterator[None]:
    """Run a task's model on its data: whatever fails inside means they do not fit.

    Raises:
        TaskError: ``task file SOURCE: its model does not fit WHAT: <the cause>``.
    """
    try:
        yield
    except PspctlError:
        raise
    except Exception as exc:
        raise TaskError(f"task file {source}: its model does not fit {what}: {one_line(exc)}") from exc


def load_task(spec: str | Path, *, recorded_in: str | Path | None = None) -> Task:
    """Import a task file and collect its functions.

    ``spec`` is a path to a ``.py`` file or a dotted module name (``samples.digits_task``).
    Importing runs the module's code: only load task files you trust. A task the user names
    is remembered as trusted (`pspctl.trust`); one a superposed file names (``recorded_in``)
    is imported only if it is one remembered, with the same content.

    Raises:
        InputError: ``spec`` looks like a path and no such file exists.
        UntrustedTaskError: ``recorded_in`` names a task this user never ran (its content).
        TaskError: importing it fails, or it has no callable ``build_model``.
    """
    source = str(spec)
    key = Path(spec) if _looks_like_path(spec) else source  # a file by its bytes, a module by name
    if isinstance(key, Path) and not key.is_file():
        where = "" if recorded_in is None else f" (recorded in {recorded_in})"
        raise InputError(f"task file {key}{where} does not exist (or is not a file)")
    if recorded_in is not None and not trust.trusted(key):
        raise UntrustedTaskError(
            f"{recorded_in} names task file {spec}, which has not been run with pspctl here (not with "
            f"this content): running it executes its code; read it, then pass --task {spec}"
        )
    module = _import(spec)
    if recorded_in is None:
        trust.remember(key)
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


def _neighbours(folder: Path) -> set[str]:
    """Top-level module names a file in `folder` can import from it: x.py and package folders."""
    names = {p.stem for p in folder.glob("*.py")}
    names |= {p.name for p in folder.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    return {n for n in names if n.isidentifier()}


def _inside(module: ModuleType | None, folder: Path) -> bool:
    file = getattr(module, "__file__", None)
    return file is not None and Path(file).resolve().is_relative_to(folder)


@contextmanager
def beside(folder: Path) -> Iterator[None]:
    """Import with `folder` first on sys.path, as `python folder/task.py` sees its neighbours.

    Afterwards sys.path and sys.modules are as before, except for what the import added from
    elsewhere: the neighbour modules it imported (``model.py`` beside the task file) are dropped
    from sys.modules again (the task module keeps its references), and a module of the same name
    imported earlier (another task folder's ``model.py``) is hidden during the import and put
    back after it. So two task files in two folders, each with its own ``model.py``, each get
    their own. Standard-library names are never hidden.
    """
    mine = _neighbours(folder) - set(sys.stdlib_module_names)

    def clashes(key: str) -> bool:
        return key.split(".", 1)[0] in mine

    hidden = {
        key: module
        for key, module in list(sys.modules.items())
        if clashes(key) and not _inside(module, folder)
    }
    for key in hidden:
        del sys.modules[key]
    before = set(sys.modules)
    entry = str(folder)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:  # the first occurrence: ours, unless the task file moved it
            sys.path.remove(entry)
        for key, module in list(sys.modules.items()):
            if key not in before and clashes(key) and _inside(module, folder):
                del sys.modules[key]
        sys.modules.update(hidden)


def _looks_like_path(spec: str | Path) -> bool:
    text = str(spec)
    return isinstance(spec, Path) or text.endswith(".py") or "/" in text or "\\" in text


def _import_module(name: str) -> ModuleType:
    """`importlib.import_module`, and where the module is not found, once more from the working
    directory, as `python -m` would find it: the `pspctl` console script, unlike `python -m
    pspctl`, does not put the working directory on `sys.path` (`--task samples.digits_task`
    from the repository root). The directory leaves `sys.path` again afterwards."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = str(Path.cwd())
        if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")) or here in sys.path:
            raise
        sys.path.insert(0, here)
        try:
            return importlib.import_module(name)
        finally:
            sys.path.remove(here)


def _import(spec: str | Path) -> ModuleType:
    if _looks_like_path(spec):  # load_task checked that it is a file
        path = Path(spec)
        # A fresh name per load: two task files both called task.py must not collide.
        name = f"_pspctl_task_{next(_counter)}_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise TaskError(f"task file {path} cannot be imported as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        # Registered before exec so dataclasses and pickling inside the file can find it.
        sys.modules[name] = module
        try:
            with beside(path.resolve().parent):
                module_spec.loader.exec_module(module)
        except Exception as exc:
            del sys.modules[name]
            raise TaskError(f"task file {path} failed to import: {one_line(exc)}") from exc
        return module
    try:
        return _import_module(str(spec))
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
    names = checkpoint_names(model, given)  # transformers' renaming, where it renames
    given = {names.get(k, k): v for k, v in given.items()}
    own = {k: list(v.shape) for k, v in model.state_dict().items()}
    ties = model_ties(model)
    groups = {
        "missing": [k for k in own if k not in given and not _tied_given(k, ties, given)],
        "not in the model": [k for k in given if k not in own],
        "other shape": [
            f"{k} {list(given[k])} (model: {own[k]})" for k in own if k in given and list(given[k]) != own[k]
        ],
    }
    problems = [f"{kind}: {listed(keys)}" for kind, keys in groups.items() if keys]
    if problems:
        raise MismatchError(f"{what} does not fit {whose} model: {'; '.join(problems)}")


def model_ties(model: nn.Module) -> dict[str, str]:
    """The model's tied state_dict keys (one parameter under several names): alias -> shared name."""
    return find_ties(model.state_dict())


def _tied_given(key: str, ties: Mapping[str, str], given: Mapping[str, Any]) -> bool:
    """Whether a key missing from `given` is tied in the model to one that is given."""
    group = ties.get(key, key)
    return any(k in given for k in [group, *(a for a, n in ties.items() if n == group)])


def load_model(task: Task, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """task.build_model() with `state` loaded, in eval mode.

    A key the model ties to another (a head sharing its embedding, saved once by
    `save_pretrained`) may be missing: it is loaded from the key it is tied to, and the
    model keeps one parameter for both.

    Raises:
        MismatchError: the state_dict does not fit the model (lists the first mismatched keys).
    """
    return load_state(task.build_model(), state, what).eval()


def load_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """`model` with `state` loaded (checked by `check_fits`; tied keys as `load_model` says;
    renamed as transformers renames the checkpoints of some architectures, `checkpoint_names`)."""
    names = checkpoint_names(model, state)
    state = {names.get(k, k): v for k, v in state.items()}
    check_fits(model, {k: v.shape for k, v in state.items()}, what)
    ties = model_ties(model)
    for name in set(ties.values()):
        group = [name, *(a for a, n in ties.items() if n == name)]
        source = next(k for k in group if k in state)
        for k in group:
            state.setdefault(k, state[source])
    # assign=True makes the parameters the given tensors instead of copies, so a model and
    # its state_dict take the memory of one model; only where the dtypes already agree, and
    # not for a tied model (assigning would give each name a parameter of its own).
    params = model.state_dict()
    same = not ties and all(params[k].dtype == v.dtype for k, v in state.items())
    model.load_state_dict(state, strict=True, assign=same)
    return model
