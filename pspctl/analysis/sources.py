"""Finding what an analysis needs: the originals, the task, and models built from state_dicts.

The file's header records the input paths with their sha256 and the task spec, so a bare
`analyze` in the merge directory finds everything. Explicit arguments override the header;
explicit originals that disagree with the recorded hashes or shapes are an error, recorded
ones that moved or changed are only a note (the weight-space part is then skipped).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pspctl.checkpoints import Checkpoint, open_checkpoint, sha256_checkpoint
from pspctl.errors import MismatchError, listed
from pspctl.fileformat import SuperposedFile
from pspctl.task import load_model

__all__ = ["as_tensor", "find_originals", "find_task", "load_model", "run_model"]


def _candidates(recorded: str, base: Path) -> list[Path]:
    """Where a recorded input may be now: as recorded, next to the superposed file, or its basename there."""
    p = Path(recorded)
    out = [p]
    if not p.is_absolute():
        out.append(base / p)
    out.append(base / p.name)
    return out


def _check_shapes(sf: SuperposedFile, ckpt: Checkpoint, k: int) -> None:
    problems = []
    for name, meta in sf.header.tensors.items():
        info = ckpt.infos.get(name)
        if info is None:
            problems.append(f"{name} missing")
        elif list(info.shape) != list(meta.shape):
            problems.append(f"{name} has shape {list(info.shape)}, file has {meta.shape}")
    if problems:
        raise MismatchError(
            f"{ckpt.path} (context {k}) does not match the file's tensors: {listed(problems, '; ')}"
        )


def find_originals(
    sf: SuperposedFile, explicit: Sequence[str | Path] | None = None, *, trust_pickle: bool = False
) -> tuple[list[Checkpoint] | None, str | None]:
    """Open the K original checkpoints, in context order.

    Returns:
        (checkpoints, None), or (None, note) when the recorded originals are gone or changed.

    Raises:
        MismatchError: explicit originals of the wrong count, hash or shapes (says which).
        InputError: an explicit original is missing or unreadable.
    """
    recorded = sf.header.inputs
    if explicit is not None:
        if len(explicit) != sf.num_contexts:
            raise MismatchError(f"{len(explicit)} originals given for a file of {sf.num_contexts} contexts")
        ckpts = [open_checkpoint(p, trust_pickle=trust_pickle) for p in explicit]
        for k, ckpt in enumerate(ckpts):
            want = recorded[k].get("sha256") if k < len(recorded) else None
            if want and sha256_checkpoint(ckpt.path) != want:
                raise MismatchError(
                    f"{ckpt.path} does not match the sha256 recorded for context {k} "
                    f"({sf.labels[k]}, merged from {recorded[k].get('path')})"
                )
            _check_shapes(sf, ckpt, k)
        return ckpts, None
    if len(recorded) != sf.num_contexts:
        return None, "originals not recorded in the file: weight-space error skipped (pass --originals)"
    paths: list[Path] = []
    missing, changed = [], []
    for entry in recorded:
        found = next((p for p in _candidates(entry["path"], sf.path.parent) if p.exists()), None)
        if found is None:
            missing.append(entry["path"])
        elif entry.get("sha256") and sha256_checkpoint(found) != entry["sha256"]:
            changed.append(str(found))
        else:
            paths.append(found)
    if missing:
        return None, f"originals not found ({', '.join(missing)}): weight-space error skipped"
    if changed:
        return (
            None,
            f"originals changed since the merge (sha256 differs: {', '.join(changed)}): weight-space error skipped",
        )
    ckpts = [open_checkpoint(p, trust_pickle=trust_pickle) for p in paths]
    for k, ckpt in enumerate(ckpts):
        _check_shapes(sf, ckpt, k)
    return ckpts, None


def find_task(sf: SuperposedFile, spec: Any = None) -> tuple[Any | None, str | None]:
    """Load the task: `spec` (a path, a module name or a loaded Task) or the one the header records.

    Returns:
        (task, None), or (None, note) when no task is known.

    Raises:
        TaskError: the task cannot be imported or has no build_model.
    """
    from pspctl.task import load_task

    if spec is None:
        spec = sf.header.task
        if spec is None:
            return (
                None,
                "no task (merge --task or --task): function-space error on random probes of the weights only",
            )
        rel = sf.path.parent / spec
        if spec.endswith(".py") and not Path(spec).exists():
            if not rel.exists():
                return (
                    None,
                    f"task {spec} (recorded by merge) not found: pass --task; function-space error on random probes of the weights only",
                )
            spec = str(rel)
    task = spec if hasattr(spec, "build_model") else load_task(spec)
    task.require("build_model")
    return task, None


def as_tensor(output: Any) -> Tensor:
    """The tensor to compare of a model's output: itself, `.logits`, or the first tensor inside."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits") and isinstance(output.logits, Tensor):
        return output.logits
    items = output.values() if isinstance(output, Mapping) else output
    if isinstance(items, Sequence | type({}.values())):
        for item in items:
            if isinstance(item, Tensor):
                return item
    raise TypeError(f"cannot compare a model output of type {type(output).__name__}")


@torch.no_grad()
def run_model(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    return as_tensor(model(*inputs)).float()
