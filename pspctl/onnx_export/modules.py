"""Torch modules for the multi-context graph: the context is a tensor input, bound at run time.

`MultiContextModel(model, file)` wraps the task's model so that its forward takes
`(context, *inputs)`, with `context` an int64 scalar. Every tensor of the superposed file is
computed from `context` inside the graph and handed to the model with
`torch.func.functional_call`, so the model's own code runs unchanged:

- a superposed `nn.Linear` weight is replaced by `BoundLinear`, which binds on the *input*
  side, y = W (c_k ⊙ x), O(M) extra work instead of O(NM);
- any other superposed weight (a Conv kernel, eq. 8) is retrieved, Ŵ_k = unbind(W, c_k);
- per-context tensors (biases, norms, kept layers) are stored stacked [K, ...] and gathered.

ONNX has no complex type, so the complex kinds carry Re(W) and Im(W) and use
Re(W ⊙ c) x = Re(W)(cos φ ⊙ x) − Im(W)(sin φ ⊙ x). For onepower, φ_k = k·φ is computed
from the integer input, so each model is literally one number.

An out-of-range context is clamped to 0..K−1 and flagged: the graph's last output
`context_valid` is false. The wrapper never raises on it, since ONNX cannot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from pspctl.contexts import ContextSet
from pspctl.fileformat import SuperposedFile
from pspctl.kinds import OPS, parts
from pspctl.policy import Role
from pspctl.superpose import as_matrix, from_matrix

__all__ = ["BoundLinear", "ContextSlot", "MultiContextModel", "Retriever", "StackedTensors"]


class ContextSlot:
    """The clamped context index, an int64 scalar, shared by the bound layers of one forward.

    A plain object rather than a module attribute: torch.export rejects tensors assigned to
    module attributes during tracing, but a Python object passed around is just Python.
    """

    index: Tensor | None = None

    def get(self) -> Tensor:
        if self.index is None:
            raise RuntimeError("bound layers run only inside MultiContextModel.forward")
        return self.index


class _Contexts(nn.Module):
    """The contexts of one superposed tensor as buffers, in the form the graph uses.

    Binary signs are float ±1 rather than packed bits: one Gather and one Mul at run time, K·M
    floats stored. With `input_side`, rotations are stored as C_kᵀ: no Transpose of an M×M
    matrix per call. Complex and onepower keep float32 phases: trig is cheap at O(M), and
    onepower computes kφ from the context input, so each model is literally one number.
    """

    def __init__(self, ctx: ContextSet, dtype: torch.dtype, *, input_side: bool = False):
        super().__init__()
        self.ops = OPS[ctx.kind]
        buffers = (self.ops.input_buffers if input_side else self.ops.buffers)(ctx, dtype)
        for name, buffer in buffers.items():
            self.register_buffer(name, buffer)

    def pick(self, k: Tensor):
        """Context k's form; indexing with a scalar tensor exports as one Gather, with no Squeeze."""
        return self.ops.pick(self, k)


def _as_matrix(
    superposed: Tensor, dtype: torch.dtype, axis: int | None = None
) -> tuple[Tensor, Tensor | None]:
    """([N, M] real part, [N, M] imaginary part or None), in `dtype`, the fan-in `axis` last."""
    flat = as_matrix(superposed, axis)
    if flat.is_complex():
        return flat.real.to(dtype).contiguous(), flat.imag.to(dtype).contiguous()
    return flat.to(dtype).contiguous(), None


class Retriever(nn.Module):
    """Ŵ_k of one superposed tensor, computed in the graph: the weight-side binding (Conv, eq. 8)."""

    real: Tensor
    imag: Tensor  # None for the real kinds
    base: Tensor | None  # a centred weight's base (format v2)

    def __init__(
        self,
        superposed: Tensor,
        ctx: ContextSet,
        dtype: torch.dtype,
        slot: ContextSlot,
        base: Tensor | None = None,
        axis: int | None = None,
    ):
        super().__init__()
        self.shape = tuple(superposed.shape)
        self.axis = axis  # the fan-in axis (Conv1D: 0); the graph computes on [N, M] and moves it back
        self.slot = slot
        self.contexts = _Contexts(ctx, dtype)
        real, imag = _as_matrix(superposed, dtype, axis)
        self.register_buffer("real", real)
        self.register_buffer("imag", imag)
        self.register_buffer("base", None if base is None else as_matrix(base.to(dtype), axis).contiguous())

    def forward(self) -> Tensor:
        c = self.contexts.pick(self.slot.get())
        out = self.contexts.ops.retrieve(self.real, self.imag, c)
        return from_matrix(out if self.base is None else self.base + out, self.shape, self.axis)


class BoundLinear(nn.Module):
    """A superposed Linear that binds the context to its input: y = W (c_k ⊙ x) + b_k.

    binary   x' = c_k ⊙ x                        y = W x'
    rotation x' = C_k x (x @ C_kᵀ for rows)       y = W x'
    complex  x' = [cos φ_k ⊙ x, −sin φ_k ⊙ x]     y = [Re W, Im W] x'  (one GEMM, 2M wide)

    `bias` keeps the Linear's parameter name so the wrapper can substitute b_k for it.
    `weight` is Ŵ_k, for code that reads `linear.weight` directly (nn.MultiheadAttention).
    """

    bound_weight: Tensor

    def __init__(
        self,
        linear: nn.Linear,
        superposed: Tensor,
        ctx: ContextSet,
        slot: ContextSlot,
        base: Tensor | None = None,
    ):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.slot = slot
        self.centred = base is not None
        dtype = linear.weight.dtype
        self.contexts = _Contexts(ctx, dtype, input_side=True)
        # A centred weight (format v2) is B + Ŵ_k: y = [B | S] [x ; c_k ⊙ x], still one GEMM.
        weights = ([base.to(dtype)] if base is not None else []) + parts(*_as_matrix(superposed, dtype))
        self.register_buffer("bound_weight", torch.cat(weights, dim=1).contiguous())
        self.bias = linear.bias  # replaced by b_k at run time; dropped from the graph as unused

    def forward(self, x: Tensor) -> Tensor:
        bound = self.contexts.ops.bind_input(x, self.contexts.pick(self.slot.get()))
        bound = [x, *bound] if self.centred else bound
        return F.linear(
            bound[0] if len(bound) == 1 else torch.cat(bound, dim=-1), self.bound_weight, self.bias
        )

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        ops, m = self.contexts.ops, self.in_features
        w = self.bound_weight[:, m:] if self.centred else self.bound_weight
        real, imag = (w[:, :m], w[:, m:]) if ops.is_complex else (w, None)
        out = ops.retrieve(real, imag, ops.flip(self.contexts.pick(self.slot.get())))
        return self.bound_weight[:, :m] + out if self.centred else out


def _sanitize(name: str) -> str:
    return name.replace(".", "__")


class StackedTensors(nn.Module):
    """The file's per-context tensors as stacked [K, ...] buffers, in the model's dtypes."""

    def __init__(self, file: SuperposedFile, dtypes: dict[str, torch.dtype]):
        super().__init__()
        self.keys: dict[str, str] = {}  # tensor name -> buffer name
        self.shared: dict[str, str] = {}  # the same for tensors equal in every context: no Gather
        for name in file.names(Role.PER_CONTEXT):
            self.keys[name] = _sanitize(name)
            self.register_buffer(self.keys[name], file.stacked(name).to(dtypes[name]))
        for name in file.names(Role.SHARED):
            self.shared[name] = _sanitize(name)
            self.register_buffer(self.shared[name], file.retrieve(name, 0).to(dtypes[name]))

    def select(self, k: Tensor) -> dict[str, Tensor]:
        """Context k's tensors by name: one Gather each (none for shared ones)."""
        out = {name: getattr(self, key)[k] for name, key in self.keys.items()}
        return out | {name: getattr(self, key) for name, key in self.shared.items()}


class MultiContextModel(nn.Module):
    """`model` serving all K contexts of `file`: forward(context, *inputs) -> (*outputs, context_valid).

    `model` must already match the file's keys and shapes (see task.check_fits); it is
    modified in place (superposed Linears are replaced by BoundLinear).
    """

    def __init__(self, model: nn.Module, file: SuperposedFile):
        super().__init__()
        self.num_contexts = file.num_contexts
        self.slot = ContextSlot()
        dtypes = {name: t.dtype for name, t in model.state_dict().items()}
        self.stacked = StackedTensors(file, dtypes)
        self.retrievers = nn.Module()
        self._retrieved_names: dict[str, str] = {}
        for name in file.names(Role.SUPERPOSED):
            key = _sanitize(name)
            prefix, _, attr = name.rpartition(".")
            owner = model.get_submodule(prefix)
            base = file.base(name)
            axis = file.metas[name].fan_in_axis
            tied = name in file.tied.values()  # functional_call feeds its aliases the same tensor
            if prefix and type(owner) is nn.Linear and attr == "weight" and axis is None and not tied:
                # Exact type only: a subclass may use its weight in ways BoundLinear cannot see.
                model.set_submodule(
                    prefix, BoundLinear(owner, file.superposed(name), file.contexts(name), self.slot, base)
                )
            else:
                retriever = Retriever(
                    file.superposed(name), file.contexts(name), dtypes[name], self.slot, base, axis
                )
                self.retrievers.add_module(key, retriever)
                self._retrieved_names[name] = key
        self.model = model

    def forward(self, context: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        K = self.num_contexts
        k = context.reshape(()).clamp(0, K - 1)
        valid = k == context  # one Equal: false exactly when clamping changed the context
        self.slot.index = k
        try:
            params = self.stacked.select(k)
            for name, key in self._retrieved_names.items():
                params[name] = getattr(self.retrievers, key)()
            out = functional_call(self.model, params, inputs)
        finally:
            self.slot.index = None
        return (*pytree.tree_leaves(out), valid)
