"""PSP layers: Linear and Conv with superposed weights, and a wrapper for every other module.

Each layer reads the active context from its `context` attribute, which `PSPModel` sets on
all of them at once. Biases, norms and anything the policy keeps per context are `Stacked`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from pspctl.nn.tensors import Binding, Stacked, Superposed

__all__ = ["OwnTensors", "PSPConv", "PSPLayer", "PSPLinear", "PerContext"]


def _current(binding: Binding, k: int) -> Tensor:
    return binding.retrieve(k) if isinstance(binding, Superposed) else binding.get(k)


class PSPLayer(nn.Module):
    """Base of the PSP layers: `context` selects which of the K models runs."""

    context: int = 0


class PSPLinear(PSPLayer):
    """y = W (c_k ⊙ x) + b_k (the paper's eq. 7); a per-context weight gives y = W_k x + b_k."""

    def __init__(self, weight: Binding, bias: Stacked | None = None):
        super().__init__()
        if len(_shape(weight)) != 2:
            raise ValueError(f"a Linear weight has 2 dims, got shape {_shape(weight)}")
        self.weight = weight
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        k = self.context
        bias = None if self.bias is None else self.bias.get(k)
        if isinstance(self.weight, Superposed):
            y = self.weight.linear(x, k)
            return y if bias is None else y + bias
        return F.linear(x, self.weight.get(k), bias)


class PSPConv(PSPLayer):
    """A Conv1d/2d/3d whose kernel is bound to the context (the paper's eq. 8/10).

    For convolutions the kernel is far smaller than the input, so the context multiplies the
    kernel (over in_channels/groups × kernel size, the fan-in) instead of the image.

    Args:
        conv: the original layer; its geometry (stride, padding, groups…) is reused, its
            tensors are dropped.
    """

    _conv: nn.Conv1d | nn.Conv2d | nn.Conv3d

    def __init__(self, conv: nn.Conv1d | nn.Conv2d | nn.Conv3d, weight: Binding, bias: Stacked | None):
        super().__init__()
        conv.register_parameter("weight", None)
        conv.register_parameter("bias", None)
        # Kept out of the module tree: it only lends its `_conv_forward` and geometry.
        self.__dict__["_conv"] = conv
        self.weight = weight
        self.bias = bias

    def forward(self, x: Tensor) -> Tensor:
        k = self.context
        bias = None if self.bias is None else self.bias.get(k)
        return self._conv._conv_forward(x, _current(self.weight, k), bias)

    def extra_repr(self) -> str:
        return repr(self._conv)


class PerContext(PSPLayer):
    """Any other module with tensors (norms, embeddings, …), run with context k's tensors.

    The module's own forward runs through `torch.func.functional_call` with each tensor
    replaced by context k's: copy k of a per-context tensor, Ŵ_k of a superposed one.
    """

    _module: nn.Module

    def __init__(self, module: nn.Module, bindings: dict[str, Binding]):
        super().__init__()
        _release(module, bindings)  # its buffers stay: functional_call replaces them per call
        self.__dict__["_module"] = module
        self.tensors = nn.ModuleDict(bindings)

    def __getattr__(self, name: str) -> Any:
        # What a parent reads off the module it holds (nn.MultiheadAttention reads
        # `out_proj.weight`, a tied head `embed.weight`): context k's tensor, else the module's own
        # attribute (`in_features`, `batch_first`…).
        try:
            return super().__getattr__(name)  # the wrapper's own: `tensors`
        except AttributeError:
            pass
        tensors = self._modules.get("tensors")
        if tensors is not None and name in tensors._modules:
            return _current(tensors._modules[name], self.context)  # type: ignore[arg-type]
        module = self.__dict__.get("_module")
        if module is None:
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
        return getattr(module, name)

    def train(self, mode: bool = True) -> PerContext:
        # The wrapped module is outside the module tree; its mode (BatchNorm, Dropout) must follow.
        self._module.train(mode)
        return super().train(mode)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        k = self.context
        tensors = {name: _current(b, k) for name, b in self.tensors.items()}  # type: ignore[arg-type]
        return torch.func.functional_call(self._module, tensors, args, kwargs)

    def extra_repr(self) -> str:
        return type(self._module).__name__


class OwnTensors(PSPLayer):
    """The tensors of a module that also has submodules (a ViT's class token beside its blocks).

    That module cannot be wrapped like `PerContext`: its submodules run inside its forward and
    have their own PSP layers. It stays where it is and its own tensors leave it. `PSPModel`
    keeps this holder in its module tree and, for the length of each forward, sets context k's
    tensors on the module as plain attributes, so `self.class_token` reads them (and trains
    them) wherever the model reads it from.
    """

    _owner: nn.Module

    def __init__(self, owner: nn.Module, bindings: dict[str, Binding]):
        super().__init__()
        _release(owner, bindings, buffers=True)
        self.__dict__["_owner"] = owner  # already in the model's tree
        self.tensors = nn.ModuleDict(bindings)

    def assign(self) -> None:
        for name, b in self.tensors.items():
            self._owner.__dict__[name] = _current(b, self.context)  # type: ignore[arg-type]

    def clear(self) -> None:
        # Not kept between forwards: a retrieved tensor is part of a graph, and a module
        # holding one cannot be deep-copied.
        for name in self.tensors:
            self._owner.__dict__.pop(name, None)


def _release(module: nn.Module, names: Iterable[str], *, buffers: bool = False) -> None:
    """Take the tensors `names` off `module` (their bindings hold them now)."""
    for name in names:
        if name in module._parameters:
            module.register_parameter(name, None)
        elif buffers:
            module.register_buffer(name, None)


def _shape(binding: Binding) -> tuple[int, ...]:
    if isinstance(binding, Superposed):
        return binding.shape
    return tuple(binding.stacked().shape[1:])
