"""`export`: ONNX graphs of a superposed file, validated in onnxruntime."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pspctl.cli.common import app, console, folded, handle_errors, human_bytes, print_json, progress_bar
from pspctl.cli.core import DEFAULT_FILE, BaseOpt, FileArg, superposed_path
from pspctl.types import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL

if TYPE_CHECKING:
    from pspctl.onnx_export import ExportReport


@app.command()
@handle_errors
def export(
    file: FileArg = DEFAULT_FILE,
    output: Annotated[
        Path,
        typer.Option("-o", "--output", help="The .onnx file to write; a directory with --context all."),
    ] = ...,  # type: ignore[assignment]
    context: Annotated[
        str | None,
        typer.Option("--context", "-c", help="Per-context graph(s): 0-based index, label, or 'all'."),
    ] = None,
    multi: Annotated[
        bool, typer.Option("--multi", help="One graph for all contexts, with `context` as an input.")
    ] = False,
    task: Annotated[
        str | None,
        typer.Option(help="Task file (path or module); default: the one recorded at merge time."),
    ] = None,
    opset: Annotated[int, typer.Option(help="ONNX opset version.")] = DEFAULT_OPSET,
    atol: Annotated[
        float, typer.Option(help="Absolute tolerance of onnxruntime against PyTorch.")
    ] = DEFAULT_ATOL,
    rtol: Annotated[
        float, typer.Option(help="Relative tolerance, as numpy.allclose: |Δ| ≤ atol + rtol·|torch|.")
    ] = DEFAULT_RTOL,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the validation report as JSON.")] = False,
    batch: Annotated[
        int,
        typer.Option(
            help="--multi: the batch size to tune the graph for (per-context Linears as one Gemm over "
            "all contexts or a Gather); any batch runs."
        ),
    ] = 1,
    base: BaseOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Export ONNX graphs (per context, or one multi-context graph) and validate them in onnxruntime."""
    from pspctl.errors import InputError
    from pspctl.fileformat import SuperposedFile
    from pspctl.onnx_export import export_contexts, export_multi
    from pspctl.onnx_export.api import validation_error
    from pspctl.sources import require_task

    superposed_path(file)
    if multi == (context is not None):
        raise InputError("pass exactly one of --context K|LABEL|all and --multi")
    if atol < 0 or rtol < 0:
        raise InputError(f"--atol {atol:g} / --rtol {rtol:g}: tolerances cannot be negative")
    sf = SuperposedFile(file, base=base)
    loaded = require_task(sf, task, "example_inputs")
    with progress_bar("exporting", quiet=quiet or json_out) as update:
        if multi:
            report = export_multi(
                sf, loaded, output, opset=opset, atol=atol, rtol=rtol, force=force, strict=False,
                batch=batch, progress=update,
            )  # fmt: skip
        else:
            report = export_contexts(
                sf, loaded, str(context), output, opset=opset, atol=atol, rtol=rtol, force=force,
                strict=False, progress=update,
            )  # fmt: skip
    _render(report, json_out)  # the checks, failed or not: a failure writes nothing
    error = validation_error(report)
    if error is not None:
        raise error


def _render(report: ExportReport, json_out: bool) -> None:
    if json_out:
        print_json(report.to_dict())
        return
    table = Table(
        "context", "output", "max abs", "max rel", "",
        title=f"onnxruntime vs PyTorch on {report.inputs_from}",
        caption=f"pass: |Δ| ≤ atol {report.atol:g} + rtol {report.rtol:g}·|torch|",
    )  # fmt: skip
    for c in report.checks:
        status = "[green]ok[/]" if c.passed else "[bold red]FAIL[/]"
        table.add_row(f"{c.context} ({c.label})", c.output, f"{c.max_abs:.2e}", f"{c.max_rel:.2e}", status)
    console.print(folded(table))
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    if not report.passed:
        return
    for path, size in report.files.items():
        console.print(f"wrote {path} ({human_bytes(size)})")
    if report.layers:
        counts = Counter(report.layers.values())
        console.print("served: " + ", ".join(f"{n} {variant}" for variant, n in sorted(counts.items())))
    if report.per_context_bytes:
        ratio = report.per_context_bytes / max(report.total_bytes, 1)
        console.print(
            f"multi-context graph {human_bytes(report.total_bytes)} vs {report.num_contexts} per-context "
            f"graphs {human_bytes(report.per_context_bytes)}: [bold]{ratio:.2f}×[/] smaller"
        )
