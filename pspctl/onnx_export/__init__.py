"""ONNX export of superposed models: per-context graphs and one multi-context graph.

See docs/export.md. Layers: modules (torch modules binding the context at run time) →
convert (torch → checked ONNX) → validate (onnxruntime vs PyTorch) → report → errors → api
(the two exports). The defaults live in pspctl.types, torch-free, for the CLI's `--help`.
"""

from pspctl.onnx_export.api import export_contexts, export_multi
from pspctl.onnx_export.errors import AtolError, TraceError
from pspctl.onnx_export.report import ExportReport
from pspctl.onnx_export.validate import Check
from pspctl.task import Task
from pspctl.types import DEFAULT_ATOL, DEFAULT_OPSET, DEFAULT_RTOL

TaskLike = Task  # the name before 0.2: export takes a pspctl.task.Task like every command

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "AtolError",
    "Check",
    "ExportReport",
    "TaskLike",
    "TraceError",
    "export_contexts",
    "export_multi",
]
