"""Context kinds from the paper (Section 4.2 and 5.2), seeded and pure.

A `ContextSet` holds the K contexts of one tensor. Its `data` is the canonical form:

| kind     | data                         | context k                    |
|----------|------------------------------|------------------------------|
| binary   | int8 ±1, shape [K, M]        | c_k = data[k]                |
| complex  | float32 phases, [K, M]       | c_k = exp(i·data[k])         |
| onepower | float32 phases, [M]          | c_k = exp(i·k·data)          |
| rotation | float32 orthogonal, [K, M, M]| C_k = data[k]                |

M is the fan-in: every dim of a weight but dim 0. Nothing here reads a global RNG: each
tensor gets its own `torch.Generator`, seeded from (seed, tensor name) by a hash, so adding
a tensor to a model never changes the contexts of the others.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from pspctl.types import Kind

__all__ = ["ContextSet", "Kind", "derive_seed", "make_contexts"]


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed for one tensor, stable across Python and torch versions."""
    digest = hashlib.sha256(f"pspctl/{seed}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


@dataclass(frozen=True)
class ContextSet:
    """The K contexts of one tensor; see the module docstring for `data`'s layout."""

    kind: Kind
    num_contexts: int
    fan_in: int
    data: Tensor

    def __post_init__(self) -> None:
        K, M = self.num_contexts, self.fan_in
        expected = {
            Kind.BINARY: (K, M),
            Kind.COMPLEX: (K, M),
            Kind.ONEPOWER: (M,),
            Kind.ROTATION: (K, M, M),
        }[self.kind]
        if tuple(self.data.shape) != expected:
            raise ValueError(
                f"{self.kind.value} contexts need shape {expected}, got {tuple(self.data.shape)}"
            )

    def _check(self, k: int) -> None:
        if not 0 <= k < self.num_contexts:
            raise IndexError(f"context {k} out of range 0..{self.num_contexts - 1}")

    def phases(self, k: int) -> Tensor:
        """φ_k, float32 [M], for the complex kinds."""
        self._check(k)
        if self.kind is Kind.COMPLEX:
            return self.data[k]
        if self.kind is Kind.ONEPOWER:
            # Multiply in float64 so that k·φ keeps its precision for large k.
            return (self.data.double() * k).float()
        raise TypeError(f"{self.kind.value} contexts have no phases")

    def vector(self, k: int) -> Tensor:
        """c_k as a vector: float32 ±1 for binary, complex64 exp(iφ_k) for the complex kinds."""
        self._check(k)
        if self.kind is Kind.BINARY:
            return self.data[k].float()
        if self.kind.is_complex:
            return torch.polar(torch.ones(self.fan_in), self.phases(k))
        raise TypeError("rotation contexts are matrices; use matrix(k)")

    def matrix(self, k: int) -> Tensor:
        """C_k, float32 [M, M], for rotation contexts."""
        self._check(k)
        if self.kind is not Kind.ROTATION:
            raise TypeError(f"{self.kind.value} contexts are vectors; use vector(k)")
        return self.data[k]

    def stored(self) -> Tensor:
        """The compact on-disk form: binary as packed bits (uint8 [K, ceil(M/8)]), others as is."""
        if self.kind is Kind.BINARY:
            bits = (self.data > 0).to(torch.uint8)
            pad = (-self.fan_in) % 8
            bits = torch.nn.functional.pad(bits, (0, pad)).reshape(self.num_contexts, -1, 8)
            weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)
            return (bits * weights).sum(-1, dtype=torch.uint8)  # MSB first, like numpy.packbits
        return self.data.contiguous()

    @classmethod
    def from_stored(cls, kind: Kind | str, num_contexts: int, fan_in: int, stored: Tensor) -> ContextSet:
        """Inverse of `stored()`."""
        kind = Kind(kind)
        if kind is Kind.BINARY:
            shifts = torch.tensor([7, 6, 5, 4, 3, 2, 1, 0], dtype=torch.uint8)
            bits = (stored.unsqueeze(-1) >> shifts) & 1
            bits = bits.reshape(num_contexts, -1)[:, :fan_in]
            return cls(kind, num_contexts, fan_in, (bits.to(torch.int8) * 2 - 1))
        return cls(kind, num_contexts, fan_in, stored.float())


def _haar_orthogonal(num: int, size: int, gen: torch.Generator) -> Tensor:
    """Haar-random orthogonal matrices by QR with the sign fix (Mezzadri, 2006)."""
    gauss = torch.randn(num, size, size, generator=gen, dtype=torch.float64)
    q, r = torch.linalg.qr(gauss)
    # Without the sign fix, QR's convention biases the distribution away from Haar.
    signs = torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))
    signs[signs == 0] = 1
    return (q * signs.unsqueeze(-2)).float()


def make_contexts(kind: Kind | str, num_contexts: int, fan_in: int, seed: int, name: str = "") -> ContextSet:
    """Draw K contexts for one tensor of fan-in M, deterministic in (seed, name).

    Args:
        kind: binary, complex, rotation or onepower.
        num_contexts: K >= 1.
        fan_in: M >= 1, the product of the weight's dims after dim 0.
        seed: the user's seed.
        name: the tensor's name, so that different tensors get independent contexts.
    """
    kind = Kind(kind)
    if num_contexts < 1 or fan_in < 1:
        raise ValueError("num_contexts and fan_in must be positive")
    gen = torch.Generator().manual_seed(derive_seed(seed, name))
    K, M = num_contexts, fan_in
    if kind is Kind.BINARY:
        data = torch.randint(0, 2, (K, M), generator=gen, dtype=torch.int8) * 2 - 1
    elif kind is Kind.COMPLEX:
        data = ((torch.rand(K, M, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi).float()
    elif kind is Kind.ONEPOWER:
        data = ((torch.rand(M, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi).float()
    else:
        data = _haar_orthogonal(K, M, gen)
    return ContextSet(kind, K, M, data)
