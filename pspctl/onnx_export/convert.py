"""Torch module → checked ONNX file, with the dynamo exporter."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pspctl.errors import InputError
from pspctl.onnx_export.errors import TraceError
from pspctl.types import DEFAULT_OPSET

__all__ = ["DEFAULT_OPSET", "EXTERNAL_DATA_BYTES", "io_names", "to_onnx"]

# A protobuf message cannot exceed 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_BYTES = 1_800_000_000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_CLASS = re.compile(r"<class '([\w.]+)'>:")
_WHERE = re.compile(r'The following call raised this error:\s*File "([^"]+)", line (\d+), in (\w+)\n\s*(.*)')


BATCH_ONLY: Mapping[int, str] = {0: "batch"}


def _dynamic_shapes(
    args: Sequence[object],
    varargs: bool,
    axes: Sequence[Mapping[int, str]] | None,
    bounds: Mapping[str, int],
) -> tuple[object, ...]:
    """torch.export's dynamic shapes: `axes[i]` names input i's dynamic dims (by default dim
    0 of every tensor input, the batch); a name shared by inputs is one size, capped by
    `bounds`. `varargs` nests the inputs as forward(context, *inputs)."""
    dims: dict[str, Any] = {}

    def dim(name: str) -> Any:
        if name not in dims:
            dims[name] = (
                torch.export.Dim(name, max=bounds[name]) if name in bounds else torch.export.Dim(name)
            )
        return dims[name]

    specs = tuple(
        {d: dim(n) for d, n in (axes[i] if axes is not None else BATCH_ONLY).items()}
        if isinstance(a, Tensor) and a.dim() > 0
        else None
        for i, a in enumerate(args)
    )
    return (None, specs) if varargs else specs


def _reason(error: BaseException) -> str:
    """The exporter's reason as one readable paragraph: the exception's first paragraph and the
    user code that raised it, without the colours, advice and debugging flags around them."""
    text = _ANSI.sub("", str(error))
    summary = text.split("## Exception summary", 1)[-1].strip()
    first = summary.split("\n\n", 1)[0]
    first = _CLASS.sub(lambda m: m.group(1).rsplit(".", 1)[-1] + ":", first)
    reason = " ".join(first.split()) or type(error).__name__
    where = _WHERE.search(text)
    if where:
        reason += f" (at {where.group(1)}:{where.group(2)} in {where.group(3)}: {where.group(4).strip()})"
    return reason if len(reason) <= 600 else reason[:597] + "..."


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter: its warnings (not actionable by users, and errors under pytest's
    filterwarnings=error), its prints and graph dumps, and its logs ('torchvision is not installed')."""
    # Global but restored: torch's loggers (export, dynamo, fx, onnx) each set their own levels.
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def to_onnx(
    module: nn.Module,
    args: tuple[Tensor, ...],
    path: Path,
    *,
    input_names: Sequence[str],
    output_names: Sequence[str],
    opset: int = DEFAULT_OPSET,
    varargs: bool = False,
    weight_bytes: int | None = None,
    branches: bool = False,
    axes: Sequence[Mapping[int, str]] | None = None,
    bounds: Mapping[str, int] | None = None,
) -> None:
    """Export `module` (in eval mode) to `path` with a dynamic batch dim, then run onnx's checker.

    `axes` (one per input, after the context with `varargs`) names the dims that vary, the
    batch (0) included; `bounds` caps them by name (`pspctl.task.Signature`).

    Weights over EXTERNAL_DATA_BYTES go to `<path>.data` beside the graph (ONNX external data).
    `branches`: the module picks among branches (`torch.cond`): their constants are moved into
    the branches that use them (`localize_initializers`).

    Raises:
        TraceError: the exporter failed; the message is its reason in one paragraph.
    """
    import onnx

    module.eval()
    if weight_bytes is None:
        weight_bytes = sum(t.nbytes for t in module.state_dict().values())
    with _quiet():
        try:
            with torch.no_grad():
                program = torch.onnx.export(
                    module,
                    args,
                    dynamo=True,
                    dynamic_shapes=_dynamic_shapes(
                        args[1:] if varargs else args, varargs, axes, bounds or {}
                    ),
                    input_names=list(input_names),
                    output_names=list(output_names),
                    opset_version=opset,
                    verbose=False,
                )
        except Exception as e:  # the exporter raises many types; all mean "cannot trace this"
            raise TraceError(f"the ONNX exporter cannot trace this model: {_reason(e)}") from e
        if program is None:  # only the legacy exporter returns None
            raise TraceError("the ONNX exporter returned no program")
        written = program.model.opset_imports.get("")
        if written != opset:  # the exporter falls back to its own opset where it cannot convert
            raise InputError(
                f"--opset {opset}: torch's ONNX exporter could not write this model at opset {opset} "
                f"(it gave opset {written}); choose another --opset (its default {DEFAULT_OPSET} works)"
            )
        _check_batch_dynamic(
            program, args[1:] if varargs else args, input_names[1:] if varargs else input_names
        )
        program.save(str(path), external_data=weight_bytes > EXTERNAL_DATA_BYTES)
    if branches:
        localize_initializers(path)
    # By path, so that the checker follows external data past the 2 GiB protobuf limit.
    onnx.checker.check_model(str(path), full_check=True)


def _check_batch_dynamic(program: Any, args: Sequence[object], names: Sequence[str]) -> None:
    """The exporter silently fixes a batch the forward turns into a Python number; say so.
    `program` is the exporter's ONNXProgram: its graph's input shapes, before anything is saved.

    Raises:
        TraceError: an input's batch dim came out a constant.
    """
    shapes = {v.name: v.shape for v in program.model.graph.inputs}
    for name, arg in zip(names, args, strict=False):
        shape = shapes.get(name)
        dim = shape[0] if shape is not None and isinstance(arg, Tensor) and arg.dim() > 0 else None
        if isinstance(dim, int):
            raise TraceError(
                f"the ONNX exporter fixed the batch of {name} at {dim}: the model's forward turns "
                "the batch size into a Python number (len(x), int(x.shape[0]), a loop over the batch); "
                "keep it a tensor size (x.shape[0], x.size(0)) for a graph that takes any batch"
            )


def localize_initializers(path: Path) -> int:
    """Move each constant used only inside one If branch into that branch; returns how many.

    The exporter puts every constant in the main graph. onnxruntime pre-packs the constant
    operands of a Gemm/MatMul in the graph that holds them, but a branch reading an outer
    constant gets it unpacked: at batch 64 an If over per-context 4096² Gemms ran 1.42× a
    plain Gemm with the constants outside, 0.99× with them inside (docs/export.md).
    Constants stored as external data stay where they are. The branches' nodes lose the
    exporter's per-node metadata (source traces, K copies of the same ones in a multi-context
    graph: 40 KB a branch on the bundled MLP).
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    top = model.graph
    inits = {t.name: t for t in top.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    users: dict[str, dict[int, onnx.GraphProto]] = {}
    graphs: list[onnx.GraphProto] = []

    def walk(graph: onnx.GraphProto) -> None:
        key = len(graphs)
        graphs.append(graph)
        for node in graph.node:
            if key:  # a branch
                del node.metadata_props[:]
                node.doc_string = ""
            for name in node.input:
                if name in inits:
                    users.setdefault(name, {})[key] = graph
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs):
                    walk(sub)

    walk(top)
    if len(graphs) == 1:
        return 0
    outputs = {o.name for o in top.output}
    moved = set()
    for name, where in users.items():
        if len(where) == 1 and 0 not in where and name not in outputs:
            (graph,) = where.values()
            graph.initializer.append(inits[name])
            moved.add(name)
    kept = [t for t in top.initializer if t.name not in moved]
    del top.initializer[:]
    top.initializer.extend(kept)
    onnx.save(model, str(path))
    return len(moved)


def io_names(stem: str, count: int) -> list[str]:
    """`stem` for one tensor, else stem_0, stem_1, ... (ONNX graph input and output names)."""
    return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
