"""The paper's Figures 4 and 6: the first task's metric over training steps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pspctl.checkpoints import atomic_path
from pspctl.plotting import pyplot

__all__ = ["plot_first_task"]


def plot_first_task(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    *,
    metric: str,
    block: int | None = None,
    force: bool = True,
) -> None:
    """Plot context 0's `metric` against the step for each run (label → evaluations).

    Args:
        block: steps per context; draws a faint line at every task switch.

    Raises:
        PspctlError: matplotlib is missing (exit 1, as analyze --plot).
        OutputError: the path is unusable.
    """
    plt = pyplot()
    path = Path(path)
    fig, ax = plt.subplots(figsize=(7, 4))
    last = 0
    for label, evaluations in runs.items():
        steps = [e["step"] for e in evaluations]
        ax.plot(steps, [e["metrics"][0][metric] for e in evaluations], label=label, marker=".")
        last = max(last, *steps)
    if block:
        for s in range(block, last, block):
            ax.axvline(s, color="0.85", linewidth=0.8, zorder=0)
    ax.set_xlabel("training step")
    ax.set_ylabel(f"task 1 {metric}")
    ax.set_title("First task over online training")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
