"""What an export returns (and an AtolError carries): the graphs written and each output's check."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from pspctl.onnx_export.validate import Check

__all__ = ["ExportReport"]


@dataclass
class ExportReport:
    """What was exported and how each graph compares with PyTorch."""

    multi: bool
    kind: str
    num_contexts: int
    labels: list[str]
    opset: int
    atol: float
    rtol: float
    inputs_from: str  # "load_data(k, 'test')" or "example_inputs()"
    files: dict[str, int] = field(default_factory=dict)  # graph path -> bytes, external data included
    checks: list[Check] = field(default_factory=list)
    per_context_bytes: int | None = None  # multi only: K × the size of one per-context graph
    # multi only: how the graph serves each tensor (modules.INPUT_SIDE, ALL_K, GATHER, ...),
    # by tensor name, or by layer name for an all-K Linear (its weight and bias)
    layers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # e.g. half-precision weights run as float32

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        out["total_bytes"] = self.total_bytes
        return out
