"""`analyze`: did my models survive, and was it better than pruning? Rendering only; the
measurements live in pspctl.analysis."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from pspctl.cli.common import app, console, folded, handle_errors, human_bytes, progress_bar
from pspctl.cli.core import DEFAULT_FILE, BaseOpt, superposed_path

if TYPE_CHECKING:
    from pspctl.analysis.report import Report

WORST_LAYERS = 20


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _floats(values: list[str] | None, default: tuple[float, ...]) -> tuple[float, ...]:
    from pspctl.errors import InputError

    if not values:
        return default
    try:
        out = tuple(float(p) for v in values for p in v.split(",") if p.strip())
    except ValueError:
        raise InputError(f"--sparsity {values}: expected numbers like 0.5,0.7,0.9") from None
    if not all(0 <= s < 1 for s in out):
        raise InputError(f"--sparsity {values}: each must be in [0, 1)")
    return out


@app.command()
@handle_errors
def analyze(
    file: Annotated[Path, typer.Argument(help="The superposed file.")] = DEFAULT_FILE,
    originals: Annotated[
        list[str] | None,
        typer.Option(
            help="The K originals in context order: comma-separated or repeated (default: as recorded)."
        ),
    ] = None,
    task: Annotated[
        str | None, typer.Option(help="Task file or module (default: the one merge --task recorded).")
    ] = None,
    json_file: Annotated[Path | None, typer.Option("--json", help="Write every number as JSON here.")] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write histograms and error-vs-prediction plots (PNG).")
    ] = None,
    sparsity: Annotated[
        list[str] | None, typer.Option(help="Pruning levels for the superposed values (default 0.5,0.7,0.9).")
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="Calibration (or probe) inputs per context.")] = 256,
    max_drop: Annotated[
        float | None,
        typer.Option(min=0, help="Also recommend what to superpose for this calib accuracy drop (points)."),
    ] = None,
    max_output_error: Annotated[
        float | None,
        typer.Option(min=0, help="With --max-drop: also bound the end-to-end output error per context."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random probes.")] = 0,
    trust_pickle: Annotated[
        bool, typer.Option("--trust-pickle", help="Allow pickled originals (runs code from them).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing --json/--plot files.")] = False,
    base: BaseOpt = None,
) -> None:
    """Retrieval error in weight and function space, pruning statistics and the same-budget baseline."""
    from pspctl.analysis import DEFAULT_SPARSITIES
    from pspctl.analysis import analyze as run_analyze
    from pspctl.errors import OutputError
    from pspctl.fileformat import SuperposedFile

    superposed_path(file)
    if plot is not None:
        from pspctl.plotting import check_plot_path, require_matplotlib

        require_matplotlib()
    from pspctl.outputs import refuse_earlier, refuse_inputs
    from pspctl.sources import files_read

    origs = [p for v in originals for p in v.split(",") if p] if originals else None
    sf = SuperposedFile(file, base=base)
    read = files_read(sf, task=task, originals=origs)
    if json_file is not None and plot is not None and json_file.absolute() == plot.absolute():
        raise OutputError(f"{json_file}: --json and --plot name one file; give each its own")
    for out in (json_file, plot):
        if out is not None and out.is_dir():
            raise OutputError(f"{out}: is a directory")
        if out is not None:  # never a file this run reads, even with --force
            refuse_inputs(out, read)
            refuse_earlier(out, force=force)  # and a parent that is a file: before any work
    if plot is not None:
        check_plot_path(plot)
    with progress_bar("analyzing", quiet=quiet) as update:
        report = run_analyze(
            sf, originals=origs, task=task, sparsities=_floats(sparsity, DEFAULT_SPARSITIES),
            max_samples=samples, max_drop=max_drop, max_output_error=max_output_error, trust_pickle=trust_pickle, seed=seed, progress=update,
        )  # fmt: skip
    render(report)
    written = []
    # The JSON is moved into place after the plot is made, so that a failure or a Ctrl-C while
    # plotting leaves neither.
    with contextlib.ExitStack() as stack:
        if json_file is not None:
            import json

            from pspctl.checkpoints import atomic_path

            tmp = stack.enter_context(atomic_path(json_file, force=force))
            tmp.write_text(json.dumps(report.to_dict(), indent=1))
            written.append(json_file)
        if plot is not None:
            from pspctl.analysis.plot import plot_report

            written.insert(0, plot_report(report, plot, force=force))
    for path in written:
        console.print(f"wrote {path}")


def render(r: Report) -> None:
    """Summary first, then the details, worst layers first."""
    console.print(
        f"[bold]{escape(r.file)}[/]: K={r.num_contexts}, {r.kind}, {human_bytes(r.input_bytes)} → "
        f"{human_bytes(r.file_bytes)}: storage ratio [bold]{r.storage_ratio:.2f}×[/]"
    )
    for note in r.notes:
        console.print(f"note: {escape(note)}")
    if r.inputs == "probe":
        console.print(
            "note: [bold]random probe inputs[/], not data: η ≈ 1/√M, so no attenuation is expected "
            "and the function-space error is about the weight-space error"
        )
    metric = next((c.metric_name for c in r.contexts if c.metric_name), None) or "metric"
    t = Table(
        title=f"summary: {metric}; same-budget pruning keeps a fraction (kept) of each original, same bytes"
    )
    for col in (
        "context",
        "original",
        "retrieved",
        "same-budget pruning",
        "kept",
        "output err PSP",
        "output err pruning",
        "winner",
    ):
        t.add_column(col, justify="left" if col == "context" else "right")
    for c in r.contexts:
        win = {"psp": "[green]PSP[/]", "pruning": "[red]pruning[/]", "tie": "tie"}.get(c.winner or "", "–")
        t.add_row(escape(f"{c.context} {c.label}"), _f(c.original_metric, ".2f"), _f(c.retrieved_metric, ".2f"),
                  _f(c.same_budget_metric, ".2f"), _f(c.same_budget_density, ".1%"), _f(c.output_error),
                  _f(c.same_budget_output_error), win)  # fmt: skip
    console.print(folded(t))

    if r.layers:
        t = Table(title="function-space error per layer, worst first (Proposition 2, as merge predicts it)")
        for col in (
            "layer",
            "context",
            "M",
            "inputs",
            "η (mean)",
            "η (rms)",
            "measured",
            "predicted",
            "ratio",
        ):
            t.add_column(col, justify="left" if col in ("layer", "inputs") else "right")
        for e in r.worst_layers()[:WORST_LAYERS]:
            ratio = e.measured / e.predicted if e.predicted else None
            t.add_row(escape(e.name), str(e.context), str(e.fan_in), f"{e.inputs}/{e.method}", _f(e.eta_mean),
                      _f(e.eta_rms), _f(e.measured), _f(e.predicted), _f(ratio, ".2f"))  # fmt: skip
        console.print(folded(t))
        if len(r.layers) > WORST_LAYERS:
            console.print(f"({len(r.layers) - WORST_LAYERS} more rows in --json)")

    if r.weights:
        based = any(w.expected_without_base is not None for w in r.weights)
        t = Table(
            title="weight-space error ‖Ŵ_k−W_k‖/‖W_k‖ (expected: sqrt(v·Σ_{s≠k}‖D_s‖²)/‖W_k‖, D_s superposed)"
        )
        cols = ["tensor", "role", "M", "error (mean over contexts)", "max", "expected (mean)"]
        for col in cols + (["without the base"] if based else []):
            t.add_column(col, justify="left" if col in ("tensor", "role") else "right")
        for w in r.weights:
            row = [escape(w.name), w.role, str(w.fan_in), _f(sum(w.error) / len(w.error)), _f(max(w.error)),
                   _f(sum(w.expected) / len(w.expected))]  # fmt: skip
            if based:
                plain = w.expected_without_base
                row.append("" if plain is None else _f(sum(plain) / len(plain)))
            t.add_row(*row)
        console.print(folded(t))

    if r.pruning:
        t = Table(title="global magnitude pruning of the superposed values (per context: mean, worst)")
        for col in ("target", "achieved", "weight err", "output err", f"{metric} mean", f"{metric} worst"):
            t.add_column(col, justify="right")
        for p in r.pruning:
            ok = [m for m in p.metric if m is not None]
            errs = [e for e in p.output_error if e is not None]
            werrs = [e for e in p.weight_error if e is not None]
            t.add_row(f"{p.sparsity:.0%}", f"{p.achieved:.1%}", _f(sum(werrs) / len(werrs) if werrs else None),
                      _f(sum(errs) / len(errs) if errs else None), _f(sum(ok) / len(ok) if ok else None, ".2f"),
                      _f(min(ok) if ok else None, ".2f"))  # fmt: skip
        console.print(folded(t))

    if r.magnitudes:
        cuts = ", ".join(f"{x:g}" for x in r.thresholds)
        t = Table(title=f"magnitudes (below: fraction of |w| under {cuts} × the originals' mean RMS)")
        for col in ("tensor", "source", "rms", "max", "zeros", *(f"<{x:g}" for x in r.thresholds)):
            t.add_column(col, justify="left" if col in ("tensor", "source") else "right")
        for name in r.edges:
            mags = [m for m in r.magnitudes if m.name == name]
            sup = [m for m in mags if m.source == "superposed"]
            orig = [m for m in mags if m.source == "original"]
            rows = [("superposed", sup)] if sup else []
            rows += [(f"originals ({len(orig)}, mean)", orig)] if orig else []
            for label, ms in rows:
                avg = lambda f, ms=ms: sum(f(m) for m in ms) / len(ms)  # noqa: E731
                t.add_row(escape(name), label, _f(avg(lambda m: m.rms), ".4f"), _f(avg(lambda m: m.max_abs), ".4f"),
                          f"{avg(lambda m: m.sparsity):.1%}",
                          *(f"{avg(lambda m, k=f'{x:g}': m.below[k]):.1%}" for x in r.thresholds))  # fmt: skip
        console.print(folded(t))

    if r.advice:
        t = Table(title="policy advice: what superposing each tensor saves and costs")
        for col in ("tensor", "now", "bytes saved if superposed", "function-space error (mean)", "max"):
            t.add_column(col, justify="left" if col in ("tensor", "now") else "right")
        for a in r.advice:
            t.add_row(escape(a.name), a.role, human_bytes(a.bytes_saved), _f(a.mean_error), _f(a.max_error))
        console.print(folded(t))
    if r.recommendation:
        rec = r.recommendation
        console.print(
            f"measured policy for --max-drop {rec['max_drop']:g}: superpose {', '.join(rec['superpose']) or 'nothing'}; "
            f"keep {', '.join(rec['keep']) or 'nothing'} (saves {human_bytes(rec['bytes_saved'])}; "
            f"worst calib drop {max((d for d in rec['drop'] if d is not None), default=0):.2f} points). "
            f"Merge with: {escape(rec['merge_flags'])}",
            highlight=False,
        )
