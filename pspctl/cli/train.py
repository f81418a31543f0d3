"""`train` (the paper's online protocol) and `tune` (heal a post-hoc merge)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from pspctl.cli.common import (
    app,
    command_line,
    console,
    err_console,
    folded,
    handle_errors,
    print_json,
    progress_bar,
)
from pspctl.cli.core import (
    DEFAULT_FILE,
    BaseOpt,
    KeepOpt,
    MaxInterferenceOpt,
    MaxShardSizeOpt,
    MinShareOpt,
    SuperposeOpt,
    policy_from_flags,
    shard_size,
    superposed_path,
)
from pspctl.types import TRAIN_MAX_INTERFERENCE, TRAIN_MIN_SHARE, Kind, Objective, Optimizer

TaskOpt = Annotated[
    str, typer.Option("--task", help="Task file (path or module) with build_model and load_data.")
]


DistTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--dist-timeout",
        min=1,
        help="Under torchrun: seconds a rank waits for the others before failing (not forever).",
    ),
]
DIST_TIMEOUT_S = 1800.0  # torch's default; pspctl.training.distributed.DEFAULT_TIMEOUT_S


def _fmt(rows: list[dict[str, float]] | None, k: int, metric: str) -> str:
    return "–" if rows is None else f"{rows[k][metric]:.2f}"


@app.command("train")
@handle_errors
def train_command(
    task: TaskOpt = ...,  # type: ignore[assignment]
    contexts: Annotated[int, typer.Option("--contexts", "-k", help="Number of tasks/contexts K.")] = ...,  # type: ignore[assignment]
    kind: Annotated[Kind, typer.Option(help="Context kind.")] = Kind.BINARY,
    steps: Annotated[int, typer.Option(help="Training steps per context (per cycle).")] = 500,
    cycles: Annotated[int, typer.Option(help="Passes over the K contexts.")] = 1,
    lr: Annotated[float, typer.Option(min=0, help="Learning rate.")] = 1e-3,
    optimizer: Annotated[Optimizer, typer.Option(help="Adam, or SGD with momentum 0.9.")] = Optimizer.ADAM,
    eval_every: Annotated[
        int, typer.Option(min=0, help="Evaluate every context every N steps (0: at the end of each context).")
    ] = 0,
    seed: Annotated[
        int, typer.Option(help="Seed of the contexts, the initialisation and the batch order.")
    ] = 0,
    baseline: Annotated[
        bool,
        typer.Option("--baseline", help="Train the plain model (no superposition) on the same schedule."),
    ] = False,
    mixture: Annotated[
        bool,
        typer.Option(
            "--mixture", help="Mixture of neighbouring contexts (paper §5.1); needs --kind complex."
        ),
    ] = False,
    labels: Annotated[str | None, typer.Option(help="Comma-separated context labels.")] = None,
    keep: KeepOpt = None,
    superpose: SuperposeOpt = None,
    max_interference: MaxInterferenceOpt = TRAIN_MAX_INTERFERENCE,
    min_share: MinShareOpt = TRAIN_MIN_SHARE,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Superposed file (with --baseline: a plain state_dict)."),
    ] = None,
    metrics: Annotated[
        Path | None, typer.Option(help="Metrics JSON (default: <output stem>.metrics.json).")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Write the first task's metric over steps (.png/.pdf/.svg).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    dist_timeout: DistTimeoutOpt = DIST_TIMEOUT_S,
) -> None:
    """Train K tasks one after another in superposition (or --baseline without), as in the paper.

    Runs under torchrun too (torchrun --nproc_per_node N -m pspctl train ...): see docs/training.md.
    """
    from pspctl.checkpoints import refuse_existing
    from pspctl.errors import MismatchError
    from pspctl.outputs import refuse_inputs
    from pspctl.plotting import check_plot_path
    from pspctl.task import load_task
    from pspctl.training import TrainOptions, train
    from pspctl.training.distributed import launch
    from pspctl.training.plot import plot_first_task

    label_list = tuple(labels.split(",")) if labels else None
    if label_list is not None and len(label_list) != contexts:
        raise MismatchError(f"--labels gives {len(label_list)} labels for --contexts {contexts}")
    output = output or (Path("baseline.safetensors") if baseline else DEFAULT_FILE)
    metrics = metrics or output.with_name(f"{output.stem}.metrics.json")
    if plot is not None:
        check_plot_path(plot)
        refuse_existing(plot, force=force)
    for path in (output, metrics, plot):  # never the task file the run imports, even with --force
        if path is not None:
            refuse_inputs(path, [task])
    options = TrainOptions(
        num_contexts=contexts,
        kind=kind.value,
        steps=steps,
        cycles=cycles,
        lr=lr,
        optimizer=optimizer.value,
        eval_every=eval_every,
        seed=seed,
        baseline=baseline,
        mixture=mixture,
        policy=policy_from_flags(max_interference, min_share, keep, superpose),
        labels=label_list,
        task_spec=task,
        command=command_line(),
    )
    loaded = load_task(task)
    with (
        launch(dist_timeout) as world,
        progress_bar("training", quiet=quiet or json_out or not world.main) as update,
    ):
        report = train(
            loaded, output, options, metrics_path=metrics, force=force, progress=update, world=world
        )
    if not world.main:  # rank 0 plots and prints
        return
    if plot is not None:
        name = "standard" if baseline else f"psp {options.kind}"
        plot_first_task({name: report.evaluations}, plot, metric=report.metric, block=steps)
    if json_out:
        print_json(report.to_dict())
        return
    what = "standard (no superposition)" if baseline else f"{options.kind} superposition"
    table = Table(title=f"{what}: {report.metric} after {report.steps} steps")
    table.add_column("context")
    table.add_column("after its own block", justify="right")
    table.add_column("at the end", justify="right")
    for k in range(contexts):
        own = _own_block(report.evaluations, k)
        table.add_row(str(k), f"{own[report.metric]:.2f}", f"{report.final[k][report.metric]:.2f}")
    console.print(folded(table))
    console.print(f"mean {report.metric} {report.mean_final:.2f} · {report.wall_s:.1f} s")
    console.print(f"wrote {output}, {metrics}" + (f", {plot}" if plot else ""))


def _own_block(evaluations: list[dict[str, Any]], k: int) -> dict[str, float]:
    """Context k's metrics at the end of its own (last) block, before later tasks interfered."""
    row = [e for e in evaluations if e["context"] == k and e["step"] > 0][-1]
    return row["metrics"][k]  # type: ignore[no-any-return]


@app.command("tune")
@handle_errors
def tune_command(
    file: Annotated[
        Path, typer.Argument(help="The superposed file to heal (never modified).")
    ] = DEFAULT_FILE,
    task: Annotated[
        str | None, typer.Option("--task", help="Task file (default: the one the file records).")
    ] = None,
    steps: Annotated[int, typer.Option(help="Training steps, round-robin over the contexts.")] = 200,
    objective: Annotated[
        Objective,
        typer.Option(
            help="distill (match the original models), task (labels), or auto: distill if they exist."
        ),
    ] = Objective.AUTO,
    lr: Annotated[
        float | None,
        typer.Option(
            min=0,
            help="Learning rate (Adam). Default: 1e-4, then 1e-5 and 1e-6, each from the file again, "
            "while the result is worse than the input.",
            show_default=False,
        ),
    ] = None,
    eval_every: Annotated[
        int, typer.Option(min=0, help="Also evaluate every N steps (0: before and after only).")
    ] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the batch order.")] = 0,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="The tuned file (default: <file stem>.tuned.safetensors)."),
    ] = None,
    metrics: Annotated[Path | None, typer.Option(help="Also write the report as JSON here.")] = None,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow pickled modules among the originals: runs code from them. Only for files you trust.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    base: BaseOpt = None,
    max_shard_size: MaxShardSizeOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    dist_timeout: DistTimeoutOpt = DIST_TIMEOUT_S,
) -> None:
    """Heal a post-hoc merge: fine-tune the superposed weights, one context at a time.

    Runs under torchrun too (torchrun --nproc_per_node N -m pspctl tune ...): see docs/training.md.
    """
    from pspctl.checkpoints import refuse_existing
    from pspctl.fileformat import SuperposedFile
    from pspctl.outputs import refuse_inputs
    from pspctl.sources import files_read, require_task
    from pspctl.training import TuneOptions, default_output, tune
    from pspctl.training.common import write_json
    from pspctl.training.distributed import launch

    sf = SuperposedFile(superposed_path(file), base=base)
    loaded = require_task(sf, task, "load_data")
    output = output or default_output(file)
    if metrics is not None:
        refuse_existing(metrics, force=force)
        refuse_inputs(metrics, [output, *files_read(sf, task=loaded.source)])
    options = TuneOptions(
        steps=steps,
        objective=objective.value,
        lr=lr,
        eval_every=eval_every,
        seed=seed,
        task_spec=task or sf.header.task,
        command=command_line(),
    )
    with (
        launch(dist_timeout) as world,
        progress_bar("tuning", quiet=quiet or json_out or not world.main) as update,
    ):
        report = tune(
            sf,
            loaded,
            output,
            options,
            force=force,
            trust_pickle=trust_pickle,
            progress=update,
            world=world,
            max_shard_size=shard_size(max_shard_size),
        )
    if not world.main:  # rank 0 writes the metrics and prints
        return
    data = {"command": "tune", **report.to_dict()}
    if metrics is not None:
        write_json(data, metrics)
    if json_out:
        print_json(data)
        return
    m = report.metric
    table = Table(
        title=f"{file} → {output}: {m}, {report.objective} objective, {report.steps} steps at lr {report.lr:g}"
    )
    for col in ("context", "original", "before", "after"):
        table.add_column(col, justify="left" if col == "context" else "right")
    for k in range(len(report.before)):
        table.add_row(
            str(k), _fmt(report.originals, k, m), _fmt(report.before, k, m), _fmt(report.after, k, m)
        )
    console.print(folded(table))
    d = report.to_dict()
    line = f"mean {m} {d['mean_before']:.2f} → {d['mean_after']:.2f}"
    if d["mean_originals"] is not None:
        line += f" (originals {d['mean_originals']:.2f})"
    console.print(f"{line} · {report.wall_s:.1f} s")
    for note in report.notes:
        console.print(f"note: {note}", markup=False)
    console.print(f"wrote {output}")
    for warning in report.warnings:
        err_console.print(f"warning: {warning}", markup=False)
