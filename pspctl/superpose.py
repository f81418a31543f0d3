"""Bind and unbind: the superposition maths on tensors. Pure, no I/O.

A weight of shape [N, *rest] is viewed as a matrix [N, M] with M = prod(rest): the fan-in
of a Linear (in_features) or of a Conv kernel (in_channels/groups × kernel, the paper's
eq. 8). Every context acts on that M-dim axis. A weight whose fan-in is one other axis `a`
(transformers' `Conv1D` stores [in, out], so a = 0) is viewed as [N, M] with M = shape[a]
by moving that axis last (`as_matrix`) and moved back afterwards (`from_matrix`): `axis`
None is the default, every dim but dim 0.

    binary    W = Σ_k W_k ⊙ c_k          Ŵ_k = W ⊙ c_k
    complex   W = Σ_k W_k ⊙ conj(c_k)    Ŵ_k = Re(W ⊙ c_k)
    onepower  as complex with c_k = exp(i·k·φ)
    rotation  W = Σ_k W_k C_kᵀ            Ŵ_k = W C_k

Ŵ_k = W_k + residual; the residual has zero mean and, per output unit, variance
`Kind.variance_factor` × Σ_{s≠k} ‖w_s‖²‖x‖²/M when applied to an input x (Propositions 1, 2).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from pspctl.contexts import ContextSet, Kind
from pspctl.kinds import OPS

__all__ = ["as_matrix", "bind", "fan_in", "from_matrix", "predicted_output_error", "unbind"]


def fan_in(shape: Sequence[int], axis: int | None = None) -> int:
    """M: the product of every dim but dim 0 (1 for a 1-d tensor), or shape[axis] if given."""
    if axis is not None:
        return int(shape[axis])
    return math.prod(shape[1:]) if len(shape) > 1 else 1


def as_matrix(t: Tensor, axis: int | None = None) -> Tensor:
    """`t` as the [N, M] matrix the contexts act on: the fan-in (every dim but dim 0, or `axis`) last."""
    # Explicit sizes, not -1: a zero-size tensor has no inferable dim.
    if axis is None:
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))
    others = math.prod(d for i, d in enumerate(t.shape) if i != axis)
    return t.movedim(axis, -1).reshape(others, t.shape[axis])


def from_matrix(m: Tensor, shape: Sequence[int], axis: int | None = None) -> Tensor:
    """Inverse of `as_matrix`: the [N, M] matrix `m` back in `shape`."""
    if axis is None:
        return m.reshape(tuple(shape))
    moved = [d for i, d in enumerate(shape) if i != axis] + [shape[axis]]
    return m.reshape(moved).movedim(-1, axis)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    # Accumulate fp16/bf16 in fp32: summing K low-precision terms loses the small residuals.
    return torch.float64 if dtype == torch.float64 else torch.float32


def bind(weights: Iterable[Tensor], ctx: ContextSet, axis: int | None = None) -> Tensor:
    """Superpose K weights of one shape into one tensor.

    `weights` may be a generator: they are consumed one at a time, so that a merge never
    holds K copies of a tensor. Returns a float32 (float64 for float64 inputs) tensor of
    the weights' shape, complex64/complex128 for the complex kinds. `axis`: the fan-in axis
    (None: every dim but dim 0).
    """
    ops = OPS[ctx.kind]
    buffers = ops.buffers(ctx, torch.float32)
    acc: Tensor | None = None
    count = 0
    for k, w in enumerate(weights):
        if k >= ctx.num_contexts:
            raise ValueError(f"more weights than the {ctx.num_contexts} contexts")
        flat = as_matrix(w, axis).to(_accumulator_dtype(w.dtype))
        if flat.shape[1] != ctx.fan_in:
            raise ValueError(f"weight fan-in {flat.shape[1]} != context fan-in {ctx.fan_in}")
        if acc is None:  # summed in place into the first term, which must not be the input
            term = ops.bind(flat, ops.pick(buffers, k))
            acc = term.clone() if term.data_ptr() == w.data_ptr() else term
        else:
            ops.accumulate(acc, flat, ops.pick(buffers, k))
        count += 1
        shape = w.shape
    if acc is None or count != ctx.num_contexts:
        raise ValueError(f"bind needs {ctx.num_contexts} weights, got {count}")
    return from_matrix(acc, shape, axis)


def unbind(
    superposed: Tensor, ctx: ContextSet, k: int, axis: int | None = None, *, base: Tensor | None = None
) -> Tensor:
    """Ŵ_k: retrieve model k's weight (real, float32/float64) from a superposed tensor bound on
    fan-in axis `axis` (None: every dim but dim 0); with `base`, B + Ŵ_k (a centred tensor)."""
    ctx._check(k)
    ops = OPS[ctx.kind]
    flat = as_matrix(superposed, axis)
    if flat.is_complex() != ops.is_complex:
        raise TypeError(
            f"{ctx.kind.value} superposition needs a {'complex' if ops.is_complex else 'real'} tensor"
        )
    real, imag = (flat.real, flat.imag) if flat.is_complex() else (flat, None)
    c = ops.pick(ops.buffers(ctx, real.dtype), k)
    if base is None:
        out = ops.retrieve(real, imag, c)
    else:
        out = ops.retrieve_onto(as_matrix(base.to(real.dtype), axis), real, imag, c)
    return from_matrix(out, superposed.shape, axis)


def predicted_output_error(kind: Kind | str, num_contexts: int, fan_in: int, eta: float) -> float:
    """Proposition 2: expected ‖residual‖/‖signal‖ of one output unit.

    noise/signal ≈ sqrt(v·(K−1)/M)/η, with η = |⟨w,x⟩|/(‖w‖‖x‖) the alignment of the
    weights with the input, v the kind's variance factor, and the other models' rows
    assumed as large as this one's.
    """
    v = Kind(kind).variance_factor
    return math.sqrt(v * (num_contexts - 1) / fan_in) / eta
