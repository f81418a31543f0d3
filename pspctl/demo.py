"""`demo`: merge the bundled digit models with every context kind and check that each
retrieved model still classifies its own task. The README's quick start runs this."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pspctl.checkpoints import open_checkpoint
from pspctl.errors import InputError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, MergeReport, merge
from pspctl.policy import Policy
from pspctl.task import Task, load_model, load_task, primary_metric

__all__ = ["DemoRow", "evaluate_retrieved", "run_demo"]


@dataclass(frozen=True)
class DemoRow:
    kind: str
    context: int
    label: str
    original: float  # the task's first metric, e.g. accuracy in percent
    retrieved: float
    storage_ratio: float


def evaluate_retrieved(
    path: str | Path, task: Task, originals: Sequence[str | Path]
) -> list[tuple[float, float]]:
    """(original metric, retrieved metric) per context; the first metric the task reports."""
    sf = SuperposedFile(path)
    out = []
    for k, original_path in enumerate(originals):
        ckpt = open_checkpoint(original_path)
        original = task.metric(load_model(task, {n: ckpt[n] for n in ckpt.names}, str(original_path)), k)
        retrieved = task.metric(load_model(task, sf.state_dict(k), f"context {k} of {sf.path}"), k)
        metric, value = primary_metric(original)
        out.append((value, retrieved[metric]))
    return out


# Four independently trained models: nothing to centre on, so plain superposition; and
# classifiers, whose argmax tolerates a larger output error than the default budget allows
# (docs/policy.md): the hidden layer's predicted 0.72 costs about half a point here. The
# budget was set for the η prior: with η measured on calib (merge --task's default) the head
# passes it too and costs 2–10 points with complex/onepower contexts (its error lands on
# the logits), so the demo predicts with the prior (calib samples 0).
DEMO_BASE, DEMO_POLICY, DEMO_CALIB_SAMPLES = "none", Policy(max_error=0.8), 0


def run_demo(
    samples: str | Path,
    workdir: str | Path,
    *,
    kinds: Sequence[str] = ("binary", "complex", "rotation", "onepower"),
    seed: int = 0,
    on_merge: Callable[[MergeReport], None] | None = None,
) -> list[DemoRow]:
    """Merge `samples/models/*.pt` once per kind into `workdir` and evaluate every context.

    Raises:
        InputError: `samples` lacks `digits_task.py` or `models/*.pt`.
    """
    samples = Path(samples)
    task_file = samples / "digits_task.py"
    models = sorted((samples / "models").glob("*.pt"))
    if not task_file.is_file() or len(models) < 2:
        raise InputError(
            f"{samples}: no bundled samples here (run from the repository root, or pass --samples)"
        )
    task = load_task(task_file)
    rows = []
    for kind in kinds:
        out = Path(workdir) / f"{kind}.safetensors"
        report = merge(
            models,
            out,
            MergeOptions(
                kind=kind,
                seed=seed,
                task=str(task_file),
                force=True,
                base=DEMO_BASE,
                policy=DEMO_POLICY,
                calib_samples=DEMO_CALIB_SAMPLES,
            ),
        )
        if on_merge:
            on_merge(report)
        for k, (orig, retr) in enumerate(evaluate_retrieved(out, task, models)):
            rows.append(DemoRow(kind, k, report.labels[k], orig, retr, report.storage_ratio))
    return rows
