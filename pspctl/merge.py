"""`merge`: K checkpoints in, one superposed file out, one tensor name at a time."""

from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from pspctl.architectures import axes_from_config, axes_from_model, resolve_axes
from pspctl.checkpoints import Checkpoint, open_checkpoint
from pspctl.contexts import Kind, make_contexts
from pspctl.digests import (
    DIRECTORY_NAMES,
    INDEX_SUFFIX,
    checkpoint_files,
    record_path,
    record_task,
    sha256_checkpoint,
)
from pspctl.dtypes import itemsize, torch_dtype
from pspctl.errors import InputError, MismatchError, PolicyError, listed
from pspctl.fileformat import Header, SuperposedWriter, TensorMeta, check_output, pack
from pspctl.header import check_labels, safe_label
from pspctl.hf import check_configs, differing_files, encoder_decoder_tables, hf_paths, record_folder
from pspctl.kinds import OPS
from pspctl.measure import measure_bind
from pspctl.outputs import refuse_inputs
from pspctl.policy import (
    Decision,
    Option,
    Policy,
    Role,
    TensorInfo,
    choose,
    decide,
    is_table,
    matches_any,
    predicted_errors,
)
from pspctl.superpose import bind, fan_in
from pspctl.task import load_task
from pspctl.types import CALIB_SAMPLES, Progress

__all__ = [
    "BASE_MODES",
    "MergeOptions",
    "MergeReport",
    "centre_options",
    "check_compatible",
    "merge",
    "open_base",
    "open_inputs",
    "plan",
    "resolve_fan_in_axes",
    "store_tensor",
]


# Tensors measured at once in the first pass, one thread each: torch runs on one thread per
# operation (`_one_torch_thread`), so two tensors keep two cores busy (the speed benchmark's
# merge, in-process: 1.36 → 1.17 s). Each holds K × `measure.REREAD` values of its inputs.
MEASURING = min(2, os.cpu_count() or 1)
BASE_MODES = ("auto", "mean", "none")  # `--base` values that name no checkpoint


@dataclass(frozen=True)
class MergeOptions:
    kind: Kind | str = Kind.BINARY
    seed: int = 0
    labels: Sequence[str] | None = None
    policy: Policy = field(default_factory=Policy)
    dtype: str | None = None  # override the stored dtype of superposed tensors
    max_rotation_fan_in: int = 4096
    allow_nonfinite: bool = False
    trust_pickle: bool = False
    force: bool = False
    task: str | None = None
    command: str | None = None  # the command line, recorded in the recipe
    base: str = "auto"  # "auto", "mean", "none", or the path of the parent checkpoint
    link_base: bool = False  # record the parent's path and sha256 instead of storing its tensors
    calib_samples: int = (
        CALIB_SAMPLES  # with a task that has load_data: inputs per model to measure η on; 0: prior
    )
    fan_in_axes: tuple[tuple[str, int | None], ...] = ()  # --fan-in-axis GLOB=AXIS, later ones win
    strip_prefix: str | None = None  # strip this key prefix (e.g. a LightningModule's "model.")
    max_shard_size: int | str | None = None  # write shards of at most this size and an index


@dataclass
class MergeReport:
    output: str
    kind: str
    num_contexts: int
    labels: list[str]
    decisions: list[Decision]
    stored_bytes: dict[str, int]  # per original tensor: bytes it takes in the output
    input_bytes: int  # tensor bytes of the K inputs together
    output_bytes: int  # size of the output file
    notes: list[str]
    predicted_error: list[float] = field(default_factory=list)  # per context: sqrt(Σ_t err_t,k²)
    warnings: list[str] = field(default_factory=list)
    base: dict[str, Any] | None = None
    eta: dict[str, Any] | None = None  # where η came from: {"prior", "source", "measured", "calib"}

    @property
    def storage_ratio(self) -> float:
        return self.input_bytes / max(self.output_bytes, 1)

    def to_dict(self) -> dict[str, Any]:
        rows = []
        for d in self.decisions:
            row = asdict(d)
            row["role"] = d.role.value
            row["bytes"] = self.stored_bytes.get(d.name, 0)
            rows.append(row)
        return {
            "output": self.output,
            "kind": self.kind,
            "num_contexts": self.num_contexts,
            "labels": self.labels,
            "tensors": rows,
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "storage_ratio": self.storage_ratio,
            "predicted_error": self.predicted_error,
            "base": self.base,
            "eta": self.eta,
            "notes": self.notes,
            "warnings": self.warnings,
        }


def check_compatible(checkpoints: Sequence[Checkpoint]) -> None:
    """All checkpoints must share keys, shapes and dtypes; list the first differences otherwise."""
    ref = checkpoints[0]
    problems: list[str] = []
    for ckpt in checkpoints[1:]:
        for name in ref.names:
            if name not in ckpt.infos:
                problems.append(f"{name}: missing in {ckpt.path.name}")
            elif ckpt.infos[name].shape != ref.infos[name].shape:
                problems.append(
                    f"{name}: shape {list(ckpt.infos[name].shape)} in {ckpt.path.name} vs {list(ref.infos[name].shape)}"
                )
            elif ckpt.infos[name].dtype != ref.infos[name].dtype:
                problems.append(
                    f"{name}: dtype {ckpt.infos[name].dtype} in {ckpt.path.name} vs {ref.infos[name].dtype}"
                )
        problems += [f"{n}: only in {ckpt.path.name}" for n in ckpt.names if n not in ref.infos]
    if problems:
        raise MismatchError(f"inputs do not match: {listed(problems, '; ')}")


def _unmatched(names: Sequence[str], options: MergeOptions) -> list[str]:
    """A warning per --keep, --superpose or --fan-in-axis pattern that matches no tensor: a
    typo (`--keep 2.weigth`) would otherwise leave 2.weight to the policy, silently."""
    flags = [("--keep", g, g) for g in options.policy.keep]
    flags += [("--superpose", g, g) for g in options.policy.superpose]
    flags += [("--fan-in-axis", g, f"{g}={'rest' if a is None else a}") for g, a in options.fan_in_axes]
    return [
        f"{flag} {shown!r} matches no tensor; names look like {listed(list(names[:3]))}"
        for flag, glob, shown in flags
        if not any(matches_any(n, [glob]) for n in names)
    ]


def _same_inputs(labels: Sequence[str], digests: Sequence[str]) -> list[str]:
    """A warning for each input given more than once (same sha256): its contexts are one model."""
    groups: dict[str, list[str]] = {}
    for label, digest in zip(labels, digests, strict=True):
        groups.setdefault(digest, []).append(label)
    return [
        f"{listed(same)} are the same checkpoint (sha256 {digest[:12]}…): their contexts hold one model"
        for digest, same in groups.items()
        if len(same) > 1
    ]


def open_inputs(paths: Sequence[str | Path], options: MergeOptions) -> list[Checkpoint]:
    """The K checkpoints, checked compatible, with each tensor's fan-in axis resolved
    (`resolve_fan_in_axes`) and only the ties all K share kept tied."""
    checkpoints = [
        open_checkpoint(p, trust_pickle=options.trust_pickle, strip_prefix=options.strip_prefix)
        for p in paths
    ]
    common = {a: n for a, n in checkpoints[0].ties.items() if all(c.ties.get(a) == n for c in checkpoints)}
    for c in checkpoints:
        c.untie([a for a in c.ties if a not in common])
    check_compatible(checkpoints)
    axes = resolve_fan_in_axes(paths[0], checkpoints[0], options)
    for c in checkpoints:
        c.infos = {n: replace(i, fan_in_axis=axes.get(n)) for n, i in c.infos.items()}
    return checkpoints


def resolve_fan_in_axes(path: str | Path, ckpt: Checkpoint, options: MergeOptions) -> dict[str, int]:
    """Each tensor's non-default fan-in axis (pspctl.architectures): from the task's model when
    there is a task, from config.json beside a Hugging Face folder's weights, then the overrides."""
    shapes = {n: i.shape for n, i in ckpt.infos.items()}
    model = config = None
    if options.task:
        model = axes_from_model(load_task(options.task).build_model())
    found = hf_config(path)
    if found is not None:
        config = axes_from_config(found, list(shapes))
    return resolve_axes(shapes, model=model, config=config, overrides=options.fan_in_axes)


def hf_config(path: str | Path) -> dict[str, Any] | None:
    """The config.json of a Hugging Face folder (the path, or the folder of its weights), or None."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    if not (path.is_dir() or path.name in DIRECTORY_NAMES) or not (folder / "config.json").is_file():
        return None
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{folder / 'config.json'}: not readable JSON ({e})") from None
    return config if isinstance(config, dict) else None


def _default_label(path: Path) -> str:
    """The file's stem; a directory's name, or the parent's for a shard index (they share names)."""
    if path.is_dir():
        return path.resolve().name
    if path.name.endswith(INDEX_SUFFIX):
        return path.resolve().parent.name
    return path.stem


def _labels(paths: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    """The given labels, checked; or the inputs' names, made safe and unique."""
    if labels is not None:
        labels = [s.strip() for s in labels]
        if len(labels) != len(paths):
            raise MismatchError(f"{len(labels)} labels for {len(paths)} inputs")
        return check_labels(labels)
    stems = [safe_label(_default_label(p)) for p in paths]
    if len({s.casefold() for s in stems}) < len(stems):
        stems = [f"{s}-{i}" for i, s in enumerate(stems)]
    return check_labels(stems)


def plan(infos: Sequence[TensorInfo], num_contexts: int, options: MergeOptions) -> list[Decision]:
    """The policy's decisions, checked against the rotation fan-in limit."""
    decisions = decide(infos, num_contexts, options.policy)
    if Kind(options.kind) is Kind.ROTATION:
        for i, d in enumerate(decisions):
            if d.role is Role.SUPERPOSED and d.fan_in > options.max_rotation_fan_in:
                if not d.forced:
                    decisions[i] = replace(d, role=Role.PER_CONTEXT, reason="rotation fan-in over the limit")
                    continue
                raise PolicyError(
                    f"{d.name}: rotation fan-in {d.fan_in} exceeds the limit {options.max_rotation_fan_in} "
                    f"(K×{d.fan_in}² floats of contexts); raise --max-rotation-fan-in or --keep it"
                )
    return decisions


def _resolve_inputs(inputs: Sequence[str | Path], output: Path) -> tuple[list[Path], list[Path]]:
    """The input paths, and every file they are read from (which the output must not be)."""
    paths = [Path(p) for p in inputs]
    if len(paths) < 2:
        raise MismatchError(f"merge needs at least 2 inputs, got {len(paths)}")
    files = [f for p in paths for f in checkpoint_files(p)]
    refuse_inputs(output, files)
    return paths, files


def merge(
    inputs: Sequence[str | Path],
    output: str | Path,
    options: MergeOptions = MergeOptions(),
    *,
    progress: Progress | None = None,
) -> MergeReport:
    """Superpose K checkpoints into one pspctl file.

    Two passes, one tensor name at a time (the first measures `MEASURING` names at once, one
    thread each, and takes them in order): the first reads the K inputs to find the tensors
    equal in all of them, to predict each storage option's error (Proposition 2 with the
    norms of what would be superposed: the weights, or their deltas from the base) and to
    bind each candidate while its K copies are read; `choose` then spends the error budget
    where it saves most bytes; the second stores each tensor as chosen (reading the inputs
    again only for those kept per context). Nothing is written unless the whole merge
    succeeds (the output appears by an atomic rename).

    Raises:
        PspctlError subclasses for every bad input; see pspctl.errors.
    """
    with _one_torch_thread():
        return _merge(inputs, output, options, progress)


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """torch on one thread per operation while merging: its operations run on blocks of
    ~256 KiB (see `measure`), too small to pay for splitting across threads; the cores are
    used by measuring `MEASURING` tensors at once instead, beside the threads that hash the
    inputs and checksum the output. On 2 cores one tensor at a time with one torch thread
    took 0.6× the time of torch's default of one thread per core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _merge(
    inputs: Sequence[str | Path], output: str | Path, options: MergeOptions, progress: Progress | None
) -> MergeReport:
    output = Path(output)
    kind = Kind(options.kind)
    paths, files = _resolve_inputs(inputs, output)
    check_output(output, force=options.force, inputs=files)
    labels = _labels(paths, options.labels)
    centres = _centres(options)
    checkpoints = open_inputs(paths, options)
    folders = hf_paths(paths)
    if folders:
        check_configs(paths)
        options = replace(options, policy=replace(options.policy, lookups=encoder_decoder_tables(paths[0])))
    parent = None
    if "base" in centres:
        parent = open_base(options, checkpoints[0])
        files += checkpoint_files(options.base)
        refuse_inputs(output, files)
    K = len(checkpoints)
    infos = list(checkpoints[0].infos.values())
    ties = dict(checkpoints[0].ties)
    decisions = plan(infos, K, options)
    tick = progress or (lambda done, total, item: None)
    etas, eta_notes = _calibrate(
        options, checkpoints, [d.name for d in decisions if d.role is Role.SUPERPOSED]
    )

    # Pass 1: what is shared, and each candidate's options with their predicted errors.
    measured: dict[str, list[Option]] = {}
    # The inputs' mean of each tensor that may be centred on it, from the measuring pass: kept
    # (in the stored dtype) only for the tensors that end up centred on it, where it is stored
    # anyway, so that the writing pass need not read the K inputs once more to average them.
    means: dict[str, torch.Tensor] = {}
    # Each candidate bound while its K copies are in memory, in its stored form, centred on the
    # mean where that is an option (else on its one centre): the writing pass reads no input
    # again for a superposed tensor. Dropped for the tensors that end up per context.
    bound: dict[str, tuple[str, torch.Tensor]] = {}
    writer = SuperposedWriter(kind, K, linked=options.link_base)
    hashes = _hash_inputs(paths)  # in a thread while the inputs are read (hashlib frees the GIL)

    def eta_of(info: TensorInfo) -> float | list[float]:
        """η per context measured on calib, else the prior for the tensor's shape."""
        return etas.get(info.name) or options.policy.prior(info.shape)

    def measure(i: int) -> tuple[bool, list[Option], torch.Tensor | None, tuple[str, torch.Tensor] | None]:
        info, d = infos[i], decisions[i]
        lookup = _is_lookup(info, ties, options.policy)

        def read() -> _Copies:
            return _Copies(checkpoints, info.name)

        def check(k: int, w: torch.Tensor, norm: float | None) -> None:
            _check_finite(checkpoints[k], info.name, w, norm, options.allow_nonfinite)

        base = None if parent is None or d.role is not Role.SUPERPOSED else parent[info.name]
        return _measure(info, d, read, base, centres, kind, options, eta_of(info), lookup, check)

    # MEASURING tensors at once, each in its own thread (torch frees the GIL), results in order.
    with ThreadPoolExecutor(max_workers=MEASURING, thread_name_prefix="pspctl-measure") as pool:
        ahead = deque(pool.submit(measure, i) for i in range(min(MEASURING, len(infos))))
        for i, (info, d) in enumerate(zip(infos, decisions, strict=True)):
            tick(i, 2 * len(infos), info.name)
            shared, measured[info.name], mean, bound_as = ahead.popleft().result()
            if i + MEASURING < len(infos):
                ahead.append(pool.submit(measure, i + MEASURING))
            if mean is not None:
                means[info.name] = mean
                writer.checksum_ahead(mean)
            if bound_as is not None:
                bound[info.name] = bound_as
                writer.checksum_ahead(bound_as[1])
            if shared:
                decisions[i] = replace(d, role=Role.SHARED, reason="equal in every input")
            elif measured[info.name]:
                eta = eta_of(info)
                source = "calib" if info.name in etas else "prior"
                decisions[i] = replace(d, eta=min(eta) if isinstance(eta, list) else eta, eta_source=source)
    measured = {name: opts for name, opts in measured.items() if opts}
    forced = [d.name for d in decisions if d.forced]
    chosen = choose(measured, forced, options.policy.max_error, dict(options.policy.centres))
    index = {info.name: i for i, info in enumerate(infos)}
    for name in [n for n in bound if not getattr(chosen.get(n), "centre", None)]:
        del bound[name]  # per context: its copies are stacked in the writing pass
    for name in [n for n in means if getattr(chosen.get(n), "centre", None) != "mean"]:
        if name in bound and bound[name][1].element_size() < 4:
            # A 16-bit sum put back would be rounded twice: bound afresh in the writing pass.
            del bound[name]
        elif name in bound:  # superposed without a base: the deltas' sum with the mean put back
            info, d = infos[index[name]], decisions[index[name]]
            bound[name] = ("none", _uncentre(bound[name][1], means[name], info, d, kind, K, options))
        del means[name]

    # Pass 2: store each tensor as chosen.
    hf = record_folder(paths, writer, source=record_path(paths[0], output)) if folders else None
    stored: dict[str, int] = {}
    errors = [0.0] * K
    warnings = []
    for i, info in enumerate(infos):
        tick(len(infos) + i, 2 * len(infos), info.name)
        d = decisions[i] = _settle(decisions[i], chosen.get(info.name), measured.get(info.name, []))
        if d.error is not None:
            errors = [math.hypot(a, b) for a, b in zip(errors, chosen[info.name].per_context, strict=True)]
            if d.forced and d.error > 1:
                how = "as --policy measured chose" if options.policy.origin == "measured" else "as forced"
                warnings.append(
                    f"{info.name}: superposed {how}, but its predicted output error is {d.error:.3g} "
                    "(above 1: the retrieved layer is mostly noise)"
                )
        base = means.pop(info.name, None) if d.centre == "mean" else None
        if parent is not None and d.centre == "base":
            base = parent[info.name]
        stored[info.name] = store_tensor(
            writer, info, d, checkpoints, options, base=base, bound=bound.pop(info.name, None)
        )

    warnings += differing_files(paths, hf) if hf is not None else []
    warnings += _same_inputs(labels, [h.result() for h in hashes])
    warnings += _unmatched([i.name for i in infos] + list(ties), options)
    noisy = [f"{label} {e:.3g}" for label, e in zip(labels, errors, strict=True) if e > 1]
    if noisy:  # each tensor may stay under 1 while they add up above it
        warnings.append(
            f"predicted output error above 1 for {listed(noisy)}: the retrieved models are mostly noise"
        )
    notes = [f"{c.path.name}: {n}" for c in checkpoints for n in c.notes] + eta_notes
    if hf is not None:
        hf["predicted_error"] = [float(f"{e:.4g}") for e in errors]
        kept = sum(f["stored"] for f in hf["files"])
        own = [f["name"] for f in hf["files"] if "per_context" in f]
        notes.append(
            f"Hugging Face folders: {kept} of {len(hf['files'])} non-weight files of {paths[0]} stored "
            "for extract (config, tokenizer…)"
            + (f"; each context keeps its own {listed(own)} (format v3)" if own else "")
        )
    header = Header(
        kind=kind.value,
        seed=options.seed,
        num_contexts=K,
        labels=labels,
        tensors={},
        inputs=[
            {"path": record_path(p, output), "sha256": digest.result(), "label": lab}
            for p, lab, digest in zip(paths, labels, hashes, strict=True)
        ],
        recipe=_recipe(options),
        task=record_task(options.task, output),
        base=_base_record(decisions, options, output),
        tied=ties,
        hf=hf,
    )
    written = writer.write(
        output, header, force=options.force, inputs=files, max_shard_size=options.max_shard_size
    )
    report = MergeReport(
        output=str(written[-1]),
        kind=kind.value,
        num_contexts=K,
        labels=labels,
        decisions=decisions,
        stored_bytes=stored,
        input_bytes=sum(c.nbytes() for c in checkpoints),
        output_bytes=sum(f.stat().st_size for f in written),
        notes=notes,
        predicted_error=errors,
        warnings=warnings,
        base=header.base,
        eta=_eta_record(decisions, options, etas),
    )
    if round(report.storage_ratio, 2) < 1.25:  # as printed: 1.2496 reads 1.25×
        was_forced = any(d.forced for d in report.decisions if d.role is Role.SUPERPOSED)
        report.notes.append(_saved_little(report.storage_ratio, options, was_forced, K))
    return report


def _saved_little(ratio: float, options: MergeOptions, forced: bool, K: int) -> str:
    """The note for a merge that saved little: what else may, given the --base it had."""
    said = f"storage ratio {ratio:.2f}×: little was superposed"
    if K == 2 and options.base in BASE_MODES and not options.link_base:
        return (
            f"{said}: with 2 models, centring on their mean stores the mean and one superposed tensor, "
            "as many bytes as the two models. A parent you keep anyway saves them "
            "(--base PATH --link-base); plain superposition (--base none) halves them at a larger error"
        )
    if not forced:  # forced tensors are superposed whatever the budget
        said += f" within the error budget (--max-error {options.policy.max_error:g})"
    trade = "--task measures η on calib inputs; a larger --max-error trades accuracy for storage"
    if options.base == "none":
        return (
            f"{said} with plain superposition (--base none). Fine-tunes of one parent and folds "
            "of one init merge far better centred: --base auto (the default) or --base PATH"
        )
    if options.base in BASE_MODES:  # auto, mean
        return (
            f"{said}, even centred on the inputs' mean. Fine-tunes of one parent may fit better "
            f"on it (--base PATH); {trade}"
        )
    return f"{said}, even centred on the parent. The inputs' mean is often nearer (--base auto); {trade}"


def _calibrate(
    options: MergeOptions, checkpoints: Sequence[Checkpoint], candidates: Sequence[str]
) -> tuple[dict[str, list[float]], list[str]]:
    """η per context for the candidates, measured on the task's calib inputs; and notes.

    Only with `options.task` whose task file has load_data(); everything else keeps the prior.
    """
    if not options.task or options.calib_samples <= 0 or not candidates:
        return {}, []
    from pspctl.calibration import measure_etas  # imports the analysis hooks: only when used
    from pspctl.task import load_task

    task = load_task(options.task)
    if task.load_data is None:
        return {}, [f"task {options.task} has no load_data(): η is the {options.policy.prior_text()}"]
    etas = measure_etas(task, checkpoints, candidates, samples=options.calib_samples)
    missing = [n for n in candidates if n not in etas.values]
    note = f"η measured on {etas.source} for {len(etas.values)} of {len(candidates)} candidate tensors"
    by_prior: dict[float, list[str]] = {}
    for name in missing:
        by_prior.setdefault(options.policy.prior(checkpoints[0].infos[name].shape), []).append(name)
    for prior, names in by_prior.items():
        note += f"; the prior {prior:g} for {listed(names)}"
    return etas.values, [note]


def _eta_record(
    decisions: Sequence[Decision], options: MergeOptions, etas: dict[str, list[float]]
) -> dict[str, Any]:
    """Where each candidate's η came from, for the report's JSON."""
    return {
        "prior": options.policy.priors(),
        "calib_samples": options.calib_samples if etas else 0,
        "measured": {n: e for n, e in etas.items()},
        "from_prior": [d.name for d in decisions if d.eta_source == "prior"],
    }


def _settle(d: Decision, chosen: Option | None, options: Sequence[Option]) -> Decision:
    """`d` once the budget is spent: superposed with its centre and error, or per context."""
    if chosen is None:
        return d
    if chosen.centre:
        reason = d.reason if d.forced else "within the error budget"
        return replace(d, centre=chosen.centre, error=chosen.error, reason=reason)
    saving = [o.error for o in options if o.centre and o.nbytes < chosen.nbytes]
    if not saving:  # K = 2 centred: the base and the sum are two copies
        return replace(d, role=Role.PER_CONTEXT, reason="superposing saves no bytes")
    return replace(d, role=Role.PER_CONTEXT, reason=f"error {min(saving):.2g}: over the budget")


def _is_lookup(info: TensorInfo, ties: dict[str, str], policy: Policy) -> bool:
    """An embedding table (`policy.is_table`), under its own name or under a name tied to it."""
    names = [info.name, *(alias for alias, n in ties.items() if n == info.name)]
    return any(is_table(n, info.shape, policy.lookups) for n in names)


def _centres(options: MergeOptions) -> tuple[str, ...]:
    """The storage options `--base` allows a superposed tensor."""
    if options.link_base and options.base in BASE_MODES:
        raise PolicyError(f"--link-base needs --base PATH (the parent checkpoint), not --base {options.base}")
    return {"none": ("none",), "mean": ("mean",), "auto": ("none", "mean")}.get(options.base, ("base",))


def open_base(options: MergeOptions, model: Checkpoint) -> Checkpoint:
    """`--base PATH`, read under the inputs' names (its ties follow theirs).

    Raises:
        MismatchError: the base is another architecture than `model`.
    """
    parent = open_checkpoint(
        options.base, trust_pickle=options.trust_pickle, strip_prefix=options.strip_prefix
    )
    parent.untie([a for a in parent.ties if a not in model.ties])
    for alias in model.ties:
        parent.infos.pop(alias, None)
    _check_base(parent, model)
    return parent


def _check_base(parent: Checkpoint, model: Checkpoint) -> None:
    """The base must have the inputs' architecture: the same keys, shapes and dtypes."""
    try:
        check_compatible([model, parent])
    except MismatchError as e:
        raise MismatchError(
            f"--base {parent.path} is another architecture: {str(e).removeprefix('inputs do not match: ')}"
        ) from None


def _measure(
    info: TensorInfo,
    d: Decision,
    read: Callable[[], Sequence[torch.Tensor]],
    parent: torch.Tensor | None,
    centres: Sequence[str],
    kind: Kind,
    options: MergeOptions,
    eta: float | Sequence[float],
    lookup: bool = False,
    check: Callable[[int, torch.Tensor, float | None], None] = lambda k, w, norm: None,
) -> tuple[bool, list[Option], torch.Tensor | None, tuple[str, torch.Tensor] | None]:
    """Whether the K copies of one tensor are equal; for a candidate, each way to store it
    with its predicted error per context and its bytes, the inputs' mean in their dtype
    when centring on it is an option, and the tensor bound (on the mean where that is an
    option, else on its one centre) in its stored form, with that centre.

    `read()` gives the K copies (memory-mapped: their pages are read when first touched). A
    candidate's are measured and bound together, in one pass (`measure.measure_bind`), so
    that no input is read twice; the pages measured are released as it goes.
    `check(k, w, norm)` sees each copy of a tensor kept per context, and a candidate's
    copies whose norm is not finite.
    """
    if d.role is not Role.SUPERPOSED:  # only whether the copies are equal: two at a time
        first, equal = None, True
        for k, w in enumerate(read()):
            check(k, w, None)
            if first is None:
                first = w
            elif equal:
                equal = torch.equal(first, w)
        return first is not None and equal and bool(first.numel()), [], None, None
    copies = read()
    if not copies:
        return False, [], None, None
    K, n = len(copies), info.numel
    numel = bool(n)
    centre = "mean" if "mean" in centres else centres[0]
    ctx = make_contexts(kind, K, d.fan_in, options.seed, info.name)
    found = measure_bind(
        copies, mean="mean" in centres, parent=parent, ctx=ctx, centre=centre, axis=info.fan_in_axis
    )
    for k, sq in enumerate(found.w_sq):
        if not math.isfinite(sq):  # a finite norm proves every value finite: nothing to read again
            check(k, copies[k], math.sqrt(sq))
    if found.equal and numel:
        return True, [], None, None
    size = itemsize(info.dtype)
    dtype = torch_dtype(options.dtype or info.dtype)
    values = n * itemsize(options.dtype or info.dtype) * (2 if kind.is_complex else 1)
    values += OPS[kind].context_bytes(K, d.fan_in)
    out = [Option("", 0.0, K * n * size, (0.0,) * K)]
    for c in centres:
        d_sq = {"none": found.w_sq, "mean": found.to_mean, "base": found.to_parent}[c]
        errs = predicted_errors(kind, d.fan_in, eta, found.w_sq, d_sq, lookup=lookup)
        extra = n * size if c != "none" and not (c == "base" and options.link_base) else 0
        out.append(Option(c, max(errs), values + extra, tuple(errs)))
    assert found.bound is not None
    return False, out, found.mean, (centre, pack(found.bound, dtype))


def centre_options(
    info: TensorInfo,
    checkpoints: Sequence[Checkpoint],
    options: MergeOptions,
    parent: Checkpoint | None = None,
) -> list[Option]:
    """Each centre `options.base` allows `info` superposed on (none, mean or base), with its
    predicted errors and bytes as merge prices them; empty when the K copies are equal."""
    d = Decision(info.name, Role.SUPERPOSED, "", fan_in(info.shape, info.fan_in_axis), 0.0)
    _, found, _, _ = _measure(
        info, d, lambda: _Copies(checkpoints, info.name), None if parent is None else parent[info.name],
        _centres(options), Kind(options.kind), options, options.policy.prior(info.shape),
        _is_lookup(info, checkpoints[0].ties, options.policy),
    )  # fmt: skip
    return [o for o in found if o.centre]


class _Copies(Sequence[torch.Tensor]):
    """The K inputs' copies of one tensor, each read afresh when indexed: a memory-mapped
    safetensors input opens a new mapping each time, so that `measure_bind`, indexing again
    every 2 MiB, releases the pages it has measured (`measure.REREAD`)."""

    def __init__(self, checkpoints: Sequence[Checkpoint], name: str):
        self.checkpoints, self.name = checkpoints, name

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __getitem__(self, k: int) -> torch.Tensor:  # type: ignore[override]
        return self.checkpoints[k][self.name]


def _uncentre(
    packed: torch.Tensor,
    mean: torch.Tensor,
    info: TensorInfo,
    d: Decision,
    kind: Kind,
    num_contexts: int,
    options: MergeOptions,
) -> torch.Tensor:
    """Σ_k W_k ⊙ c_k from Σ_k (W_k − B) ⊙ c_k: the bound mean, Σ_k B ⊙ c_k, added back.

    No cancellation: the small deltas' sum is added to the large sum of the means. For
    `--base auto`'s tensors that end up without a base, bound centred in the measuring pass.
    """
    ctx = make_contexts(kind, num_contexts, d.fan_in, options.seed, info.name)
    stored = packed.float()
    value = torch.view_as_complex(stored) if kind.is_complex else stored
    value += bind([mean.to(stored.dtype)] * num_contexts, ctx, info.fan_in_axis)
    return pack(value, packed.dtype)


def _mean(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """The weights' mean as a merge stores it (`measure.measure_bind`): Σ W_k·(1/K) in float32
    (float64 for float64 weights), rounded to their dtype.

    Its last bit does not matter: a centred tensor's deltas are taken from the mean as stored,
    so they carry whatever its rounding lost.
    """
    weights = list(weights)
    if not weights:
        raise ValueError("the mean of no weights")
    mean = measure_bind(weights, mean=True).mean
    assert mean is not None
    return mean


def _base_record(decisions: Sequence[Decision], options: MergeOptions, output: Path) -> dict[str, Any] | None:
    centres = {d.centre for d in decisions if d.role is Role.SUPERPOSED} - {"none"}
    if not centres:
        return None
    if centres == {"mean"}:
        return {"source": "mean", "path": None, "sha256": None, "linked": False}
    return {
        "source": "checkpoint",
        "path": record_path(options.base, output),
        "sha256": sha256_checkpoint(options.base),
        "linked": options.link_base,
    }


def store_tensor(
    writer: SuperposedWriter,
    info: TensorInfo,
    d: Decision,
    checkpoints: Sequence[Checkpoint],
    options: MergeOptions,
    *,
    base: torch.Tensor | None = None,
    bound: tuple[str, torch.Tensor] | None = None,
) -> int:
    """Store one tensor of the K checkpoints into `writer` as `d` says: stacked, once (shared),
    or bound (centred on the inputs' mean, or on `base`, as `d.centre` says). `bound`: the
    tensor already bound in its stored form, with its centre. Returns its bytes."""
    centred = d.role is Role.SUPERPOSED and d.centre != "none"
    # The error is informative: 4 significant digits, so that the header does not depend on the
    # last bits of a norm (which vary with the CPU's summation order).
    error = None if d.error is None else float(f"{d.error:.4g}")
    meta = TensorMeta(
        d.role.value, info.dtype, list(info.shape), d.fan_in, d.reason, centred, error, info.fan_in_axis
    )
    if d.role is Role.SHARED:
        return writer.add_shared(info.name, meta, checkpoints[0][info.name])
    if d.role is not Role.SUPERPOSED:
        return writer.add_per_context(info.name, meta, torch.stack([c[info.name] for c in checkpoints]))
    ctx = make_contexts(writer.kind, writer.num_contexts, d.fan_in, options.seed, info.name)
    dtype = torch_dtype(options.dtype or info.dtype)
    if bound is None or bound[0] != (d.centre or "none"):  # not bound in the measuring pass
        parent = base if centred and base is not None else None
        if centred and parent is None and d.centre != "mean":
            raise ValueError(f"{info.name}: centred on a base that was not given")
        centre = "none" if not centred else ("base" if parent is not None else "mean")
        copies = [c[info.name] for c in checkpoints]
        found = measure_bind(copies, ctx=ctx, centre=centre, parent=parent, axis=info.fan_in_axis)
        base = found.mean if centre == "mean" else base
        assert found.bound is not None
        bound = (d.centre, pack(found.bound, dtype))
    if not options.allow_nonfinite:
        _check_sum_fits(info.name, bound[1])
    return writer.add_superposed(info.name, meta, bound[1], ctx, dtype, base=base)


def _check_sum_fits(name: str, stored: torch.Tensor) -> None:
    """A superposed sum of finite inputs can overflow a half-precision dtype (K float16 values
    near 6e4 add up to Inf): refuse it rather than store Inf, which every context would read.

    Raises:
        PolicyError: naming the tensor, the dtype, and what to do.
    """
    bad = int((~torch.isfinite(stored)).sum())
    if bad:
        limit = torch.finfo(stored.dtype).max
        raise PolicyError(
            f"{name}: its superposed sum overflows {str(stored.dtype).removeprefix('torch.')} in {bad} "
            f"values (beyond ±{limit:.4g}); store it as float32 (--dtype float32), centre it (--base), "
            "or keep it per context (--keep)"
        )


def _check_finite(ckpt: Checkpoint, name: str, tensor: torch.Tensor, norm: float | None, allow: bool) -> None:
    """Refuse NaN/Inf in `tensor`. A finite norm proves every value finite (NaN and Inf carry
    into it) at a twentieth of `isfinite`'s cost; only an infinite one, which large finite
    values can also give, is looked at value by value."""
    if allow or not tensor.is_floating_point():
        return
    if norm is None:
        norm = float(torch.linalg.vector_norm(tensor.float()))
    if not math.isfinite(norm) and not bool(torch.isfinite(tensor).all()):
        raise PolicyError(
            f"{ckpt.path}: tensor {name!r} has NaN/Inf values (pass --allow-nonfinite to merge anyway)"
        )


def _hash_inputs(paths: Sequence[Path]) -> list[Future[str]]:
    """The inputs' sha256s, computed in a background thread: hashlib and file reads release the
    GIL, so hashing overlaps the merge instead of adding a full read of every input to it."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pspctl-sha256")
    try:
        return [pool.submit(sha256_checkpoint, p) for p in paths]
    finally:
        pool.shutdown(wait=False)


def _recipe(options: MergeOptions) -> dict[str, Any]:
    axes = {"fan_in_axes": [f"{g}={'rest' if a is None else a}" for g, a in options.fan_in_axes]}
    return (
        (axes if options.fan_in_axes else {})
        | {
            "kind": Kind(options.kind).value,
            "seed": options.seed,
            "max_interference": options.policy.max_interference,
            "min_share": options.policy.min_share,
            "keep": list(options.policy.keep),
            "superpose": list(options.policy.superpose),
            "dtype": options.dtype,
            "max_rotation_fan_in": options.max_rotation_fan_in,
            "allow_nonfinite": options.allow_nonfinite,
            "command": options.command,
        }
        | ({"strip_prefix": options.strip_prefix} if options.strip_prefix else {})
    )
