"""ONNX export of superposed models: per-context graphs and one multi-context graph.

See docs/export.md. Layers: modules (torch modules binding the context at run time) →
convert (torch → checked ONNX) → validate (onnxruntime vs PyTorch) → api (the two exports).
"""

from pspctl.onnx_export.api import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    ExportReport,
    TaskLike,
    export_contexts,
    export_multi,
)
from pspctl.onnx_export.convert import DEFAULT_OPSET
from pspctl.onnx_export.errors import AtolError, TraceError
from pspctl.onnx_export.validate import Check

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
