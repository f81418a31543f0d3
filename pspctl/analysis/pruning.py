"""Magnitude pruning: of the superposed values, and of each original to the same budget.

The budget is the file's tensor bytes (superposed tensors, per-context copies and the
contexts) divided by K: each original keeps as many values as fit in that many bytes at its
own dtype. The index overhead a sparse format needs is not counted, which favours pruning;
the contexts are counted although they follow from the seed, which matters only for
rotation contexts (K·M² floats per tensor).

Global thresholds come from the magnitudes themselves, exactly up to `SAMPLE_CAP` values
and from an evenly strided subsample beyond; the achieved sparsity is always measured.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from pspctl.dtypes import itemsize
from pspctl.fileformat import SuperposedFile

__all__ = [
    "SAMPLE_CAP",
    "model_size",
    "magnitude_sample",
    "prune_superposed",
    "same_budget_state",
    "thresholds",
]

SAMPLE_CAP = 8_000_000


def model_size(sf: SuperposedFile) -> tuple[int, int]:
    """(bytes, values) of one model, from the file's header."""
    nbytes = values = 0
    for meta in sf.header.tensors.values():
        n = math.prod(meta.shape)
        values += n
        nbytes += n * itemsize(meta.dtype)
    return nbytes, values


def magnitude_sample(tensors: Iterable[Tensor], total: int, cap: int = SAMPLE_CAP) -> Tensor:
    """|values| of all tensors (streamed), every ceil(total/cap)-th one when there are more than cap."""
    stride = max(1, math.ceil(total / cap))
    parts = [t.detach().abs().flatten().float()[::stride] for t in tensors]
    return torch.cat(parts) if parts else torch.zeros(0)


def thresholds(sample: Tensor, sparsities: Sequence[float]) -> list[float]:
    """τ_s such that about a fraction s of the values have |v| ≤ τ_s (−1 for s = 0: prune nothing)."""
    out = []
    for s in sparsities:
        n = int(round(s * sample.numel()))
        out.append(-1.0 if n <= 0 else float(sample.kthvalue(min(n, sample.numel())).values))
    return out


def prune_superposed(W: Tensor, tau: float) -> Tensor:
    """Zero the stored values with |v| ≤ τ; a complex tensor's real and imaginary parts separately."""
    if W.is_complex():
        return torch.complex(prune_superposed(W.real, tau), prune_superposed(W.imag, tau))
    return torch.where(W.abs() > tau, W, torch.zeros((), dtype=W.dtype))


def _prunable(t: Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


def same_budget_state(state: Mapping[str, Tensor], budget_bytes: float) -> tuple[dict[str, Tensor], float]:
    """Prune one original globally by magnitude so that its kept values fit in `budget_bytes`.

    1-d and non-floating tensors (biases, norms, counters) are kept whole and count
    against the budget; the ≥2-d floating tensors share the rest.

    Returns:
        (the pruned state_dict, the fraction of the model's values kept).
    """
    fixed_bytes = sum(t.nbytes for t in state.values() if not _prunable(t))
    fixed = sum(t.numel() for t in state.values() if not _prunable(t))
    prunable = sum(t.numel() for t in state.values() if _prunable(t))
    per_value = sum(t.nbytes for t in state.values() if _prunable(t)) / max(prunable, 1)
    total = fixed + prunable
    keep = int((budget_bytes - fixed_bytes) // per_value) if prunable else 0
    if keep >= prunable:
        return dict(state), 1.0
    keep = max(keep, 0)
    sample = magnitude_sample((t for t in state.values() if _prunable(t)), prunable)
    tau = thresholds(sample, [1 - keep / prunable])[0]
    out = {n: (torch.where(t.abs() > tau, t, torch.zeros((), dtype=t.dtype)) if _prunable(t) else t)
           for n, t in state.items()}  # fmt: skip
    kept = fixed + sum(int((t != 0).sum()) for t in out.values() if _prunable(t))
    return out, kept / total
