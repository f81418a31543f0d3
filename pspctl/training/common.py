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
from pspctl.task import Task, primary_metric
from pspctl.training.distributed import World
from pspctl.types import Progress

__all__ = [
    "Diverged",
    "Progress",
    "batch_stream",
    "check_steps",
    "evaluate_all",
    "global_mean",
    "guard",
    "mean_primary",
    "mse",
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


def task_loss(outputs: Tensor, targets: Tensor, world: World = World(), rows: int = 0) -> Tensor:
    """Cross-entropy for integer class targets, mean squared error otherwise.

    Over several ranks, `outputs` and `targets` are this rank's share of a global batch of
    `rows` rows: see `global_mean`.
    """
    if not targets.is_floating_point():
        if not world.grouped:
            return F.cross_entropy(outputs, targets)
        return global_mean(F.cross_entropy(outputs, targets, reduction="sum"), rows, world)
    return mse(outputs, targets.to(outputs.dtype), world, rows)


def mse(outputs: Tensor, reference: Tensor, world: World = World(), rows: int = 0) -> Tensor:
    """Mean squared error, over the global batch of `rows` rows when there are several ranks."""
    if not world.grouped:
        return F.mse_loss(outputs, reference)
    per_row = reference.numel() // max(reference.shape[0], 1)
    return global_mean(F.mse_loss(outputs, reference, reduction="sum"), rows * per_row, world)


def global_mean(local_sum: Tensor, count: int, world: World) -> Tensor:
    """This rank's part of the mean over `count` items of the global batch, times the world size.

    DDP averages the ranks' gradients, so the ranks' mean of these is the gradient of the
    global mean: 2 ranks with B/2 rows each step exactly as 1 process with B rows, also when
    the rows do not split evenly.
    """
    return local_sum * (world.size / count)


def guard(loss: Tensor | float, step: int, context: int, kept: str) -> None:
    """Raise Diverged when the loss is NaN/Inf; `kept` says what is left on disk.

    Over several ranks pass `World.global_loss(loss)`, the same on every rank, so that all of
    them stop together.
    """
    value = float(loss.detach()) if isinstance(loss, Tensor) else loss
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


def mean_primary(rows: Sequence[Mapping[str, float]]) -> float:
    """The mean over contexts of the primary metric (pspctl.task.primary_metric)."""
    return sum(primary_metric(r)[1] for r in rows) / max(len(rows), 1)


def write_json(data: Mapping[str, Any], path: str | Path, *, force: bool = True) -> None:
    """Write JSON atomically (a reader never sees half a file)."""
    with atomic_path(Path(path), force=force) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
