"""The analysis report: plain dataclasses and their JSON form (schema in docs/analyze.md).

Every number is a float or None; None means "not measured" (no originals, no task, no data),
and the report's `notes` say why in one line each.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = [
    "SCHEMA",
    "ContextSummary",
    "LayerError",
    "MagnitudeStats",
    "PruneResult",
    "Report",
    "TensorAdvice",
    "TensorWeightError",
]

SCHEMA = "pspctl.analyze/1"


@dataclass
class TensorWeightError:
    """Weight-space retrieval error of one tensor, per context."""

    name: str
    role: str  # "superposed" or "per_context"
    shape: list[int]
    fan_in: int
    error: list[float]  # ‖Ŵ_k − W_k‖_F / ‖W_k‖_F
    expected: list[float]  # sqrt(v·Σ_{s≠k}‖D_s‖²)/‖W_k‖, D_s what is superposed (0 per context)
    # For a tensor centred on a base (format v2): the same without the base (D_s = W_s), the
    # noise the base took away.
    expected_without_base: list[float] | None = None


@dataclass
class MagnitudeStats:
    """Magnitudes of one tensor's stored values: the superposed tensor or one original."""

    name: str
    source: str  # "superposed" or "original"
    context: int | None  # the original's context; None for the superposed tensor
    numel: int
    rms: float
    max_abs: float
    sparsity: float  # fraction of exact zeros
    below: dict[str, float]  # threshold (× the originals' mean RMS) -> fraction of |w| below it
    hist: list[int]  # counts of |w| over the tensor's shared `edges`


@dataclass
class LayerError:
    """Function-space retrieval error of one superposed layer on one context's inputs."""

    name: str
    context: int
    fan_in: int
    method: str  # "linear", "conv", "generic" (module called with the weight swapped) or "matrix"
    inputs: str  # "calib" (the task's data) or "probe" (random inputs)
    measured: float  # ‖Ŵ_k x − W_k x‖ / ‖W_k x‖ over the batch
    eta_mean: float | None  # mean over rows and samples of |⟨w_i,x⟩| / (‖w_i‖‖x‖)
    eta_rms: float | None  # the energy-weighted η that matches the batch ratio, see docs
    predicted: float | None  # sqrt(v(K−1)/M)/η_rms (Proposition 2, equal row norms assumed)
    predicted_row_norms: float | None  # the same, with the other models' actual row norms


@dataclass
class ContextSummary:
    """One row of the summary table."""

    context: int
    label: str
    metric_name: str | None
    original_metric: float | None
    retrieved_metric: float | None
    same_budget_metric: float | None
    output_error: float | None  # end to end, ‖f̂(x) − f(x)‖ / ‖f(x)‖ on the same inputs
    same_budget_output_error: float | None
    winner: str | None  # "psp", "pruning" or "tie" at equal stored values
    # Fraction of original k's values the same-budget baseline keeps: it varies a little per
    # context, since ties and exact zeros at the magnitude threshold differ between models.
    same_budget_density: float | None = None


@dataclass
class PruneResult:
    """Global magnitude pruning of the superposed values at one target sparsity."""

    sparsity: float  # target
    achieved: float  # fraction of superposed values that are zero after pruning
    weight_error: list[float | None]  # per context, sqrt(Σ‖Ŵ_k − W_k‖²/Σ‖W_k‖²) over superposed tensors
    output_error: list[float | None]  # per context, end to end
    metric: list[float | None]  # per context


@dataclass
class TensorAdvice:
    """What superposing one tensor saves and what it costs."""

    name: str
    role: str
    bytes_saved: int  # K per-context copies minus (superposed tensor + contexts)
    mean_error: float | None  # mean over contexts of the layer's measured function-space error
    max_error: float | None


@dataclass
class Report:
    """Everything `analyze` measured. `to_dict()` is the `--json` output."""

    file: str
    kind: str
    num_contexts: int
    labels: list[str]
    file_bytes: int
    input_bytes: int  # tensor bytes of the K models stored separately
    stored_bytes: int  # tensor bytes in the file (superposed, per-context and contexts): the budget
    model_values: int  # values of one model
    originals: list[str] | None
    task: str | None
    inputs: str | None  # "calib", "probe" or None (no function-space measurement)
    notes: list[str] = field(default_factory=list)
    contexts: list[ContextSummary] = field(default_factory=list)
    weights: list[TensorWeightError] = field(default_factory=list)
    layers: list[LayerError] = field(default_factory=list)
    magnitudes: list[MagnitudeStats] = field(default_factory=list)
    edges: dict[str, list[float]] = field(default_factory=dict)  # per tensor: histogram bin edges
    thresholds: list[float] = field(default_factory=list)
    pruning: list[PruneResult] = field(default_factory=list)
    advice: list[TensorAdvice] = field(default_factory=list)
    recommendation: dict[str, Any] | None = None  # measured policy for --max-drop, if asked

    @property
    def storage_ratio(self) -> float:
        return self.input_bytes / max(self.file_bytes, 1)

    def worst_layers(self) -> list[LayerError]:
        return sorted(self.layers, key=lambda r: -r.measured)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form; NaN and infinities become null."""
        data = asdict(self)
        data = {"schema": SCHEMA, "storage_ratio": self.storage_ratio, **data}
        return _clean(data)


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
