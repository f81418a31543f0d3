"""The merge policy: which tensors are superposed and which are stored per context. Pure.

Superposition only pays where its residual is small. The residual of one output unit
relative to its signal is about sqrt((K−1)/M)/η (Proposition 2), so small fan-ins M are
hurt most; embedding lookups index rows instead of summing over M and get no attenuation
at all; and a tensor holding a small share of the parameters saves little when superposed
but, as the output head, feeds its error straight into the logits. See docs/policy.md
for the measurements behind the defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pspctl.superpose import fan_in
from pspctl.types import Role

__all__ = ["Decision", "Policy", "Role", "TensorInfo", "decide"]

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
EMBEDDING_PATTERNS = ("*embed*", "*wte.*", "*wpe.*", "*tok_embeddings*")


@dataclass(frozen=True)
class Policy:
    """Thresholds and overrides for `decide`. `superpose` globs win over everything."""

    max_interference: float = 0.02
    min_share: float = 0.05
    keep: tuple[str, ...] = ()
    superpose: tuple[str, ...] = ()
    origin: str = ""  # who chose keep/superpose, e.g. "measured"; replaces the "--keep"/"--superpose" reason


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class Decision:
    name: str
    role: Role
    reason: str
    fan_in: int
    share: float  # of the model's parameters
    interference: float | None = None  # (K-1)/fan_in for tensors with ≥2 dims: residual variance ratio


def _matches(name: str, globs: Sequence[str]) -> bool:
    return any(fnmatchcase(name, g) for g in globs)


matches_any = _matches  # public: the measured policy (pspctl.planning) matches the same globs


def _rule(info: TensorInfo, interference: float | None, share: float, policy: Policy) -> tuple[Role, str]:
    if info.numel == 0:  # nothing to superpose, and a zero fan-in has no interference ratio
        return Role.PER_CONTEXT, "empty"
    if _matches(info.name, policy.superpose):
        if info.dtype not in FLOAT_DTYPES or len(info.shape) < 2:
            return Role.PER_CONTEXT, "cannot superpose: not a floating tensor with ≥2 dims"
        return Role.SUPERPOSED, policy.origin or "--superpose"
    if _matches(info.name, policy.keep):
        return Role.PER_CONTEXT, policy.origin or "--keep"
    if info.dtype not in FLOAT_DTYPES:
        return Role.PER_CONTEXT, "not floating point"
    if len(info.shape) < 2:
        return Role.PER_CONTEXT, "fewer than 2 dims"
    if _matches(info.name.lower(), EMBEDDING_PATTERNS):
        return Role.PER_CONTEXT, "embedding lookup: no attenuation"
    if interference is not None and interference > policy.max_interference:
        return Role.PER_CONTEXT, f"interference > {policy.max_interference:g}"
    if share < policy.min_share:
        return Role.PER_CONTEXT, f"share < {policy.min_share:.0%}"
    return Role.SUPERPOSED, "default"


def decide(tensors: Sequence[TensorInfo], num_contexts: int, policy: Policy) -> list[Decision]:
    """Decide each tensor's role for a merge of `num_contexts` models.

    Per context: empty tensors, non-floating tensors, tensors with <2 dims, embeddings, tensors whose
    predicted interference (K−1)/fan_in exceeds `policy.max_interference`, tensors under
    `policy.min_share` of the parameters, and `policy.keep` matches. Superposed: the rest,
    plus any `policy.superpose` match.
    """
    total = sum(t.numel for t in tensors) or 1
    decisions = []
    for info in tensors:
        m = fan_in(info.shape)
        interference = (num_contexts - 1) / m if len(info.shape) >= 2 and info.numel else None
        share = info.numel / total
        role, reason = _rule(info, interference, share, policy)
        decisions.append(Decision(info.name, role, reason, m, share, interference))
    return decisions
