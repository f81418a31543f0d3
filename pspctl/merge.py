"""`merge`: K checkpoints in, one superposed file out, one tensor name at a time."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pspctl.checkpoints import INDEX_SUFFIX, Checkpoint, checkpoint_files, open_checkpoint, sha256_checkpoint
from pspctl.contexts import Kind, make_contexts
from pspctl.errors import MismatchError, PolicyError, listed
from pspctl.fileformat import Header, SuperposedWriter, TensorMeta, check_output
from pspctl.header import check_labels, safe_label
from pspctl.outputs import refuse_inputs
from pspctl.policy import Decision, Policy, Role, TensorInfo, decide
from pspctl.superpose import bind
from pspctl.types import Progress

__all__ = ["MergeOptions", "MergeReport", "check_compatible", "merge", "plan", "store_tensor"]


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
            "notes": self.notes,
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
        for d in decisions:
            if d.role is Role.SUPERPOSED and d.fan_in > options.max_rotation_fan_in:
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

    Reads one tensor name at a time across the inputs; nothing is written unless the whole
    merge succeeds (the output appears by an atomic rename).

    Raises:
        PspctlError subclasses for every bad input; see pspctl.errors.
    """
    output = Path(output)
    kind = Kind(options.kind)
    paths, files = _resolve_inputs(inputs, output)
    check_output(output, force=options.force)
    labels = _labels(paths, options.labels)
    checkpoints = [open_checkpoint(p, trust_pickle=options.trust_pickle) for p in paths]
    check_compatible(checkpoints)
    K = len(checkpoints)
    infos = list(checkpoints[0].infos.values())
    decisions = plan(infos, K, options)

    writer = SuperposedWriter(kind, K)
    stored: dict[str, int] = {}
    for i, (info, d) in enumerate(zip(infos, decisions, strict=True)):
        if progress:
            progress(i, len(infos), info.name)
        stored[info.name] = store_tensor(writer, info, d, checkpoints, options)

    notes = [f"{c.path.name}: {n}" for c in checkpoints for n in c.notes]
    header = Header(
        kind=kind.value,
        seed=options.seed,
        num_contexts=K,
        labels=labels,
        tensors={},
        inputs=[
            {"path": str(p), "sha256": sha256_checkpoint(p), "label": lab}
            for p, lab in zip(paths, labels, strict=True)
        ],
        recipe=_recipe(options),
        task=options.task,
    )
    writer.write(output, header, force=options.force, inputs=files)
    return MergeReport(
        output=str(output),
        kind=kind.value,
        num_contexts=K,
        labels=labels,
        decisions=decisions,
        stored_bytes=stored,
        input_bytes=sum(c.nbytes() for c in checkpoints),
        output_bytes=output.stat().st_size,
        notes=notes,
    )


def store_tensor(
    writer: SuperposedWriter,
    info: TensorInfo,
    d: Decision,
    checkpoints: Sequence[Checkpoint],
    options: MergeOptions,
) -> int:
    """Bind (or stack) one tensor of the K checkpoints into `writer` as `d` says; returns its bytes."""
    meta = TensorMeta(d.role.value, info.dtype, list(info.shape), d.fan_in, d.reason)
    weights = (_finite(c, info.name, options.allow_nonfinite) for c in checkpoints)
    if d.role is not Role.SUPERPOSED:
        return writer.add_per_context(info.name, meta, torch.stack(list(weights)))
    ctx = make_contexts(writer.kind, writer.num_contexts, d.fan_in, options.seed, info.name)
    dtype = getattr(torch, options.dtype or info.dtype)
    return writer.add_superposed(info.name, meta, bind(weights, ctx), ctx, dtype)


def _finite(ckpt: Checkpoint, name: str, allow: bool) -> torch.Tensor:
    tensor = ckpt[name]
    if not allow and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise PolicyError(
            f"{ckpt.path}: tensor {name!r} has NaN/Inf values (pass --allow-nonfinite to merge anyway)"
        )
    return tensor


def _recipe(options: MergeOptions) -> dict[str, Any]:
    return {
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
