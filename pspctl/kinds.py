"""One table of operations per context kind: the only code that knows how each kind binds.

`superpose` (merge and extract), `nn` (training) and `onnx_export` (the multi-context graph)
all hold a superposed weight as a real matrix [N, M] (complex kinds: its real and imaginary
parts) and its K contexts as *buffers*, and all call these operations, so a model trained,
extracted or exported computes the same thing. Adding a kind means one entry in `OPS` (and
its generator and stored form in `contexts.py`).

A context k, picked from the buffers, is the kind's *form*:

| kind              | buffers                         | form c_k                    |
|-------------------|---------------------------------|-----------------------------|
| binary            | signs [K, M] (±1)               | c_k, [M]                    |
| rotation          | rotations [K, M, M]             | C_k, [M, M]                 |
| complex           | phases [K, M]                   | φ_k, [M]                    |
| onepower          | phases [M]                      | kφ, [M]                     |

`k` may be an int or an int64 scalar tensor (in an exported graph, an input).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from pspctl.contexts import ContextSet, Kind

__all__ = ["OPS", "KindOps"]


class KindOps:
    """Binding and retrieval for one kind, on [N, M] matrices and [B, M] inputs."""

    is_complex = False

    def buffers(self, ctx: ContextSet, dtype: torch.dtype) -> dict[str, Tensor]:
        """The K contexts as tensors to keep beside the weight (module buffers, graph constants)."""
        raise NotImplementedError

    def pick(self, buffers: Any, k: int | Tensor) -> Any:
        """Context k's form from `buffers` (anything with the buffers as attributes or keys)."""
        raise NotImplementedError

    def bind(self, w: Tensor, c: Any) -> Tensor:
        """Model k's term of the superposed sum (complex for the complex kinds)."""
        raise NotImplementedError

    def accumulate(self, acc: Tensor, w: Tensor, c: Any) -> None:
        """acc += bind(w, c), in place: what a K-way bind spends its time on."""
        acc.add_(self.bind(w, c))

    def bind_into(self, out: Tensor, w: Tensor, c: Any) -> None:
        """out = bind(w, c), in place: the first term of a sum, with no zeroing pass before it."""
        out.copy_(self.bind(w, c))

    def retrieve(self, real: Tensor, imag: Tensor | None, c: Any) -> Tensor:
        """Ŵ_k from the superposed matrix (imag: None for the real kinds)."""
        raise NotImplementedError

    def retrieve_onto(self, base: Tensor, real: Tensor, imag: Tensor | None, c: Any) -> Tensor:
        """base + Ŵ_k: a centred tensor retrieved (a new tensor; `base` is not changed)."""
        return base + self.retrieve(real, imag, c)

    def bind_input(self, x: Tensor, c: Any) -> list[Tensor]:
        """The context moved onto the input: y = Σ_j x_j @ W_jᵀ with W = `parts(real, imag)`.

        `c` is the input-side form (`flip` of the weight-side one): C_kᵀ for rotation.
        """
        raise NotImplementedError

    def flip(self, c: Any) -> Any:
        """Between the weight-side and the input-side form of a context (C_k and C_kᵀ)."""
        return c

    def input_buffers(self, ctx: ContextSet, dtype: torch.dtype) -> dict[str, Tensor]:
        """`buffers`, holding input-side forms: stored so, a graph needs no transpose per call."""
        return self.buffers(ctx, dtype)

    def context_bytes(self, K: int, M: int) -> int:
        """Bytes of the stored contexts of one tensor (docs/format.md)."""
        raise NotImplementedError


def _get(buffers: Any, name: str) -> Tensor:
    return buffers[name] if isinstance(buffers, dict) else getattr(buffers, name)


class _Binary(KindOps):
    def buffers(self, ctx: ContextSet, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"signs": ctx.data.to(dtype)}

    def pick(self, buffers: Any, k: int | Tensor) -> Tensor:
        return _get(buffers, "signs")[k]

    def bind(self, w: Tensor, c: Tensor) -> Tensor:
        return w * c.to(w.dtype)

    def accumulate(self, acc: Tensor, w: Tensor, c: Tensor) -> None:
        acc.addcmul_(w, c.to(w.dtype))  # one pass, no temporary; exact as w * c then + (c = ±1)

    def bind_into(self, out: Tensor, w: Tensor, c: Tensor) -> None:
        torch.mul(w, c.to(w.dtype), out=out)

    def retrieve(self, real: Tensor, imag: Tensor | None, c: Tensor) -> Tensor:
        return real * c.to(real.dtype)

    def retrieve_onto(self, base: Tensor, real: Tensor, imag: Tensor | None, c: Tensor) -> Tensor:
        return torch.addcmul(base, real, c.to(real.dtype))  # one pass; exact as base + real * c

    def bind_input(self, x: Tensor, c: Tensor) -> list[Tensor]:
        return [x * c]

    def context_bytes(self, K: int, M: int) -> int:
        return K * math.ceil(M / 8)


class _Rotation(KindOps):
    def buffers(self, ctx: ContextSet, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"rotations": ctx.data.to(dtype)}

    def pick(self, buffers: Any, k: int | Tensor) -> Tensor:
        return _get(buffers, "rotations")[k]

    def bind(self, w: Tensor, c: Tensor) -> Tensor:
        return w @ c.to(w.dtype).T

    def retrieve(self, real: Tensor, imag: Tensor | None, c: Tensor) -> Tensor:
        return real @ c.to(real.dtype)

    def bind_input(self, x: Tensor, c: Tensor) -> list[Tensor]:
        return [x @ c]  # c = C_kᵀ: C_k x, for row vectors

    def flip(self, c: Tensor) -> Tensor:
        return c.T

    def input_buffers(self, ctx: ContextSet, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"rotations": ctx.data.to(dtype).transpose(1, 2).contiguous()}

    def context_bytes(self, K: int, M: int) -> int:
        return 4 * K * M * M


class _Phase(KindOps):
    """complex: c_k = exp(iφ_k). Re(W ⊙ c) = Re W ⊙ cos φ − Im W ⊙ sin φ: no complex product."""

    is_complex = True

    def buffers(self, ctx: ContextSet, dtype: torch.dtype) -> dict[str, Tensor]:
        return {"phases": ctx.data.float()}  # float32: trig of the phases is cheap at O(M)

    def pick(self, buffers: Any, k: int | Tensor) -> Tensor:
        return _get(buffers, "phases")[k]

    @staticmethod
    def _trig(phi: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos φ, sin φ in `dtype`, computed in float32 or wider."""
        phi = phi.to(torch.promote_types(dtype, torch.float32))
        return torch.cos(phi).to(dtype), torch.sin(phi).to(dtype)

    def bind(self, w: Tensor, c: Tensor) -> Tensor:
        cos, sin = torch.cos(c).to(w.dtype), torch.sin(c).to(w.dtype)
        return torch.complex(w * cos, -(w * sin))  # W_k ⊙ conj(c_k)

    def retrieve(self, real: Tensor, imag: Tensor | None, c: Tensor) -> Tensor:
        if imag is None:
            raise TypeError("complex superposition needs a complex tensor")
        cos, sin = self._trig(c, real.dtype)
        return real * cos - imag * sin

    def bind_input(self, x: Tensor, c: Tensor) -> list[Tensor]:
        cos, sin = self._trig(c, x.dtype)
        return [x * cos, x * -sin]  # Re W (cos ⊙ x) + Im W (−sin ⊙ x)

    def context_bytes(self, K: int, M: int) -> int:
        return 4 * K * M


class _OnePower(_Phase):
    """onepower: c_k = exp(ikφ), one phase vector φ [M] for all K contexts."""

    def pick(self, buffers: Any, k: int | Tensor) -> Tensor:
        phases = _get(buffers, "phases")
        if isinstance(
            k, Tensor
        ):  # k·φ in float32 equals ContextSet.phases' float64 product rounded once, k < 2**24
            return k.to(torch.float32) * phases
        return (phases.double() * k).float()

    def context_bytes(self, K: int, M: int) -> int:
        return 4 * M


OPS: dict[Kind, KindOps] = {
    Kind.BINARY: _Binary(),
    Kind.ROTATION: _Rotation(),
    Kind.COMPLEX: _Phase(),
    Kind.ONEPOWER: _OnePower(),
}


def parts(real: Tensor, imag: Tensor | None) -> list[Tensor]:
    """The matrices `bind_input`'s parts multiply: [Re W] or [Re W, Im W]."""
    return [real] if imag is None else [real, imag]
