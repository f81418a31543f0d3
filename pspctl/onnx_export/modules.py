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

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils import _pytree as pytree

from pspctl.contexts import ContextSet, Kind
from pspctl.fileformat import SuperposedFile
from pspctl.kinds import OPS, parts
from pspctl.policy import Role
from pspctl.superpose import as_matrix, from_matrix

__all__ = [
    "AllContextsLinear",
    "BoundConv",
    "BoundLinear",
    "BranchLinear",
    "ContextSlot",
    "MultiContextModel",
    "Retriever",
    "StackedTensors",
    "all_k_pays",
    "branch_pays",
    "select",
]


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
        signs = getattr(self, "signs", None)
        if signs is not None:
            return row(signs, k)
        return self.ops.pick(self, k)


def row(table: Tensor, k: Tensor) -> Tensor:
    """table[k]. For a 2-D table as F.embedding, which exports as one Gather on the int64 `k`;
    `table[k]` also adds a Reshape and a Gather turning k into an index (once per graph)."""
    return F.embedding(k, table) if table.dim() == 2 else table[k]


class _Trig(nn.Module):
    """[cos φ_k, −sin φ_k] of a complex context as one [2M] row: the complex kinds' input side
    in one Mul with [x, x], instead of Gather, Cos, Sin, Neg, two Muls and a Concat. For a
    centred weight the row is [1, cos φ_k, −sin φ_k] against [x, x, x]: [B | Re S | Im S]
    in one Concat, one Mul and one Gemm.

    complex stores the table [K, 2M] (a Gather per call); onepower keeps its one phase vector
    and computes cos(k·[φ, φ] + [0, π/2]), since cos(t + π/2) = −sin t: still one number per
    model. Unused (`used` false) for the real kinds.
    """

    phases: Tensor
    offset: Tensor
    table: Tensor

    def __init__(self, ctx: ContextSet, dtype: torch.dtype, *, centred: bool = False):
        super().__init__()
        self.used = ctx.kind.is_complex
        self.onepower = ctx.kind is Kind.ONEPOWER
        self.copies = 3 if centred else 2
        if not self.used:
            return
        phases = ctx.data.double()
        zeros = torch.zeros_like(phases)
        if self.onepower:
            # centred: a leading block of phase 0 gives cos 0 = 1 exactly, the base's part of [x, x, x]
            self.register_buffer("phases", torch.cat([zeros] * centred + [phases, phases], -1).float())
            offset = [zeros] * centred + [zeros, torch.full_like(phases, math.pi / 2)]
            self.register_buffer("offset", torch.cat(offset, -1).float())
        else:
            ones = [torch.ones_like(phases)] * centred
            table = torch.cat([*ones, torch.cos(phases), -torch.sin(phases)], dim=-1)
            self.register_buffer("table", table.to(dtype).contiguous())

    def forward(self, k: Tensor) -> Tensor:
        if self.onepower:
            return torch.cos(k.to(torch.float32) * self.phases + self.offset)
        return row(self.table, k)


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
        self.trig = _Trig(ctx, dtype, centred=self.centred)
        # A centred weight (format v2) is B + Ŵ_k: y = [B | S] [x ; c_k ⊙ x], still one GEMM.
        weights = ([base.to(dtype)] if base is not None else []) + parts(*_as_matrix(superposed, dtype))
        self.register_buffer("bound_weight", torch.cat(weights, dim=1).contiguous())
        self.bias = linear.bias  # replaced by b_k at run time; dropped from the graph as unused

    def forward(self, x: Tensor) -> Tensor:
        k = self.slot.get()
        if self.trig.used:  # [(x,) cos φ_k ⊙ x, −sin φ_k ⊙ x]
            bound = [torch.cat([x] * self.trig.copies, dim=-1) * self.trig(k)]
        else:
            bound = self.contexts.ops.bind_input(x, self.contexts.pick(k))
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


class BoundConv(nn.Module):
    """A superposed convolution with a 1×1 kernel, bound on the input side: y = W * (c_k ⊙ x) + b_k.

    Exact only because the kernel has one position: eq. 8's context runs over the fan-in
    (in_channels × kernel positions), so for a 1×1 kernel it is one number per input channel,
    constant over every window, and commutes with the convolution whatever its stride,
    dilation or zero padding. For a larger kernel c_k varies over the window and no
    per-channel input context gives W_k * x (docs/export.md). groups must be 1.

    binary   x' = c_k ⊙ x (c_k broadcast over the spatial dims)
    complex  x' = [cos φ_k ⊙ x, −sin φ_k ⊙ x] on the channels, W' = [Re W | Im W]
    rotation x' = C_k x on the channel dim (a MatMul over channels)
    """

    bound_weight: Tensor

    def __init__(
        self,
        conv: nn.Conv1d | nn.Conv2d | nn.Conv3d,
        superposed: Tensor,
        ctx: ContextSet,
        slot: ContextSlot,
        base: Tensor | None = None,
    ):
        super().__init__()
        self.slot = slot
        self.centred = base is not None
        self.dims = conv.weight.dim() - 2
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.dims]
        self.stride, self.padding, self.dilation = conv.stride, conv.padding, conv.dilation
        dtype = conv.weight.dtype
        self.contexts = _Contexts(ctx, dtype, input_side=True)
        self.trig = _Trig(ctx, dtype, centred=self.centred)
        n = superposed.shape[0]
        flat = [base.to(dtype).reshape(n, -1)] if base is not None else []
        weights = flat + parts(*_as_matrix(superposed, dtype))
        kernel = torch.cat(weights, dim=1).reshape(n, -1, *conv.weight.shape[2:])
        self.register_buffer("bound_weight", kernel.contiguous())
        self.bias = conv.bias  # replaced by b_k at run time

    @staticmethod
    def exact(module: nn.Module, attr: str) -> bool:
        """Whether `module.attr` is a weight BoundConv binds exactly (see the class docstring)."""
        return (
            attr == "weight"
            and isinstance(module, nn.Conv1d | nn.Conv2d | nn.Conv3d)
            and type(module).forward in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)
            and all(s == 1 for s in module.kernel_size)
            and module.groups == 1
            and module.padding_mode == "zeros"
            and not isinstance(module.padding, str)  # 'same' is still exact, but keep it simple
        )

    def forward(self, x: Tensor) -> Tensor:
        k = self.slot.get()
        spatial = (1,) * self.dims
        if self.trig.used:
            t = self.trig(k)
            bound = [torch.cat([x] * self.trig.copies, dim=1) * t.reshape(-1, *spatial)]
        else:
            c = self.contexts.pick(k)
            if self.contexts.ops is OPS[Kind.ROTATION]:  # C_kᵀ: channels last, times C_kᵀ, back
                bound = [(x.movedim(1, -1) @ c).movedim(-1, 1)]
            else:
                bound = [x * c.reshape(-1, *spatial)]
            bound = [x, *bound] if self.centred else bound
        inputs = bound[0] if len(bound) == 1 else torch.cat(bound, dim=1)
        return self.conv(inputs, self.bound_weight, self.bias, self.stride, self.padding, self.dilation)


def plain_linear(module: nn.Module) -> bool:
    """An nn.Linear, or a subclass that keeps Linear's forward (NonDynamicallyQuantizableLinear):
    its weight is used only as F.linear(x, weight, bias), so binding it on the input side is exact."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


# The all-K Gemm computes (K−1)·batch·N·M extra multiply-adds to save a Gather copying N·M
# floats (and the pre-packing a gathered operand loses). At batch 1 the products are
# memory-bound, so it reads K·N·M floats against the Gather's 3·N·M (read, write, read):
# measured on the bundled MLP with K = 4 (benchmarks/export_latency.py, docs/export.md),
# the Gather was faster at batch 1 and 64. So all-K is chosen while (K−1)·batch ≤ 2
# (K ≤ 3 at batch 1), and only for layers whose K copies fit in cache (ALL_K_BYTES).
ALL_K_WORK = 2
ALL_K_BYTES = 4 * 2**20


def all_k_pays(K: int, n: int, m: int, batch: int, itemsize: int = 4) -> bool:
    """The cost model: one Gemm over all K copies (True) or a Gather of context k's copy (False)."""
    return (K - 1) * batch <= ALL_K_WORK and K * n * m * itemsize <= ALL_K_BYTES


class AllContextsLinear(nn.Module):
    """A per-context Linear as one Gemm over all K copies, then context k's slice of the output.

    weight [K·N, M] and bias [K·N] are constants that onnxruntime pre-packs at load time; the
    Gemm computes all K outputs [.., K·N] and a Gather picks k's N of them: at batch 1 that
    is a few hundred floats instead of a gathered N×M weight. Right for small layers at small batch (`all_k_pays`).
    """

    weight_all: Tensor
    bias_all: Tensor | None
    columns: Tensor

    def __init__(self, weights: Tensor, biases: Tensor | None, slot: ContextSlot):
        super().__init__()
        K, n, m = weights.shape
        self.slot, self.num_contexts, self.out_features = slot, K, n
        self.register_buffer("weight_all", weights.reshape(K * n, m).contiguous())
        self.register_buffer("bias_all", None if biases is None else biases.reshape(K * n).contiguous())
        columns = torch.arange(K * n, dtype=torch.int64).reshape(K, n)
        self.register_buffer("columns", columns)

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight_all, self.bias_all)
        k = self.slot.get()
        if y.dim() == 2:  # rows: a Reshape to [B, K, N] (no copy) and one Gather on K
            return y.reshape(-1, self.num_contexts, self.out_features)[:, k]
        return torch.index_select(y, -1, self.columns[k])  # any leading dims: k's N columns

    @property
    def weight(self) -> Tensor:
        """W_k, for code that reads `linear.weight` directly."""
        return self.weight_all.reshape(self.num_contexts, self.out_features, -1)[self.slot.get()]


# A per-context Linear behind an If tree (`BranchLinear`) costs ⌈log2 K⌉ If nodes (~5 µs each
# here) and reads its own pre-packed constants; a Gather copies N·M floats and hands the Gemm
# an operand it cannot pre-pack. Measured with K = 4 on a 256×256 layer (256 KiB): If 1.37×
# and Gather 1.67× a plain Gemm at batch 1, 1.09× and 1.37× at batch 64; 4096²: If 1.02× and
# 0.99×, Gather 2.29× and 1.73×. On the bundled MLP's 64×256 layer at batch 64 the If did not
# beat the Gather (the whole graph 1.26× against 1.22–1.24×). So: from 256 KiB up.
BRANCH_MIN_BYTES = 256 * 2**10


def branch_pays(n: int, m: int, itemsize: int = 4) -> bool:
    """The cost model: a per-context Linear behind an If tree (True) rather than gathered."""
    return n * m * itemsize >= BRANCH_MIN_BYTES


class BranchLinear(nn.Module):
    """A per-context Linear as K Linears behind an If tree (`select`): only context k's runs,
    on its own constants (moved into its branch after export, see `convert.localize_initializers`)."""

    def __init__(self, weights: Tensor, biases: Tensor | None, slot: ContextSlot):
        super().__init__()
        self.slot = slot
        self.copies = nn.ModuleList()
        for k in range(weights.shape[0]):
            linear = nn.Linear(
                weights.shape[2], weights.shape[1], bias=biases is not None, dtype=weights.dtype
            )
            with torch.no_grad():
                linear.weight.copy_(weights[k])
                if biases is not None:
                    linear.bias.copy_(biases[k])
            self.copies.append(linear.requires_grad_(False))

    def forward(self, x: Tensor) -> Tensor:
        branches = [lambda x, layer=layer: (layer(x),) for layer in self.copies]
        return select(self.slot.get(), branches, (x,))[0]

    @property
    def weight(self) -> Tensor:
        """W_k, for code that reads `linear.weight` directly."""
        return torch.stack([c.weight for c in self.copies if isinstance(c, nn.Linear)])[self.slot.get()]


def _sanitize(name: str) -> str:
    return name.replace(".", "__")


class StackedTensors(nn.Module):
    """The file's per-context tensors as stacked [K, ...] buffers, in the model's dtypes.

    `skip`: names served otherwise (by an AllContextsLinear).
    """

    def __init__(
        self, file: SuperposedFile, dtypes: dict[str, torch.dtype], skip: frozenset[str] = frozenset()
    ):
        super().__init__()
        self.keys: dict[str, str] = {}  # tensor name -> buffer name
        self.shared: dict[str, str] = {}  # the same for tensors equal in every context: no Gather
        for name in file.names(Role.PER_CONTEXT):
            if name in skip:
                continue
            self.keys[name] = _sanitize(name)
            self.register_buffer(self.keys[name], file.stacked(name).to(dtypes[name]))
        for name in file.names(Role.SHARED):
            if name in skip:
                continue
            self.shared[name] = _sanitize(name)
            self.register_buffer(self.shared[name], file.retrieve(name, 0).to(dtypes[name]))

    def select(self, k: Tensor) -> dict[str, Tensor]:
        """Context k's tensors by name: one Gather each (none for shared ones)."""
        out = {name: row(getattr(self, key), k) for name, key in self.keys.items()}
        return out | {name: getattr(self, key) for name, key in self.shared.items()}


# How each tensor of the multi-context graph is served, as named in the export report.
INPUT_SIDE = "input side"  # superposed Linear / 1×1 Conv: y = W (c_k ⊙ x)
WEIGHT_SIDE = "weight side"  # any other superposed weight: Ŵ_k retrieved in the graph
ALL_K = "all-K Gemm"  # per-context Linear: one Gemm over the K copies, select the output
GATHER = "gather"  # per-context tensor: stacked [K, ...], one Gather
SHARED = "shared"  # equal in every context: stored once
BRANCH = "per-context branch"  # K whole graphs (nothing superposed) or K Linears; If picks one


def select(k: Tensor, branches: list, operands: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """branches[k](*operands) for an int64 scalar k in 0..len−1, as a balanced tree of
    `torch.cond` (ONNX If): ⌈log2 K⌉ Ifs run, and only the chosen branch's work."""
    if len(branches) == 1:
        return branches[0](*operands)
    half = len(branches) // 2
    low, high = branches[:half], branches[half:]
    return torch.cond(  # type: ignore[no-any-return]
        k < half,
        lambda *xs: select(k, low, xs),
        lambda *xs: select(k - half, high, xs),
        operands,
    )


def _per_context_linears(model: nn.Module, file: SuperposedFile) -> dict[str, nn.Linear]:
    """Plain Linears whose weight is per context and whose bias is per context, shared or absent."""
    roles = {name: role for role in Role for name in file.names(role)}
    out = {}
    for prefix, module in model.named_modules():
        if not prefix or not plain_linear(module):
            continue
        weight = roles.get(f"{prefix}.weight")
        bias = roles.get(f"{prefix}.bias") if module.bias is not None else Role.PER_CONTEXT
        if weight is Role.PER_CONTEXT and bias in (Role.PER_CONTEXT, Role.SHARED):
            out[prefix] = module  # type: ignore[assignment]
    return out


class MultiContextModel(nn.Module):
    """`model` serving all K contexts of `file`: forward(context, *inputs) -> (*outputs, context_valid).

    `model` must already match the file's keys and shapes (see task.check_fits); it is
    modified in place (superposed Linears and 1×1 Convs become BoundLinear/BoundConv, small
    per-context Linears AllContextsLinear). `batch` is the batch size the per-tensor choices
    are made for (`all_k_pays`); `layers` says, per tensor, which was made. With nothing
    superposed, `whole` serves K whole models as branches; without it, per tensor as always.
    """

    def __init__(self, model: nn.Module, file: SuperposedFile, *, batch: int = 1, whole: bool = True):
        super().__init__()
        file = file.named_as(model)  # a transformers model may name its weights otherwise
        self.num_contexts = K = file.num_contexts
        self.slot = ContextSlot()
        self.layers: dict[str, str] = {}
        self.copies: nn.ModuleList | None = None
        if whole and not file.names(Role.SUPERPOSED):
            # Nothing to bind: K whole models, each with its weights as its own constants, and
            # an If tree picking one. Gathering per-context weights copies each (and loses
            # onnxruntime's pre-packing); a branch reads its constants in place.
            self.copies = nn.ModuleList(_loaded(model, file.state_dict(k)) for k in range(K))
            self.layers = dict.fromkeys(file.names(), BRANCH)
            return
        dtypes = {name: t.dtype for name, t in model.state_dict().items()}
        served: set[str] = set()
        for prefix, linear in _per_context_linears(model, file).items():
            n, m = linear.weight.shape
            branch = branch_pays(n, m, linear.weight.element_size())
            all_k = not branch and all_k_pays(K, n, m, batch, linear.weight.element_size())
            if not (all_k or branch):
                continue
            weights = file.stacked(f"{prefix}.weight").to(linear.weight.dtype)
            biases = None
            if linear.bias is not None:
                bias = f"{prefix}.bias"
                biases = (
                    file.stacked(bias)
                    if bias in file.names(Role.PER_CONTEXT)
                    else file.retrieve(bias, 0).expand(K, n)
                )
                biases = biases.to(linear.bias.dtype)
                served.add(bias)
            layer = (BranchLinear if branch else AllContextsLinear)(weights, biases, self.slot)
            model.set_submodule(prefix, layer)
            served.add(f"{prefix}.weight")
            self.layers[prefix] = BRANCH if branch else ALL_K
        self.stacked = StackedTensors(file, dtypes, frozenset(served))
        self.layers |= {name: GATHER for name in self.stacked.keys}
        self.layers |= {name: SHARED for name in self.stacked.shared}
        self.retrievers = nn.Module()
        self._retrieved_names: dict[str, str] = {}
        for name in file.names(Role.SUPERPOSED):
            key = _sanitize(name)
            prefix, _, attr = name.rpartition(".")
            owner = model.get_submodule(prefix)
            base = file.base(name)
            axis = file.metas[name].fan_in_axis
            tied = name in file.tied.values()  # functional_call feeds its aliases the same tensor
            bound: nn.Module | None = None
            if axis is not None or tied:
                pass  # retrieved on the weight side, on its own fan-in axis
            elif prefix and plain_linear(owner) and attr == "weight":
                # Only a Linear that uses its weight as F.linear: a subclass may do otherwise.
                bound = BoundLinear(owner, file.superposed(name), file.contexts(name), self.slot, base)  # type: ignore[arg-type]
            elif prefix and BoundConv.exact(owner, attr):
                bound = BoundConv(owner, file.superposed(name), file.contexts(name), self.slot, base)  # type: ignore[arg-type]
            if bound is not None:
                model.set_submodule(prefix, bound)
                self.layers[name] = INPUT_SIDE
            else:
                retriever = Retriever(
                    file.superposed(name), file.contexts(name), dtypes[name], self.slot, base, axis
                )
                self.retrievers.add_module(key, retriever)
                self._retrieved_names[name] = key
                self.layers[name] = WEIGHT_SIDE
        self.model = model

    def forward(self, context: Tensor, *inputs: Tensor) -> tuple[Tensor, ...]:
        # One Clip and one Equal: `context` is a scalar input, so no Reshape.
        k = context.clamp(0, self.num_contexts - 1)
        valid = k == context  # false exactly when clamping changed the context
        if self.copies is not None:
            branches = [_leaves(m) for m in self.copies]
            return (*select(k, branches, inputs), valid)
        self.slot.index = k
        try:
            params = self.stacked.select(k)
            for name, key in self._retrieved_names.items():
                params[name] = getattr(self.retrievers, key)()
            out = functional_call(self.model, params, inputs)
        finally:
            self.slot.index = None
        return (*pytree.tree_leaves(out), valid)


def _loaded(model: nn.Module, state: dict[str, Tensor]) -> nn.Module:
    """A copy of `model` holding `state` (one context's tensors, tied ones tied: a tied copy
    that `save_pretrained` dropped is loaded from the key it is tied to, `task.load_state`)."""
    import copy

    from pspctl.task import load_state

    return load_state(copy.deepcopy(model), state, "a context's weights").eval()


def _leaves(model: nn.Module):
    """model's forward with its outputs flattened: a cond branch returns a tuple of tensors."""
    return lambda *xs: tuple(pytree.tree_leaves(model(*xs)))
