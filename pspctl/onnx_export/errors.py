"""Export's own errors: small subclasses so callers can tell them apart, with pspctl's exit codes."""

from __future__ import annotations

from pspctl.errors import TaskError, ValidationError
from pspctl.onnx_export.report import ExportReport

__all__ = ["AtolError", "TraceError"]


class TraceError(TaskError):
    """The exporter could not trace the task's model; the message carries the exporter's reason."""


class AtolError(ValidationError):
    """An exported graph differs from PyTorch by more than atol + rtol·|reference|.

    `report` holds the full comparison, for printing the table; no graph was kept.
    """

    def __init__(self, message: str, report: ExportReport):
        super().__init__(message)
        self.report = report
