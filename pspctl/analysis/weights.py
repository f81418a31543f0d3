"""Weight-space retrieval error and magnitude statistics, one tensor at a time.

For a superposed tensor, Ŵ_k = W_k + residual, and the residual's expected squared norm is
v·Σ_{s≠k}‖W_s‖² (v = `Kind.variance_factor`: 1 for binary and rotation, 1/2 for complex
and onepower, since Re of a uniform phase has E[cos²] = 1/2). So the weight-space error is
about sqrt(v(K−1)) when the models have similar norms: large by design, and not what decides
quality (see the function-space error).

Only one tensor is in memory at a time: the superposed tensor, and the K originals read one
after another (twice: once for norms and errors, once for histograms on shared bins).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from pspctl.analysis.report import MagnitudeStats, TensorWeightError
from pspctl.checkpoints import Checkpoint
from pspctl.dtypes import torch_dtype
from pspctl.fileformat import SuperposedFile
from pspctl.policy import Role
from pspctl.superpose import as_matrix

__all__ = ["NBINS", "THRESHOLDS", "TensorPass", "stored_values", "tensor_pass"]

NBINS = 40
THRESHOLDS = (0.01, 0.1, 0.5)  # × the originals' mean RMS: the same absolute cut for every source


@dataclass
class TensorPass:
    """What one pass over a tensor yields."""

    error: TensorWeightError | None  # None without originals
    magnitudes: list[MagnitudeStats]
    edges: list[float]
    row_sq: Tensor | None  # [K, N]: ‖d_{k,i}‖² per context and row of what is superposed (W_k or W_k − B)
    stored_bytes: int  # bytes this tensor takes in the file (with its contexts)
    norms_sq: list[float] | None = None  # ‖W_k‖² per context (with originals)
    superposed_sq: list[float] | None = None  # ‖D_k‖² per context: ‖W_k‖², or ‖W_k − B‖² on a base


def stored_values(tensor: Tensor) -> Tensor:
    """The real numbers a superposed tensor stores: complex as its real and imaginary parts."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor


def _stats(name: str, source: str, k: int | None, t: Tensor, edges: Tensor, scale: float) -> MagnitudeStats:
    mag = t.detach().abs().flatten().float()
    hist = torch.histc(mag, bins=NBINS, min=0.0, max=float(edges[-1])) if mag.numel() else torch.zeros(NBINS)
    n = max(mag.numel(), 1)
    return MagnitudeStats(
        name=name,
        source=source,
        context=k,
        numel=mag.numel(),
        rms=float(mag.square().mean().sqrt()) if mag.numel() else 0.0,
        max_abs=float(mag.max()) if mag.numel() else 0.0,
        sparsity=float((mag == 0).sum()) / n,
        below={f"{t_:g}": float((mag < t_ * scale).sum()) / n for t_ in THRESHOLDS},
        hist=[int(c) for c in hist.tolist()],
    )


def _rms(t: Tensor) -> float:
    return float(t.float().square().mean().sqrt()) if t.numel() else 0.0


def tensor_pass(sf: SuperposedFile, name: str, originals: Sequence[Checkpoint] | None) -> TensorPass:
    """Weight-space error (with originals) and magnitude statistics of one tensor.

    Per-context tensors are compared too: their error is a real computation, and exactly 0.
    """
    meta = sf.header.tensors[name]
    K, kind = sf.num_contexts, sf.kind
    dtype = torch_dtype(meta.dtype)
    superposed = meta.role == Role.SUPERPOSED
    floating = dtype.is_floating_point
    if superposed:
        values = stored_values(sf.superposed(name))
    else:
        stacked = sf.stacked(name)
        values = stacked
    stored_bytes = sf.stored_bytes(name)

    def retrieved(k: int) -> Tensor:
        # What users get: Ŵ_k rounded to the original dtype (per-context tensors: exact).
        return sf.retrieve(name, k).float() if superposed else stacked[k].float()

    def original(k: int) -> Tensor:
        return originals[k][name].float() if originals is not None else stacked[k].float()

    error = None
    row_sq = None
    norms_sq: list[float] = []
    deltas: list[float] | None = None
    base = sf.base(name) if superposed else None
    max_abs = float(values.abs().max()) if values.numel() and floating else 0.0
    rms = []
    if originals is not None or not superposed:
        errs = []
        rows = []
        for k in range(K):
            Wk = original(k)
            rms.append(_rms(Wk))
            max_abs = max(max_abs, float(Wk.abs().max()) if Wk.numel() else 0.0)
            if originals is not None and floating:
                # float32 norms (pairwise-summed, ~1e-7 relative): double copies of big
                # tensors cost more time and memory than the precision is worth here.
                norms_sq.append(float(torch.linalg.vector_norm(Wk)) ** 2)
                errs.append(float(torch.linalg.vector_norm(retrieved(k) - Wk)) ** 2)
                if Wk.dim() >= 2:
                    Dk = Wk if base is None else Wk - base.float()
                    rows.append(
                        torch.linalg.vector_norm(as_matrix(Dk, meta.fan_in_axis), dim=1).double() ** 2
                    )
        if originals is not None and floating:
            v = kind.variance_factor if superposed else 0.0

            def expected(d_sq: list[float]) -> list[float]:
                return [
                    _ratio(math.sqrt(v * (sum(d_sq) - d)), math.sqrt(n))
                    for d, n in zip(d_sq, norms_sq, strict=True)
                ]

            deltas = None if base is None else [float(torch.linalg.vector_norm(original(k) - base.float())) ** 2 for k in range(K)]  # fmt: skip
            error = TensorWeightError(
                name=name,
                role=meta.role,
                shape=list(meta.shape),
                fan_in=meta.fan_in,
                error=[_ratio(math.sqrt(e), math.sqrt(n)) for e, n in zip(errs, norms_sq, strict=True)],
                expected=expected(norms_sq if deltas is None else deltas),
                expected_without_base=None if deltas is None else expected(norms_sq),
            )
            row_sq = torch.stack(rows) if rows else None
    sums = (norms_sq or None, (norms_sq if deltas is None else deltas) or None)
    if not floating:
        return TensorPass(error, [], [], row_sq, stored_bytes, *sums)
    # One absolute threshold per tensor for every source, scaled to the originals; without
    # them, the superposed RMS over sqrt(vK) is about one original's RMS.
    scale = sum(rms) / len(rms) if rms else _rms(values) / math.sqrt(kind.variance_factor * K)
    edges = torch.linspace(0.0, max(max_abs, 1e-30), NBINS + 1)
    mags = []
    if superposed:
        mags.append(_stats(name, "superposed", None, values, edges, scale))
    if originals is not None or not superposed:
        mags += [_stats(name, "original", k, original(k), edges, scale) for k in range(K)]
    return TensorPass(error, mags, edges.tolist(), row_sq, stored_bytes, *sums)


def _ratio(num: float, den: float) -> float:
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den
