"""The vocabulary every layer shares, torch-free so that the CLI can declare its options
(typer reads these enums for choices and `--help`) and their defaults without importing torch.

The library takes these enums or their string values alike; the defaults here are the ones the
library's own signatures use, so `--help` and the library cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

__all__ = [
    "CALIB_SAMPLES",
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "DEFAULT_RTOL",
    "CONV_ETA_PRIOR",
    "ETA_PRIOR",
    "MAX_ERROR",
    "DType",
    "Kind",
    "Objective",
    "Optimizer",
    "PolicySource",
    "Progress",
    "Role",
    "StateDictFormat",
]

# Policy defaults, here so that `--help` need not import torch (docs/policy.md measures them).
MAX_ERROR = 0.2  # merge: predicted relative output error, all superposed tensors together
ETA_PRIOR = 0.15  # merge: alignment η of layer inputs with a weight matrix, where nothing measured it
# merge: the same for a convolution kernel (≥3 dims); ResNet-18's 3×3 convolutions measured 0.026–0.053
CONV_ETA_PRIOR = 0.025
CALIB_SAMPLES = 64  # merge --task: calib inputs per model to measure η on (a ratio of sums: settles fast)
TRAIN_MAX_INTERFERENCE, TRAIN_MIN_SHARE = 0.02, 0.05  # train: the shape rules (no weights to measure)
# ONNX export (pspctl.onnx_export; export --opset, --atol, --rtol). Opset 20: onnxruntime ≥ 1.17
# runs it; the dynamo exporter's own default in torch 2.13.
DEFAULT_OPSET, DEFAULT_ATOL, DEFAULT_RTOL = 20, 1e-4, 1e-3

Progress = Callable[[int, int, str], None]
"""A progress callback: (done, total, current item)."""


class Kind(str, Enum):
    """The paper's context kinds (Sections 4.2, 5.2)."""

    BINARY = "binary"
    COMPLEX = "complex"
    ROTATION = "rotation"
    ONEPOWER = "onepower"

    @property
    def is_complex(self) -> bool:
        """Whether the superposed tensor is complex (retrieval takes the real part)."""
        return self in (Kind.COMPLEX, Kind.ONEPOWER)

    @property
    def variance_factor(self) -> float:
        """E[residual²] per unit of another model's weight: 1 for ±1 and rotations,
        1/2 for unit phases, because Re(e^{iθ}) = cos θ has E[cos² θ] = 1/2."""
        return 0.5 if self.is_complex else 1.0


class Role(str, Enum):
    """How a tensor is stored: bound into the superposed sum, once per context, or once for all
    contexts (equal in every input)."""

    SUPERPOSED = "superposed"
    PER_CONTEXT = "per_context"
    SHARED = "shared"


class DType(str, Enum):
    """The dtypes a superposed tensor may be stored in (`merge --dtype`)."""

    FLOAT32 = "float32"
    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"


class StateDictFormat(str, Enum):
    """The file type of a plain state_dict that extract writes (`extract --format`)."""

    SAFETENSORS = "safetensors"
    PT = "pt"
    HF = "hf"  # a Hugging Face model folder (weights, config, tokenizer, model card)


class PolicySource(str, Enum):
    """How merge decides what to superpose (`merge --policy`): from shapes, or by measuring."""

    RULES = "rules"
    MEASURED = "measured"


class Objective(str, Enum):
    """What `tune` trains against: the originals' outputs, the task's labels, or distill when it can."""

    AUTO = "auto"
    DISTILL = "distill"
    TASK = "task"


class Optimizer(str, Enum):
    """`train --optimizer`: Adam, or SGD with momentum 0.9."""

    ADAM = "adam"
    SGD = "sgd"
