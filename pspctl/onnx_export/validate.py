"""Run an exported graph in onnxruntime and compare it with PyTorch, output by output."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree

__all__ = ["Check", "compare", "session", "torch_outputs"]


@dataclass(frozen=True)
class Check:
    """One output of one context: ONNX vs PyTorch."""

    context: int
    label: str
    output: str
    max_abs: float
    max_rel: float
    passed: bool  # every element within atol + rtol·|reference|, as numpy.allclose


def session(path: Path):  # -> onnxruntime.InferenceSession
    """A CPU onnxruntime session on `path` (external data is found beside it)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings are about its own graph rewrites
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def torch_outputs(model: nn.Module, inputs: Sequence[Tensor]) -> list[np.ndarray]:
    """The reference: `model` in eval mode, outputs flattened like the exporter does."""
    model.eval()
    with torch.no_grad():
        out = model(*inputs)
    return [t.detach().cpu().numpy() for t in pytree.tree_leaves(out)]


def compare(
    got: Sequence[np.ndarray],
    want: Sequence[np.ndarray],
    names: Sequence[str],
    *,
    context: int,
    label: str,
    atol: float,
    rtol: float,
) -> list[Check]:
    """One Check per output; a shape or count mismatch fails with infinite differences."""
    checks = []
    for i, name in enumerate(names):
        if i >= len(got) or i >= len(want) or got[i].shape != want[i].shape:
            checks.append(Check(context, label, name, float("inf"), float("inf"), False))
            continue
        a, b = got[i].astype(np.float64), want[i].astype(np.float64)
        diff = np.abs(a - b)
        diff[np.isnan(a) & np.isnan(b)] = 0.0  # NaN where the reference has NaN is agreement
        if not np.isfinite(diff).all():
            checks.append(Check(context, label, name, float("nan"), float("nan"), False))
            continue
        scale = np.nan_to_num(np.abs(b), nan=0.0, posinf=np.inf)
        max_abs = float(diff.max(initial=0.0))
        max_rel = float((diff / np.maximum(scale, np.finfo(np.float32).tiny)).max(initial=0.0))
        passed = bool((diff <= atol + rtol * scale).all())
        checks.append(Check(context, label, name, max_abs, max_rel, passed))
    return checks
