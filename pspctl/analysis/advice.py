"""Policy advice: what superposing each tensor saves next to the error it adds, and the
measured policy's recommendation for a budget (see pspctl.planning)."""

from __future__ import annotations

import math
from typing import Any

from pspctl.analysis.report import Report, TensorAdvice
from pspctl.checkpoints import Checkpoint
from pspctl.dtypes import torch_dtype
from pspctl.fileformat import SuperposedFile
from pspctl.kinds import OPS
from pspctl.policy import Role
from pspctl.task import Task

__all__ = ["advice", "recommend"]


def advice(sf: SuperposedFile, report: Report, stored_bytes: dict[str, int]) -> list[TensorAdvice]:
    """Per non-empty ≥2-d floating tensor: bytes saved by superposing it, and its measured layer error."""
    K = sf.num_contexts
    out = []
    for name, meta in sf.header.tensors.items():
        dtype = torch_dtype(meta.dtype)
        n = math.prod(meta.shape)
        if not dtype.is_floating_point or len(meta.shape) < 2 or n == 0:
            continue
        separate = K * n * dtype.itemsize
        if meta.role == Role.SUPERPOSED:
            cost = stored_bytes[name]
        else:
            # What merge would store: the superposed values in the recorded --dtype, and the contexts.
            stored = torch_dtype(sf.header.recipe.get("dtype") or meta.dtype)
            ops = OPS[sf.kind]
            cost = n * stored.itemsize * (2 if ops.is_complex else 1) + ops.context_bytes(K, meta.fan_in)
        errs = [r.measured for r in report.layers if r.name == name and not math.isnan(r.measured)]
        out.append(TensorAdvice(name, meta.role, separate - cost, sum(errs) / len(errs) if errs else None,
                                max(errs) if errs else None))  # fmt: skip
    return sorted(out, key=lambda a: -a.bytes_saved)


def recommend(
    sf: SuperposedFile,
    task: Task | None,
    origs: list[Checkpoint] | None,
    max_drop: float,
    max_output_error: float | None,
    max_samples: int,
    notes: list[str],
) -> dict[str, Any] | None:
    """The measured policy for `max_drop` on the originals, or None (with a note) without them.

    Each tensor is measured on the centre a re-merge would use: the linked parent for a file
    merged with `--link-base` (as `merge --base PARENT --link-base --policy measured`), else the
    one merge's default `--base auto` gives it (a stored parent holds only its centred tensors,
    too few to merge on again).
    """
    if task is None or origs is None or task.load_data is None:
        notes.append("--max-drop needs the originals and a task with load_data: no recommendation")
        return None
    from pspctl.planning import measured_policy

    parent = sf.linked_base() if sf.linked else None
    result = measured_policy(
        origs, task, kind=sf.kind, seed=sf.header.seed, max_drop=max_drop, max_output_error=max_output_error,
        max_samples=max_samples, dtype=sf.header.recipe.get("dtype"),
        centre="auto" if parent is None else "base", parent=parent, link_base=parent is not None,
    )  # fmt: skip
    # The merge flags that store what was measured: the parent linked again, or the default.
    flags = f"--policy measured --max-drop {max_drop:g}"
    if max_output_error is not None:
        flags += f" --max-output-error {max_output_error:g}"
    if parent is not None:
        flags += f" --base {parent.path} --link-base"
    return {**result.to_dict(), "merge_flags": flags}
