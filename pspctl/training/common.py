"""What `train` and `tune` share: batches, the loss, evaluation, the NaN guard, the metrics file."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pspctl.checkpoints import atomic_path
from pspctl.errors import InputError, ValidationError
from pspctl.nn import PSPModel
from pspctl.task import Task
from pspctl.types import Progress

__all__ = [
    "Diverged",
    "Progress",
    "batch_stream",
    "check_steps",
    "evaluate_all",
    "guard",
    "mean_primary",
    "primary",
    "task_loss",
    "write_json",
]


class Diverged(ValidationError):
    """The loss became NaN/Inf: training stopped and no broken file was written."""


def check_steps(steps: int, flag: str = "--steps") -> None:
    """Raise InputError unless `steps` ≥ 1."""
    if steps < 1:
        raise InputError(f"{flag} must be at least 1, got {steps}")


def batch_stream(task: Task, context: int, split: str, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Context `context`'s batches forever, in a fresh seeded order every pass."""
    batches = task.batches(context, split)
    gen = torch.Generator().manual_seed(seed * 1_000_003 + context)
    while True:
        for i in torch.randperm(len(batches), generator=gen).tolist():
            yield batches[i]


def task_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy for integer class targets, mean squared error otherwise."""
    if not targets.is_floating_point():
        return F.cross_entropy(outputs, targets)
    return F.mse_loss(outputs, targets.to(outputs.dtype))


def guard(loss: Tensor, step: int, context: int, kept: str) -> None:
    """Raise Diverged when the loss is NaN/Inf; `kept` says what is left on disk."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise Diverged(f"training diverged: loss is {value} at step {step} (context {context}); {kept}")


def evaluate_all(task: Task, model: nn.Module, num_contexts: int) -> list[dict[str, float]]:
    """Each context's metrics: a PSP model switches context, a plain model runs as it is."""
    out = []
    for k in range(num_contexts):
        if isinstance(model, PSPModel):
            with model.context(k):
                out.append(task.metric(model, k))
        else:
            out.append(task.metric(model, k))
    return out


def primary(metrics: Mapping[str, float]) -> tuple[str, float]:
    """The metric tables and plots use: the first one the task reports."""
    name = next(iter(metrics))
    return name, float(metrics[name])


def mean_primary(rows: Sequence[Mapping[str, float]]) -> float:
    return sum(primary(r)[1] for r in rows) / max(len(rows), 1)


def write_json(data: Mapping[str, Any], path: str | Path, *, force: bool = True) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    with atomic_path(Path(path), force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
