"""One pass over the K copies of a tensor: its norms, its mean, its deltas' norms and its bound
sum, block of rows by block of rows. Pure, no I/O.

What a merge computes for a tensor it may superpose touches each value many times (a norm, a
sum, a delta, its norm, a bound term). Done tensor by tensor, each of those streams the K copies
through main memory; done on blocks of ~256 KiB, the block's K copies are read from memory
once and every later touch hits the cache (`benchmarks/merge_speed.py`). The arithmetic is
`superpose.bind`'s and `torch.linalg.vector_norm`'s, block by block: the bound sum is
`bind`'s (bit for bit for binary and the phase kinds; rotation's products are blocked
differently) and the norms agree to float32 rounding (tests/test_measure.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from pspctl.contexts import ContextSet
from pspctl.kinds import OPS
from pspctl.superpose import as_matrix, from_matrix

__all__ = ["Measured", "measure_bind"]

BLOCK = 1 << 16  # values per block and copy: K blocks of 256 KiB (float32) stay in cache
REREAD = 1 << 19  # values per copy between two `copies[k]` (2 MiB of float32), see measure_bind


@dataclass
class Measured:
    """What one pass over the K copies of a tensor found.

    w_sq: ‖W_k‖² per copy. to_mean / to_parent: ‖W_k − B‖² per copy, B the mean (as stored)
    or the parent; empty when not asked for. mean: the copies' mean, rounded to their dtype
    (None unless asked for). bound: Σ_k (W_k − B) ⊙ c_k for the centre asked to bind (B = 0
    for none), float32 (complex64; float64/complex128 for float64 inputs) in the tensor's shape.
    equal: whether the K copies are equal.
    """

    w_sq: list[float]
    equal: bool
    to_mean: list[float] = field(default_factory=list)
    to_parent: list[float] = field(default_factory=list)
    mean: Tensor | None = None
    bound: Tensor | None = None


def _wide(dtype: torch.dtype) -> torch.dtype:
    """Where values are summed and bound: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def measure_bind(
    copies: Sequence[Tensor],
    *,
    mean: bool = False,
    parent: Tensor | None = None,
    ctx: ContextSet | None = None,
    centre: str = "none",
    axis: int | None = None,
) -> Measured:
    """Measure the K `copies` of one tensor and, with `ctx`, bind them centred on `centre`
    ("none", "mean": their mean as rounded to their dtype, "base": `parent`).

    `mean` asks for the mean and the deltas' norms from it (always when centring on it);
    `parent`, the deltas' norms from it. `axis`: the fan-in axis (see `superpose.as_matrix`).

    `copies[k]` is taken again every `REREAD` values of a copy. For a sequence that reads
    memory-mapped inputs afresh at each `copies[k]` (merge's), the pages of the rows already
    measured are then unmapped as it goes: K × 2 MiB of the inputs stay resident, not K
    whole copies of the tensor. A list gives the same tensors each time.
    """
    if centre == "mean":
        mean = True
    if centre == "base" and parent is None:
        raise ValueError("centre 'base' needs the parent")
    K = len(copies)
    first = [copies[k] for k in range(K)]
    shape, dtype = first[0].shape, first[0].dtype
    rows = [as_matrix(c, axis) for c in first]
    del first  # the rows hold the copies: dropping them at a re-read releases the pages
    wide = _wide(dtype)
    N, M = rows[0].shape
    par = None if parent is None else as_matrix(parent, axis)
    out = Measured(w_sq=[0.0] * K, equal=True)
    if mean:
        out.to_mean, stored_mean = [0.0] * K, torch.empty((N, M), dtype=dtype)
    if par is not None:
        out.to_parent = [0.0] * K
    acc, ops, forms = None, None, []
    if ctx is not None:
        ops = OPS[ctx.kind]
        forms = [ops.pick(ops.buffers(ctx, wide), k) for k in range(K)]
        acc = torch.empty(
            (N, M), dtype=torch.promote_types(wide, torch.complex64) if ops.is_complex else wide
        )
    step = max(1, BLOCK // max(M, 1))
    # Block-sized scratch, allocated once (no allocation per block, which fragments the heap):
    # the blocks' sum, their deltas from the mean/parent, and the widened copies, mean and parent.
    total, to_m, to_p = (torch.empty((min(step, N), M), dtype=wide) for _ in range(3))
    narrow = dtype != wide
    widened = [torch.empty((min(step, N), M), dtype=wide) for _ in range(K + 2)] if narrow else []
    reread = max(1, REREAD // max(M, 1) // step) * step  # rows, a whole number of blocks
    for r in range(0, N, step):
        if r and r % reread == 0:
            rows = [as_matrix(copies[k], axis) for k in range(K)]
        block = [x[r : r + step] for x in rows]
        rows_here = block[0].shape[0]
        if out.equal:
            out.equal = all(torch.equal(block[0], b) for b in block[1:])
        vals = [w[:rows_here].copy_(b) for w, b in zip(widened, block, strict=False)] if narrow else block
        m = p = None
        if mean:
            # Σ W_k·(1/K): no overflow where the values are near the dtype's largest finite one.
            # Summed where it is stored when the inputs are wide already, else widened.
            m = stored_mean[r : r + step]
            t = torch.mul(vals[0], 1 / K, out=total[:rows_here] if narrow else m)
            for v in vals[1:]:
                t.add_(v, alpha=1 / K)
            if narrow:
                m.copy_(t)  # rounded to the inputs' dtype: the deltas carry what it lost
                m = widened[K][:rows_here].copy_(m)
        if par is not None:
            p = par[r : r + step]
            p = widened[K + 1][:rows_here].copy_(p) if narrow else p
        for k, v in enumerate(vals):
            out.w_sq[k] += _sq(v)
            terms = {"none": v}
            if m is not None:
                terms["mean"] = torch.sub(v, m, out=to_m[:rows_here])
                out.to_mean[k] += _sq(terms["mean"])
            if p is not None:
                terms["base"] = torch.sub(v, p, out=to_p[:rows_here])
                out.to_parent[k] += _sq(terms["base"])
            if acc is not None and ops is not None:
                bind = ops.accumulate if k else ops.bind_into  # the first term starts the block's sum
                bind(acc[r : r + step], terms[centre], forms[k])
    if mean:
        out.mean = from_matrix(stored_mean, shape, axis)
    if acc is not None:
        out.bound = from_matrix(acc, shape, axis)
    return out


def _sq(v: Tensor) -> float:
    """‖v‖², its norm in float32 (pairwise-summed), squared in float64."""
    return float(torch.linalg.vector_norm(v)) ** 2
