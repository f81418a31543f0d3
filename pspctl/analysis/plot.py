"""`--plot`: magnitude histograms per tensor (superposed vs originals, as in the paper's Figure 5)
and per-layer function-space error against the Proposition 2 prediction.

matplotlib is an optional extra, imported through pspctl.plotting.
"""

from __future__ import annotations

import math
from pathlib import Path

from pspctl.analysis.report import Report
from pspctl.checkpoints import atomic_path
from pspctl.plotting import INSTALL_HINT, pyplot, require_matplotlib

__all__ = ["INSTALL_HINT", "plot_report", "require_matplotlib"]


def plot_report(report: Report, path: str | Path, *, force: bool = False) -> Path:
    """Draw the report's histograms and error-vs-prediction panel into one PNG, atomically;
    an existing `path` is replaced only with `force`."""
    plt = pyplot()

    tensors = [
        n for n in report.edges if any(m.name == n and m.source == "superposed" for m in report.magnitudes)
    ]
    tensors = tensors or list(report.edges)
    panels = len(tensors) + (1 if report.layers else 0)
    cols = min(3, max(panels, 1))
    rows = max(1, math.ceil(panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, name in zip(flat, tensors, strict=False):
        edges = report.edges[name]
        centers = [(a + b) / 2 for a, b in zip(edges, edges[1:], strict=False)]
        width = edges[1] - edges[0]
        mags = [m for m in report.magnitudes if m.name == name]
        orig = [m for m in mags if m.source == "original"]
        if orig:
            # The originals' average histogram, normalised like the superposed one.
            total = [sum(m.hist[i] for m in orig) / len(orig) for i in range(len(centers))]
            ax.bar(centers, total, width=width, alpha=0.6, color="tab:blue", label="original (mean)")
        for m in mags:
            if m.source == "superposed":
                ax.bar(centers, m.hist, width=width, alpha=0.6, color="tab:orange", label="superposed")
        ax.set_yscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("|w|")
        ax.legend(fontsize=7)
    if report.layers:
        ax = flat[len(tensors)]
        pts = [(r.predicted, r.measured) for r in report.layers if r.predicted is not None]
        if pts:
            ax.scatter([p for p, _ in pts], [m for _, m in pts], s=14, color="tab:red")
            hi = max(max(p, m) for p, m in pts) * 1.1
            ax.plot([0, hi], [0, hi], color="gray", lw=0.8, ls="--", label="measured = predicted")
            ax.legend(fontsize=7)
        ax.set_xlabel("predicted sqrt(v(K-1)/M)/η")
        ax.set_ylabel("measured ‖Ŵx−Wx‖/‖Wx‖")
        ax.set_title("function-space error per layer and context", fontsize=9)
    for ax in flat[panels:]:
        ax.axis("off")
    fig.suptitle(f"{Path(report.file).name}: K={report.num_contexts}, {report.kind}", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path, force=force) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
