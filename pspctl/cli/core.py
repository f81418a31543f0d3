"""`merge`, `extract`, `info`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from pspctl.cli.common import (
    app,
    command_line,
    console,
    err_console,
    folded,
    handle_errors,
    human_bytes,
    prefetch_digests,
    print_json,
    progress_bar,
)
from pspctl.types import CALIB_SAMPLES, MAX_ERROR, DType, Kind, PolicySource, StateDictFormat

if TYPE_CHECKING:
    from pspctl.merge import MergeReport
    from pspctl.policy import Policy

DEFAULT_FILE = Path("w.safetensors")
FileArg = Annotated[Path, typer.Argument(help="The superposed file.", show_default=True)]

# The merge policy's flags, shared by merge and train (whose shape-rule defaults differ:
# training has no weights yet to predict errors from).
KeepOpt = Annotated[
    list[str] | None, typer.Option(help="Glob of tensor names to store per context. Repeatable.")
]
SuperposeOpt = Annotated[
    list[str] | None,
    typer.Option(help="Glob of tensor names to superpose regardless of the rules ('*' = all). Repeatable."),
]
MaxInterferenceOpt = Annotated[
    float | None, typer.Option(min=0, help="Keep per context tensors whose (K-1)/fan_in exceeds this.")
]
MinShareOpt = Annotated[
    float,
    typer.Option(
        min=0, max=1, help="Keep per context tensors holding less than this share of the parameters."
    ),
]
MaxErrorOpt = Annotated[
    float,
    typer.Option(
        min=0,
        help="Budget: predicted relative output error of all superposed tensors together (docs/policy.md).",
    ),
]
EtaOpt = Annotated[
    float | None,
    typer.Option(
        min=0,
        max=1,
        help="Prior alignment η of layer inputs with the weights, for every tensor "
        "(default: 0.15 for matrices, 0.025 for convolution kernels).",
    ),
]
BaseOpt = Annotated[
    Path | None,
    typer.Option(
        help="The parent checkpoint of a file merged with --link-base, if not at its recorded path."
    ),
]
MaxShardSizeOpt = Annotated[
    str | None,
    typer.Option(
        help="Write shards of at most this size (2GB, 500MB, 5GiB) and an index, the Hugging Face layout."
    ),
]


def shard_size(text: str | None) -> int | None:
    """`--max-shard-size` in bytes, parsed before any work is done (None: one file).

    Raises:
        InputError: not a size.
    """
    from pspctl.outputs import parse_size

    return None if text is None else parse_size(text)


@app.command()
@handle_errors
def merge(
    inputs: Annotated[
        list[Path],
        typer.Argument(
            help="Two or more checkpoints (.pt/.pth/.bin/.safetensors) with identical keys, shapes and dtypes.",
            callback=prefetch_digests,
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", help="The superposed .safetensors file to write.")
    ] = DEFAULT_FILE,
    kind: Annotated[Kind, typer.Option(help="Context kind.")] = Kind.BINARY,
    seed: Annotated[int, typer.Option(help="Seed of the contexts; they are also stored in the file.")] = 0,
    labels: Annotated[
        str | None,
        typer.Option(help="Comma-separated context labels (default: the input file stems)."),
    ] = None,
    base: Annotated[
        str,
        typer.Option(
            help="What superposed tensors are centred on: auto (per tensor: none or mean, by predicted error), "
            "mean (the inputs' mean), none (plain superposition), or PATH (the parent checkpoint).",
            callback=prefetch_digests,
        ),
    ] = "auto",
    link_base: Annotated[
        bool,
        typer.Option(
            "--link-base", help="With --base PATH: record the parent's path and sha256, not its tensors."
        ),
    ] = False,
    keep: KeepOpt = None,
    superpose: SuperposeOpt = None,
    max_error: MaxErrorOpt = MAX_ERROR,
    eta: EtaOpt = None,
    max_interference: MaxInterferenceOpt = None,
    min_share: MinShareOpt = 0.0,
    dtype: Annotated[
        DType | None, typer.Option(help="Stored dtype of superposed tensors (default: as input).")
    ] = None,
    max_rotation_fan_in: Annotated[
        int,
        typer.Option(help="Refuse rotation contexts over a larger fan-in (they cost K×M² floats)."),
    ] = 4096,
    task: Annotated[
        str | None,
        typer.Option(
            help="Task file to record for analyze/export (path or module); its model gives the fan-in axes; with load_data(), η is measured on its calib inputs."
        ),
    ] = None,
    fan_in_axis: Annotated[
        list[str] | None,
        typer.Option(
            help="GLOB=AXIS: bind these tensors' fan-in on dim AXIS ('rest': every dim but 0), over what "
            "the task's model or config.json says (docs/policy.md). Repeatable."
        ),
    ] = None,
    calib_samples: Annotated[
        int,
        typer.Option(min=0, help="With --task: calib inputs per model to measure η on (0: the --eta prior)."),
    ] = CALIB_SAMPLES,
    policy: Annotated[
        PolicySource,
        typer.Option(
            help="rules (predicted errors, docs/policy.md) or measured (run --task's calib data; docs/analyze.md)."
        ),
    ] = PolicySource.RULES,
    max_drop: Annotated[
        float,
        typer.Option(min=0, help="With --policy measured: allowed calib accuracy drop per context (points)."),
    ] = 0.5,
    max_output_error: Annotated[
        float | None,
        typer.Option(min=0, help="With --policy measured: also bound the end-to-end output error."),
    ] = None,
    allow_nonfinite: Annotated[
        bool, typer.Option("--allow-nonfinite", help="Merge weights containing NaN/Inf.")
    ] = False,
    trust_pickle: Annotated[
        bool,
        typer.Option(
            "--trust-pickle",
            help="Allow pickled modules: runs code from the file. Only for files you trust.",
        ),
    ] = False,
    strip_prefix: Annotated[
        str | None,
        typer.Option(
            help="Strip this prefix from every tensor name (e.g. a LightningModule's 'model.'); names "
            "without it are dropped. Default: DDP's 'module.' and a Lightning checkpoint's one common prefix."
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing output.")] = False,
    max_shard_size: MaxShardSizeOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON instead of a table.")
    ] = False,
) -> None:
    """Superpose several checkpoints into one .safetensors file."""
    from pspctl.architectures import parse_overrides
    from pspctl.merge import MergeOptions
    from pspctl.merge import merge as run_merge

    options = MergeOptions(
        kind=kind.value,
        seed=seed,
        labels=labels.split(",") if labels else None,
        policy=policy_from_flags(max_interference, min_share, keep, superpose, max_error=max_error, eta=eta),
        dtype=None if dtype is None else dtype.value,
        base=base,
        link_base=link_base,
        max_rotation_fan_in=max_rotation_fan_in,
        allow_nonfinite=allow_nonfinite,
        trust_pickle=trust_pickle,
        strip_prefix=strip_prefix,
        force=force,
        task=task,
        calib_samples=calib_samples,
        command=command_line(),
        fan_in_axes=parse_overrides(fan_in_axis or []),
        max_shard_size=shard_size(max_shard_size),
    )
    if policy is PolicySource.MEASURED:
        from dataclasses import replace

        from pspctl.planning import policy_for_merge

        with progress_bar("measuring", quiet=quiet or json_out) as update:
            chosen, _ = policy_for_merge(
                inputs, options, max_drop=max_drop, max_output_error=max_output_error, progress=update
            )
        options = replace(options, policy=chosen)  # on the centres it measured (chosen.centres)
    with progress_bar("merging", quiet=quiet or json_out) as update:
        report = run_merge(inputs, output, options, progress=update)
    if json_out:
        print_json(report.to_dict())
        return
    from rich.markup import escape

    for warning in report.warnings:
        err_console.print(f"warning: {warning}", markup=False)
    console.print(merge_table(report))
    for note in report.notes:
        console.print(f"note: {escape(note)}")
    errors = ", ".join(
        f"{escape(lab)} {e:.3f}" for lab, e in zip(report.labels, report.predicted_error, strict=True)
    )
    console.print(
        f"inputs {human_bytes(report.input_bytes)} → output {human_bytes(report.output_bytes)}: "
        f"storage ratio [bold]{report.storage_ratio:.2f}×[/]; predicted output error per context: {errors}"
    )


def merge_table(report: MergeReport) -> Table:
    """One row per tensor, fit for 80 columns: long names fold, never cut."""
    from rich.markup import escape

    table = Table(title=f"{report.output}: {report.num_contexts} models, {report.kind} contexts")
    table.add_column("tensor", overflow="fold", ratio=3)
    table.add_column("role")
    table.add_column("base")
    table.add_column("error", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("why", overflow="fold", ratio=2)
    for d in report.decisions:
        superposed = d.role.value == "superposed"
        why = d.reason if d.eta is None else f"{d.reason} (η {d.eta:.3g} {d.eta_source})"
        table.add_row(
            escape(d.name), d.role.value.replace("_", " "), d.centre if superposed else "",
            "" if d.error is None else f"{d.error:.3f}", human_bytes(report.stored_bytes[d.name]), escape(why),
        )  # fmt: skip
    return table


def superposed_path(path: Path) -> Path:
    """`path`, refused if it is a directory without a superposed file (sharded or not)."""
    from pspctl.digests import INDEX_SUFFIX
    from pspctl.errors import InputError

    if path.is_dir() and len(list(path.glob(f"*{INDEX_SUFFIX}")) or list(path.glob("*.safetensors"))) != 1:
        raise InputError(f"{path}: is a directory, not a superposed file")
    return path


def policy_from_flags(
    max_interference: float | None,
    min_share: float,
    keep: list[str] | None,
    superpose: list[str] | None,
    *,
    max_error: float = MAX_ERROR,
    eta: float | None = None,
) -> Policy:
    """The Policy that the shared policy flags describe."""
    from pspctl.policy import Policy

    return Policy(
        max_interference, min_share, tuple(keep or ()), tuple(superpose or ()), max_error=max_error, eta=eta
    )


@app.command()
@handle_errors
def extract(
    file: FileArg = DEFAULT_FILE,
    context: Annotated[str, typer.Option("--context", "-c", help="0-based index, label, or 'all'.")] = ...,  # type: ignore[assignment]
    output: Annotated[
        Path | None,
        typer.Option(
            "-o",
            "--output",
            help="out.safetensors or out.pt; a folder for a Hugging Face model; a directory with --context all.",
        ),
    ] = None,
    fmt: Annotated[
        StateDictFormat | None,
        typer.Option(
            "--format",
            help="safetensors or pt (file type per context with --context all), or hf (a Hugging Face model "
            "folder; the default for a merge of HF folders, unless -o names a .safetensors/.pt file).",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing outputs.")] = False,
    base: BaseOpt = None,
    max_shard_size: MaxShardSizeOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
) -> None:
    """Write one model (or all) back out as a plain state_dict, or as a Hugging Face model folder."""
    from pspctl.extract import extract as run_extract

    if output is None:
        from pspctl.fileformat import SuperposedFile

        # A merge of HF folders extracts to model folders by default (pspctl.extract.default_format).
        hf = fmt is StateDictFormat.HF or (fmt is None and SuperposedFile(file).header.hf is not None)
        output = Path(
            "extracted" if context == "all" else f"context-{context}" + ("" if hf else ".safetensors")
        )
    fmt_name = None if fmt is None else fmt.value
    with progress_bar("extracting", quiet=quiet) as update:
        written = run_extract(
            file,
            context,
            output,
            fmt=fmt_name,
            force=force,
            base=base,
            max_shard_size=shard_size(max_shard_size),
            progress=update,
        )
    for path in written:
        console.print(f"wrote {path}")


@app.command()
@handle_errors
def info(
    file: FileArg = DEFAULT_FILE,
    json_out: Annotated[bool, typer.Option("--json", help="Print the header as JSON.")] = False,
) -> None:
    """Show what a superposed file holds."""
    from dataclasses import asdict

    from pspctl.fileformat import SuperposedFile

    sf = SuperposedFile(file)
    h = sf.header
    if json_out:
        print_json({"path": str(file), "bytes": sf.nbytes(), **asdict(h)})
        return
    from rich.markup import escape  # labels, names and paths come from the file: never markup

    console.print(
        f"[bold]{escape(str(file))}[/]  pspctl format v{h.format_version} (written by pspctl {escape(h.pspctl_version)})"
    )
    console.print(f"kind {h.kind}, seed {h.seed}, {h.num_contexts} contexts, {human_bytes(sf.nbytes())}")
    if h.base:
        where = (
            "the inputs' mean"
            if h.base["source"] == "mean"
            else f"{h.base['path']} (sha256 {h.base['sha256'][:12]})"
        )
        console.print(
            f"centred on {escape(where)}, {'linked' if h.base['linked'] else 'stored'}", highlight=False
        )
    if h.hf:
        files = h.hf["files"]
        stored = sum(f["stored"] for f in files)
        own = [f["name"] for f in files if "per_context" in f]
        console.print(
            f"Hugging Face folders: {len(files)} non-weight files of {escape(h.hf['source'])} recorded, "
            f"{stored} stored ({escape(', '.join(f['name'] for f in files))})"
            + (f"; per context: {escape(', '.join(own))}" if own else ""),
            highlight=False,
        )
    contexts = Table("context", "label", "input", "sha256", title="contexts")
    for k, label in enumerate(h.labels):
        src = h.inputs[k] if k < len(h.inputs) else {}
        contexts.add_row(str(k), escape(label), escape(src.get("path", "")), src.get("sha256", "")[:12])
    console.print(folded(contexts))
    tensors = Table("tensor", "role", "base", "dtype", "shape", "fan-in", "why", title="tensors")
    for name, m in h.tensors.items():
        tensors.add_row(
            escape(name), m.role, "centred" if m.centred else "", m.dtype, "×".join(map(str, m.shape)) or "scalar",
            str(m.fan_in) + ("" if m.fan_in_axis is None else f" (dim {m.fan_in_axis})"), escape(m.reason),
        )  # fmt: skip
    console.print(folded(tensors))
    for alias, name in h.tied.items():
        console.print(f"tied: {escape(alias)} is {escape(name)}")
    if h.task:
        console.print(f"task: {escape(h.task)}")
    if h.recipe.get("command"):
        console.print(f"recipe: {escape(str(h.recipe['command']))}")
    for step in h.history:
        console.print(f"then: {escape(str(step))}")


@app.command()
@handle_errors
def demo(
    samples: Annotated[Path, typer.Option(help="The bundled samples folder.")] = Path("samples"),
    outdir: Annotated[Path, typer.Option("-o", "--output", help="Where to write <kind>.safetensors.")] = Path(
        "demo-out"
    ),
    kind: Annotated[
        list[Kind] | None, typer.Option(help="Kinds to try (default: all four). Repeatable.")
    ] = None,
) -> None:
    """Merge the bundled digit models with each kind; show per-context accuracy, original vs retrieved."""
    from pspctl.demo import run_demo

    outdir.mkdir(parents=True, exist_ok=True)
    kinds = [k.value for k in (kind or list(Kind))]
    rows = run_demo(samples, outdir, kinds=kinds)
    table = Table(title="bundled permuted-digits models: test accuracy (%)")
    for col in ("kind", "context", "original", "retrieved", "Δ", "storage ratio"):
        table.add_column(col, justify="left" if col in ("kind", "context") else "right")
    for r in rows:
        delta = r.retrieved - r.original
        color = "green" if delta > -1 else "red"
        table.add_row(
            r.kind, f"{r.context} {r.label}", f"{r.original:.2f}", f"{r.retrieved:.2f}",
            f"[{color}]{delta:+.2f}[/]", f"{r.storage_ratio:.2f}×",
        )  # fmt: skip
    console.print(folded(table))
    console.print(f"superposed files in {outdir}/; try: pspctl info {outdir}/binary.safetensors")
