"""Trainable tensors in superposition: one superposed weight, or K per-context copies.

`Superposed` holds the superposed weight W of one tensor and its K contexts as buffers, and
gives each context's view Ŵ_k with the same arithmetic as `pspctl.superpose.unbind`, so
that a model trained here and one extracted from the saved file compute the same thing.
Complex kinds keep Re(W) and Im(W) as two real parameters: standard optimizers cannot step
complex parameters the way the paper's real-part readout needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pspctl.contexts import ContextSet, Kind
from pspctl.kinds import OPS, parts
from pspctl.superpose import as_matrix, from_matrix

__all__ = ["Binding", "Stacked", "Superposed", "full", "initial_superposed", "mix_contexts"]


def mix_contexts(ctx: ContextSet) -> ContextSet:
    """The paper's mixture of contexts (Section 5.1): φ'_k = mean(φ_{k−1}, φ_k, φ_{k+1}).

    Neighbouring contexts then overlap, so that slowly shifting tasks share what they learn.
    At the ends only the neighbours that exist are averaged (context 0 and K−1 do not wrap
    around: a sequence of tasks need not be a cycle). Returns complex contexts with the mixed
    phases, which is how a saved file stores them, so extraction needs nothing special.

    Raises:
        ValueError: `ctx` is not complex (binary and rotation contexts have no phases to mix).
    """
    if ctx.kind is not Kind.COMPLEX:
        raise ValueError(f"a mixture of contexts needs complex contexts, not {ctx.kind.value}")
    K = ctx.num_contexts
    phases = ctx.data.double()
    mixed = torch.stack([phases[max(k - 1, 0) : min(k + 2, K)].mean(0) for k in range(K)])
    return ContextSet(Kind.COMPLEX, K, ctx.fan_in, mixed.float())


def initial_superposed(weight: Tensor, ctx: ContextSet, axis: int | None = None) -> Tensor:
    """W = bind([weight, 0, …, 0]): context 0 retrieves `weight` exactly.

    Every other context then retrieves `weight` scrambled by its relative context (sign flips,
    phase shifts or a rotation of each row): an initialisation of the same scale.
    """
    flat = as_matrix(weight.detach(), axis).float()
    ops = OPS[ctx.kind]
    return from_matrix(ops.bind(flat, ops.pick(ops.buffers(ctx, torch.float32), 0)), weight.shape, axis)


class Superposed(nn.Module):
    """One superposed weight [N, *rest] (viewed as [N, M]) and its K contexts.

    Args:
        ctx: the K contexts of this tensor (fan-in M).
        value: the superposed weight, real (binary, rotation) or complex (complex, onepower).
        base: what a centred weight's deltas add to (format v2), or None.
        axis: the fan-in axis the contexts act on (None: every dim but dim 0).
    """

    weight: nn.Parameter
    real: nn.Parameter
    imag: nn.Parameter

    base: Tensor | None

    def __init__(self, ctx: ContextSet, value: Tensor, base: Tensor | None = None, axis: int | None = None):
        super().__init__()
        self.ctx = ctx
        self.axis = axis
        self.ops = OPS[ctx.kind]
        self.shape = tuple(value.shape)
        # A centred tensor (format v2): W_k = B + Ŵ_k, where W holds the superposed deltas. The
        # base stays fixed; training moves the deltas.
        self.register_buffer("base", None if base is None else base.detach().float().clone())
        if self.ops.is_complex:
            value = value.detach().to(torch.complex64)
            self.real = nn.Parameter(value.real.clone().contiguous())
            self.imag = nn.Parameter(value.imag.clone().contiguous())
        else:
            if value.is_complex():
                raise TypeError(f"{ctx.kind.value} superposition needs a real tensor")
            self.weight = nn.Parameter(value.detach().float().clone().contiguous())
        for name, buffer in self.ops.buffers(ctx, torch.float32).items():
            self.register_buffer(name, buffer)

    def _parts(self) -> tuple[Tensor, Tensor | None]:
        """The superposed matrix [N, M]: (Re W, Im W) for complex kinds, (W, None) otherwise."""
        if self.ops.is_complex:
            return as_matrix(self.real, self.axis), as_matrix(self.imag, self.axis)
        return as_matrix(self.weight, self.axis), None

    def retrieve(self, k: int) -> Tensor:
        """Ŵ_k in the weight's shape: differentiable, float32."""
        real, imag = self._parts()
        out = from_matrix(self.ops.retrieve(real, imag, self.ops.pick(self, k)), self.shape, self.axis)
        return out if self.base is None else self.base + out

    def linear(self, x: Tensor, k: int) -> Tensor:
        """y = W (c_k ⊙ x) (the paper's eq. 1/7): the context binds the input, not the weight.

        Costs O(B·M) per call for the diagonal kinds and O(B·M²) for rotation, rather than
        O(N·M) / O(N·M²) for building Ŵ_k: cheaper whenever the batch is smaller than N.
        A weight bound on another axis than nn.Linear's fan-in is retrieved instead.
        """
        if self.axis is not None:
            return F.linear(x, self.retrieve(k))
        bound = self.ops.bind_input(x, self.ops.flip(self.ops.pick(self, k)))
        weights = parts(*self._parts())
        y = F.linear(bound[0], weights[0])
        for xj, wj in zip(bound[1:], weights[1:], strict=True):
            y = y + F.linear(xj, wj)
        return y if self.base is None else y + F.linear(x, self.base)

    # What a model reads off a weight it does not own (ViT casts its pixels to
    # `patch_embeddings.projection.weight.dtype`): those of the retrieved tensor.
    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def device(self) -> torch.device:
        return self._parts()[0].device

    def value(self) -> Tensor:
        """The superposed weight to store: complex64 for complex kinds, else float32."""
        if self.ops.is_complex:
            return torch.complex(full(self.real.detach()), full(self.imag.detach()))
        return full(self.weight.detach()).clone()


class Stacked(nn.Module):
    """K per-context copies of one tensor; context k uses copy k.

    Trainable copies are K separate parameters rather than one [K, …] tensor, so that the
    inactive contexts get no gradient at all: optimizers then skip them instead of moving
    them with stale momentum while another context trains.
    """

    items: nn.ParameterList
    stack: Tensor

    def __init__(self, tensors: Sequence[Tensor], *, trainable: bool):
        super().__init__()
        self.trainable = trainable
        if trainable:
            self.items = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in tensors])
        else:
            self.register_buffer("stack", torch.stack([t.detach().clone() for t in tensors]))

    def get(self, k: int) -> Tensor:
        # A view of the buffer: in-place updates (BatchNorm running stats) land in copy k.
        return self.items[k] if self.trainable else self.stack[k]  # type: ignore[no-any-return]

    @property
    def dtype(self) -> torch.dtype:
        return self.get(0).dtype

    @property
    def device(self) -> torch.device:
        return self.get(0).device

    @property
    def shape(self) -> torch.Size:
        return self.get(0).shape

    def stacked(self) -> Tensor:
        """The K copies stacked on a new dim 0, detached."""
        if self.trainable:
            return torch.stack([full(p.detach()) for p in self.items])
        return full(self.stack.detach()).clone()


def full(t: Tensor) -> Tensor:
    """`t` itself, or the whole tensor of a DTensor sharded by FSDP2 (a collective: every rank
    must call it, in the same order)."""
    gather = getattr(t, "full_tensor", None)
    return t if gather is None else gather()  # type: ignore[no-any-return]


Binding = Superposed | Stacked  # how a PSP model holds one tensor
