"""`export`: per-context ONNX graphs and one multi-context graph, each validated in onnxruntime.

Graphs are written into a staging directory beside the output and moved into place only
after every graph has passed onnx's checker and matched PyTorch; on any failure nothing is
left behind.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from pspctl.dtypes import torch_dtype
from pspctl.errors import InputError, TaskError, ValidationError
from pspctl.extract import plan_outputs
from pspctl.fileformat import SuperposedFile, open_superposed
from pspctl.onnx_export.convert import io_names, to_onnx
from pspctl.onnx_export.errors import AtolError, TraceError
from pspctl.onnx_export.modules import BRANCH, MultiContextModel
from pspctl.onnx_export.report import ExportReport
from pspctl.onnx_export.validate import compare, session, torch_outputs
from pspctl.outputs import staged_folder
from pspctl.sources import files_read
from pspctl.task import Signature, Task, check_fits, load_state, on_task_data
from pspctl.types import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL, Progress, Role

__all__ = ["export_contexts", "export_multi"]


def _fresh_model(task: Task, file: SuperposedFile) -> nn.Module:
    if task.build_model is None or task.example_inputs is None:
        missing = next(n for n in ("build_model", "example_inputs") if getattr(task, n, None) is None)
        raise TaskError(
            f"task file {task.source} has no {missing}() function; export needs it to build and trace the model"
        )
    model = task.build_model()
    if not isinstance(model, nn.Module):
        raise TaskError(f"{task.source}: build_model() returned {type(model).__name__}, not an nn.Module")
    check_fits(model, file.shapes(), str(file.path))
    to_float32(model)
    return model.eval()


HALF = (torch.float16, torch.bfloat16)


def to_float32(module: nn.Module) -> None:
    """Make `module`'s float16 and bfloat16 parameters and buffers float32, in place (float64
    and complex ones stay). The graphs compute in float32, as optimum's exporter does by
    default: onnxruntime's CPU provider has no bfloat16 kernels for most ops, and a float16
    graph differs from PyTorch by float16's rounding, far above the default atol. Retrieved
    half-precision weights are exactly representable in float32."""
    for t in [*module.parameters(), *module.buffers()]:
        if t.dtype in HALF:
            t.data = t.data.float()


def _half_note(file: SuperposedFile, *, multi: bool) -> list[str]:
    half = " and ".join(sorted({m.dtype for m in file.metas.values() if torch_dtype(m.dtype) in HALF}))
    if not half:
        return []
    if not multi:
        return [f"{half} weights run as float32 in the graphs"]
    return [
        f"{half} weights run as float32 in the graph; superposed ones are retrieved in float32 "
        f"inside it, not rounded to {half} as extract rounds them"
    ]


def _retrieved(task: Task, file: SuperposedFile, k: int, *, in_float32: bool = False) -> nn.Module:
    """The PyTorch reference: build_model() with context k's retrieved weights. `in_float32`:
    superposed half-precision tensors retrieved in float32, as the multi-context graph does
    (not rounded to their stored dtype, as extraction rounds them)."""
    model = _fresh_model(task, file)
    state = file.state_dict(k)
    if in_float32:
        for name in file.names(Role.SUPERPOSED):
            if state[name].dtype in HALF:
                state[name] = file.retrieve(name, k, dtype=torch.float32)
        state.update({alias: state[name] for alias, name in file.tied.items()})
    return load_state(model, state, f"context {k} of {file.path}")


def _as_inputs(obj: Any, what: str) -> tuple[Tensor, ...]:
    inputs = (obj,) if isinstance(obj, Tensor) else tuple(obj)
    if not inputs or not all(isinstance(t, Tensor) for t in inputs):
        raise TaskError(f"{what} must give a tensor or a tuple of tensors")
    return inputs


def _validation_inputs(task: Task, k: int) -> tuple[tuple[Tensor, ...], str, str]:
    """The first test batch of task k if the task has data, else example_inputs(); and where
    they came from, for the report and for error messages."""
    if task.load_data is not None:
        try:
            batch = next(iter(task.load_data(k, "test")), None)
        except (ValueError, TaskError) as e:
            # ValueError is load_data's "no such split" (docs/task-file.md); a Task passes it
            # on as a TaskError's cause. Any other failure is the task file's to fix.
            if not isinstance(e, ValueError) and not isinstance(e.__cause__, ValueError):
                raise
            batch = None
        if batch is not None:
            inputs = _as_inputs(batch[0], "load_data()'s inputs")
            return inputs, "load_data(k, 'test')", f"load_data({k}, 'test')"
    signature = _signature(task)
    if signature is not None:
        what = f"example {' and '.join(signature.names)}"
        return signature.inputs(), what, what
    assert task.example_inputs is not None  # checked by _fresh_model
    return _as_inputs(task.example_inputs(), "example_inputs()"), "example_inputs()", "example_inputs()"


def _tracing_inputs(task: Task) -> tuple[Tensor, ...]:
    signature = _signature(task)
    if signature is not None:
        inputs = signature.inputs()
    else:
        assert task.example_inputs is not None
        inputs = _as_inputs(task.example_inputs(), "example_inputs()")
    # torch.export specialises a batch of 1 as a constant; trace with 2 so the batch stays dynamic.
    return tuple(torch.cat([t, t]) if t.dim() > 0 and t.shape[0] == 1 else t for t in inputs)


def _signature(task: Task) -> Signature | None:
    return getattr(task, "signature", None)  # a Task-like object without one: example_inputs()


def _input_names(task: Task, count: int) -> list[str]:
    signature = _signature(task)
    return list(signature.names) if signature is not None else io_names("input", count)


def _traced(task: Task, module: nn.Module, args: tuple[Any, ...], path: Path, **options: Any) -> str | None:
    """`to_onnx` with the dims the task's signature names (a text model's sequence length).
    Where the exporter cannot keep them dynamic (a forward that turns the length into a
    Python number), the graph is traced again with only the batch dynamic: returns the note that
    says so, else None."""
    signature = _signature(task)
    if signature is None:
        to_onnx(module, args, path, **options)
        return None
    try:
        to_onnx(module, args, path, axes=signature.axes, bounds=signature.bounds, **options)
        return None
    except TraceError as e:
        to_onnx(module, args, path, **options)
        named = {
            n: args[-len(signature.axes) + i].shape[d]
            for i, ax in enumerate(signature.axes)
            for d, n in ax.items()
        }
        fixed = ", ".join(f"{n} {size}" for n, size in named.items() if n != "batch")
        reason = str(e).removeprefix("the ONNX exporter cannot trace this model: ")
        return f"{fixed} fixed as traced: the exporter could not keep it dynamic ({reason})"


def _shorter(task: Task, inputs: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
    """`inputs` cut to half along the signature's dynamic dims other than the batch, to
    validate a graph at a size it was not traced at; None if there is nothing to cut."""
    signature = _signature(task)
    if signature is None:
        return None
    cut = []
    for t, axes in zip(inputs, signature.axes, strict=True):
        for d in axes:
            if d != 0 and t.shape[d] > 1:
                t = t.narrow(d, 0, t.shape[d] // 2)
        cut.append(t)
    return tuple(cut) if any(a.shape != b.shape for a, b in zip(cut, inputs, strict=True)) else None


def _staging(targets: list[Path], *, force: bool, directory: Path | None, file: SuperposedFile, task: Task):
    """A staging folder whose files move beside `targets` (into `directory` if given) on success;
    none of them may be a file the export reads (`files_read`), even with `force`."""
    folder = directory if directory is not None else targets[0].parent
    inputs = files_read(file, task=task.source)
    return staged_folder(folder, [t.name for t in targets], force=force, inputs=inputs)


def _graph_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def validation_error(report: ExportReport) -> AtolError | None:
    """The error a failed validation is, naming the worst output; None if every check passed."""
    bad = [c for c in report.checks if not c.passed]
    if not bad:
        return None
    worst = max(bad, key=lambda c: c.max_abs)
    return AtolError(
        f"{len(bad)} output(s) differ from PyTorch beyond atol={report.atol:g}, rtol={report.rtol:g} "
        f"(worst: context {worst.label}, {worst.output}, max abs {worst.max_abs:.3g}); no graph written",
        report,
    )


def _fail_if_needed(report: ExportReport) -> ExportReport:
    error = validation_error(report)
    if error is not None:
        raise error
    return report


@contextlib.contextmanager
def _unless_strict(report: ExportReport, strict: bool) -> Iterator[None]:
    """With strict off, a failed validation returns its report (nothing written) instead of raising."""
    try:
        yield
    except AtolError:
        if strict:
            raise
        report.files.clear()


def _outputs(task: Task, model: nn.Module, inputs: tuple[Tensor, ...], what: str) -> list[np.ndarray]:
    """The PyTorch reference's outputs; a failure means the task's model does not fit `what`."""
    with on_task_data(task.source, what):
        return torch_outputs(model, inputs)


def _export_one(
    task: Task, file: SuperposedFile, k: int, path: Path, opset: int
) -> tuple[nn.Module, str | None]:
    """Context k's graph at `path`; the retrieved model, and `_traced`'s note."""
    model = _retrieved(task, file, k)
    example = _tracing_inputs(task)
    n_out = len(_outputs(task, model, example, "example_inputs()"))
    note = _traced(
        task, model, example, path,
        input_names=_input_names(task, len(example)), output_names=io_names("output", n_out), opset=opset,
    )  # fmt: skip
    return model, note


def _batches(task: Task, k: int, note: str | None) -> Iterator[tuple[tuple[Tensor, ...], str, str, str]]:
    """What each graph of context k is validated on, as `_validation_inputs` gives it, and
    the suffix naming its outputs in the report; then, where the graph kept a sequence dim
    dynamic, the same cut to half length (`_shorter`)."""
    inputs, where, what = _validation_inputs(task, k)
    yield inputs, where, what, ""
    shorter = None if note else _shorter(task, inputs)
    signature = _signature(task)
    if shorter is not None and signature is not None:
        sizes = ", ".join(f"{n} {shorter[0].shape[d]}" for d, n in signature.axes[0].items() if d != 0)
        yield shorter, where, what, f" ({sizes})"


def export_contexts(
    path: str | Path | SuperposedFile,
    task: Task,
    context: int | str,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    force: bool = False,
    strict: bool = True,
    progress: Progress | None = None,
) -> ExportReport:
    """Export per-context graphs: one ordinary ONNX model per context, retrieved weights folded in.

    With `context="all"`, `output` is a directory and the graphs are `<label>.onnx`.
    `progress(done, total, label)` is called after each context's graph is validated.

    Raises:
        ContextError, TaskError, TraceError, MismatchError, OutputError; with `strict` (the
        default), AtolError (with its
        `.report`) if any graph differs from PyTorch beyond atol + rtol·|reference|.
    """
    file = open_superposed(path)
    output = Path(output)
    todo = plan_outputs(file, context, output, ".onnx")
    directory = output if str(context) == "all" else None
    report = ExportReport(False, file.kind.value, file.num_contexts, file.labels, opset, atol, rtol, "")
    report.notes = _half_note(file, multi=False)
    staged = _staging([t for _, t in todo], force=force, directory=directory, file=file, task=task)
    tick = progress or (lambda done, total, item: None)
    with _unless_strict(report, strict), staged as staging:
        for done, (k, target) in enumerate(todo, 1):
            graph = staging / target.name
            model, note = _export_one(task, file, k, graph, opset)
            if note is not None and note not in report.notes:
                report.notes.append(note)
            sess = session(graph)
            for inputs, report.inputs_from, what, size in _batches(task, k, note):
                want = _outputs(task, model, inputs, what)  # first: PyTorch says best why inputs do not fit
                got = sess.run(
                    None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs, strict=True)}
                )
                names = [o.name + size for o in sess.get_outputs()]
                report.checks += compare(
                    got, want, names,
                    context=k, label=file.labels[k], atol=atol, rtol=rtol,
                )  # fmt: skip
            report.files[str(target)] = _graph_bytes(graph)
            tick(done, len(todo), file.labels[k])
        _fail_if_needed(report)
    return report


def export_multi(
    path: str | Path | SuperposedFile,
    task: Task,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    force: bool = False,
    measure_per_context: bool = True,
    strict: bool = True,
    batch: int = 1,
    progress: Progress | None = None,
) -> ExportReport:
    """Export one graph serving all K contexts: inputs (context: int64 scalar, *task inputs).

    Its outputs are the model's, then `context_valid` (bool): an out-of-range context is
    clamped to 0..K−1 and flagged false. Every context is validated against PyTorch's
    retrieved model, and −1 and K must be flagged. With `measure_per_context`, one per-context
    graph is also exported (not kept) to report K × its size beside the multi-context file.
    `batch` is the batch size each per-context Linear's storage is chosen for (one Gemm over
    all K copies, or a Gather; see modules.all_k_pays); the graph runs at any batch.
    `report.layers` says, per tensor, how it is served. `progress(done, total, step)` is called
    after the export, each context's validation and the per-context measurement.

    Raises:
        As export_contexts; ValidationError if the out-of-range flag misbehaves.
    """
    file = open_superposed(path)
    output = Path(output)
    K = file.num_contexts
    report = ExportReport(True, file.kind.value, K, file.labels, opset, atol, rtol, "")
    report.notes = _half_note(file, multi=True)
    staged = _staging([output], force=force, directory=None, file=file, task=task)
    steps = K + 1 + measure_per_context
    tick = progress or (lambda done, total, item: None)
    with _unless_strict(report, strict), staged as staging:
        graph = staging / output.name
        if batch < 1:
            raise InputError(f"batch {batch}: the batch size to tune for must be at least 1")
        wrapper = MultiContextModel(_fresh_model(task, file), file, batch=batch)
        example = _tracing_inputs(task)
        n_out = len(_outputs(task, _retrieved(task, file, 0), example, "example_inputs()"))
        names = io_names("output", n_out)
        while True:
            to_float32(wrapper)  # the file's own tensors it holds (superposed, stacked)
            report.layers = dict(wrapper.layers)
            try:
                note = _traced(
                    task, wrapper, (torch.tensor(0), *example), graph,
                    input_names=["context", *_input_names(task, len(example))],
                    output_names=[*names, "context_valid"], opset=opset, varargs=True,
                    branches=BRANCH in wrapper.layers.values(),
                )  # fmt: skip
                if note is not None:
                    report.notes.append(note)
                break
            except TraceError:
                if wrapper.copies is None:  # no other way to serve it
                    raise
                report.notes.append(  # BertForMaskedLM: dynamo cannot capture it inside torch.cond
                    "the K whole models could not be traced as the branches of one If; "
                    "each tensor is served on its own instead (per-context tensors gathered)"
                )
                wrapper = MultiContextModel(_fresh_model(task, file), file, batch=batch, whole=False)
        tick(1, steps, "graph")
        sess = session(graph)
        feeds = [i.name for i in sess.get_inputs()]
        for k in range(K):
            model = _retrieved(task, file, k, in_float32=True)
            for inputs, report.inputs_from, what, size in _batches(task, k, note):
                want = _outputs(task, model, inputs, what)
                got = sess.run(None, _feed(feeds, k, inputs))
                if not bool(got[-1]):
                    raise ValidationError(f"context {k} is in range but the graph flags it invalid")
                report.checks += compare(
                    got[:-1], want, [n + size for n in names],
                    context=k, label=file.labels[k], atol=atol, rtol=rtol,
                )  # fmt: skip
            tick(k + 2, steps, file.labels[k])
        for bad in (-1, K):
            if bool(sess.run(None, _feed(feeds, bad, inputs))[-1]):
                raise ValidationError(f"context {bad} is out of range but the graph does not flag it")
        report.files[str(output)] = _graph_bytes(graph)
        if measure_per_context:
            single = staging / "per-context" / "graph.onnx"
            single.parent.mkdir()
            _export_one(task, file, 0, single, opset)  # its note is the multi-context graph's
            report.per_context_bytes = K * _graph_bytes(single)
            shutil.rmtree(single.parent)
            tick(steps, steps, "per-context size")
        _fail_if_needed(report)
    return report


def _feed(names: list[str], k: int, inputs: tuple[Tensor, ...]) -> dict[str, np.ndarray]:
    arrays = [np.array(k, dtype=np.int64), *(t.numpy() for t in inputs)]
    return dict(zip(names, arrays, strict=True))
