"""The merge policy: which tensors are superposed and which are stored per context. Pure.

Superposition only pays where its residual is small. The residual of one output unit
relative to its signal is about sqrt((K−1)/M)/η (Proposition 2), so small fan-ins M are
hurt most; embedding lookups index rows instead of summing over M and get no attenuation
at all; and a tensor holding a small share of the parameters saves little when superposed
but, as the output head, feeds its error straight into the logits. See docs/policy.md
for the measurements behind the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from pspctl.errors import InputError
from pspctl.superpose import fan_in
from pspctl.types import (
    CONV_ETA_PRIOR,
    ETA_PRIOR,
    MAX_ERROR,
    TRAIN_MAX_INTERFERENCE,
    TRAIN_MIN_SHARE,
    Kind,
    Role,
)

__all__ = [
    "Decision",
    "Option",
    "Policy",
    "Role",
    "TensorInfo",
    "choose",
    "decide",
    "predicted_errors",
    "prior_eta",
]

FLOAT_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64"})
EMBEDDING_PATTERNS = (
    "*embed*", "*wte.*", "*wpe.*", "*tok_embeddings*",
    "*relative_attention_bias.*",  # T5's bucketed position bias, an nn.Embedding
    "*relative_position_bias_table*",  # Swin's, indexed by relative position
    # ViT/DeiT/DINOv2 tokens, added as they are (HF's and timm's names)
    "*cls_token*", "*mask_token*", "*distillation_token*", "*dist_token*", "*reg_token*", "*register_tokens*",
)  # fmt: skip


@dataclass(frozen=True)
class Policy:
    """Thresholds and overrides for `decide` and `choose`. `superpose` globs win over everything.

    `max_interference` and `min_share` are the shape rules of earlier versions, off unless set
    (training in superposition, which has no weights to measure yet, still uses them).
    """

    max_interference: float | None = None
    min_share: float = 0.0
    keep: tuple[str, ...] = ()
    superpose: tuple[str, ...] = ()
    origin: str = ""  # who chose keep/superpose, e.g. "measured"; replaces the "--keep"/"--superpose" reason
    max_error: float = MAX_ERROR
    eta: float | None = None  # the η prior for every tensor; None: `prior_eta`'s, by shape
    # (name, centre) pairs: a superposed tensor stored on this centre ("none", "mean", "base")
    # whatever the budget would pick, as `--policy measured` measured it.
    centres: tuple[tuple[str, str], ...] = ()
    # Globs of matrices that are embedding tables whatever their names say: merge adds an HF
    # encoder-decoder's token table, which save_pretrained keeps as `shared.weight`.
    lookups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        """Refuse what no prediction can use: the (0, 1] bounds of η (an alignment, a cosine)
        and a negative or NaN budget (infinite is no budget, as `SHAPE_RULES`)."""
        if not self.max_error >= 0:  # NaN fails this too
            raise InputError(f"--max-error {self.max_error:g}: expected a number ≥ 0")
        if self.eta is not None and not 0 < self.eta <= 1:
            raise InputError(f"--eta {self.eta:g}: η, the alignment of inputs with weights, is in (0, 1]")
        if self.max_interference is not None and not self.max_interference >= 0:
            raise InputError(f"--max-interference {self.max_interference:g}: expected a number ≥ 0")
        if not 0 <= self.min_share <= 1:
            raise InputError(f"--min-share {self.min_share:g}: expected a share in [0, 1]")

    def prior(self, shape: Sequence[int]) -> float:
        """The η to predict a tensor of this shape with where nothing measured it."""
        return prior_eta(shape) if self.eta is None else self.eta

    def priors(self) -> dict[str, float]:
        """The prior for a matrix and for a convolution kernel, as merge's JSON records them."""
        return {"matrix": self.prior((1, 1)), "conv": self.prior((1, 1, 1))}

    def prior_text(self) -> str:
        """The prior, as notes name it."""
        if self.eta is not None:
            return f"--eta {self.eta:g}"
        return "prior {matrix:g} ({conv:g} for convolution kernels)".format(**self.priors())


def prior_eta(shape: Sequence[int]) -> float:
    """The η prior: a convolution kernel (≥3 dims) sees inputs less aligned with its weights
    than a matrix does (docs/policy.md: ResNet-18's 3×3 convolutions measured 0.026–0.053, 1×1
    convolutions in ResNet-18 and MobileNetV3 0.044–0.18, MLP and transformer matrices
    0.15–0.25), so it gets a prior at or below every convolution measured."""
    return CONV_ETA_PRIOR if len(shape) >= 3 else ETA_PRIOR


# The shape rules of earlier versions alone, no error budget: what training uses (it has no
# weights yet to predict errors from), and the plain-superposition setting benchmarks compare.
SHAPE_RULES = Policy(max_interference=TRAIN_MAX_INTERFERENCE, min_share=TRAIN_MIN_SHARE, max_error=math.inf)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"
    fan_in_axis: int | None = None  # the fan-in axis (pspctl.architectures); None: every dim but 0

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
    centre: str = "none"  # superposed: what the sum is centred on, "none", "mean" or "base"
    error: float | None = None  # superposed: predicted relative output error, worst context
    forced: bool = False  # --superpose: superposed whatever its error
    eta: float | None = None  # candidates: the η predicted with (the smallest over contexts)
    eta_source: str | None = None  # "calib" (measured on the task's calib inputs) or "prior" (--eta)


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
    if is_table(info.name, info.shape, policy.lookups):
        return Role.PER_CONTEXT, "embedding lookup: no attenuation"
    if (
        policy.max_interference is not None
        and interference is not None
        and interference > policy.max_interference
    ):
        return Role.PER_CONTEXT, f"interference > {policy.max_interference:g}"
    if share < policy.min_share:
        return Role.PER_CONTEXT, f"share < {policy.min_share:.0%}"
    return Role.SUPERPOSED, "candidate"


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
        m = fan_in(info.shape, info.fan_in_axis)
        interference = (num_contexts - 1) / m if len(info.shape) >= 2 and info.numel else None
        share = info.numel / total
        role, reason = _rule(info, interference, share, policy)
        forced = role is Role.SUPERPOSED and reason != "candidate"
        decisions.append(Decision(info.name, role, reason, m, share, interference, forced=forced))
    return decisions


def is_lookup(name: str) -> bool:
    """A name that looks like an embedding's (`EMBEDDING_PATTERNS`)."""
    return _matches(name.lower(), EMBEDDING_PATTERNS)


def is_table(name: str, shape: Sequence[int], lookups: Sequence[str] = ()) -> bool:
    """An embedding, by name and shape: a lookup table (a matrix, read a row at a time) or one
    added to the activations as it is (ViT's `position_embeddings` [1, tokens, D] and
    `cls_token` [1, 1, D], broadcast over the batch). Nothing sums over either's "fan-in",
    so its residual reaches the activations unattenuated. A convolution named like one (a
    ViT's patch embedding, [D, C, k, k]) is no table. `lookups`: globs of matrices that are
    tables whatever their names say (`Policy.lookups`)."""
    if len(shape) == 2 and _matches(name, lookups):
        return True
    return is_lookup(name) and (len(shape) == 2 or (len(shape) >= 3 and shape[0] == 1))


def predicted_errors(
    kind: Kind | str,
    fan_in: int,
    eta: float | Sequence[float],
    w_sq: Sequence[float],
    d_sq: Sequence[float],
    *,
    lookup: bool = False,
) -> list[float]:
    """Proposition 2 with the norms of what is actually superposed, per context k:

        err_k = sqrt(v · Σ_{s≠k} ‖D_s‖² / M) / (η ‖W_k‖)

    where D_s is model s's superposed term (W_s, or W_s − B with a base B), W_k model k's
    weight, v the kind's variance factor, M the fan-in and η the alignment of inputs with the
    weights: one prior for every context, or η_k per context (measured on model k's inputs).
    A lookup table (`lookup`) reads rows: no 1/M attenuation and no η. `merge` (to choose)
    and `analyze` (to compare with the measured error) both predict with this function.
    """
    v = Kind(kind).variance_factor
    total = sum(d_sq)
    etas = [float(eta)] * len(w_sq) if isinstance(eta, int | float) else list(eta)
    out = []
    for w, d, e in zip(w_sq, d_sq, etas, strict=True):
        rest = max(total - d, 0.0)
        if rest == 0:  # nothing else superposed: no interference
            out.append(0.0)
            continue
        # 1/(M η²) as two divisions: a tiny η (1e-200, or none measured) gives inf, not 0/0.
        scale = 1.0 if lookup else (1.0 / fan_in / e / e if e > 0 else math.inf)
        out.append(math.sqrt(v * rest * scale / w) if w > 0 else math.inf)
    return out


@dataclass(frozen=True)
class Option:
    """One way to store a tensor: `centre` "none"/"mean"/"base", or "" for per context."""

    centre: str
    error: float  # worst context's predicted error; 0 per context
    nbytes: int
    per_context: tuple[float, ...] = ()  # the predicted error of each context


def choose(
    options: Mapping[str, Sequence[Option]],
    forced: Sequence[str],
    budget: float,
    centres: Mapping[str, str] | None = None,
) -> dict[str, Option]:
    """Per tensor, the option that spends fewest bytes while the combined predicted error
    sqrt(Σ_t err_t²) stays within `budget`. `centres`: a forced tensor's centre, where given.

    A Lagrangian relaxation: each tensor takes argmin bytes + λ·err², with the smallest λ (by
    bisection) that meets the budget. Per-context options (error 0) always meet it; tensors in
    `forced` have no per-context option and count towards the budget all the same.

    When the forced tensors alone exceed the budget whatever their centre, λ no longer prices
    anything (it would buy any error reduction at any cost): each forced tensor then takes the
    option with the least error × bytes (a centre must cut the error by more than it multiplies
    the bytes), and every other tensor stays per context.
    """
    forced_set = set(forced) & set(options)
    pinned = centres or {}

    def centred(name: str) -> list[Option]:
        superposed = [o for o in options[name] if o.centre]
        return [o for o in superposed if o.centre == pinned.get(name)] or superposed or list(options[name])

    def pick(lam: float) -> dict[str, Option]:
        out = {}
        for name, opts in options.items():
            allowed = centred(name) if name in forced_set else list(opts)
            out[name] = min(allowed, key=lambda o: (o.nbytes + lam * o.error**2, o.error))
        return out

    def total(chosen: Mapping[str, Option]) -> float:
        return math.sqrt(sum(o.error**2 for o in chosen.values() if math.isfinite(o.error)))

    floor = math.sqrt(sum(min(o.error for o in centred(n)) ** 2 for n in forced_set))
    if math.isfinite(floor) and floor > budget:
        return {
            name: min(centred(name), key=lambda o: (o.error * o.nbytes, o.error))
            if name in forced_set
            else min(opts, key=lambda o: (o.error, o.nbytes))
            for name, opts in options.items()
        }
    best = pick(0.0)
    if total(best) <= budget:
        return best
    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e30:
        lo, hi = hi, hi * 16
    for _ in range(60):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 2
        if total(pick(mid)) > budget:
            lo = mid
        else:
            hi = mid
    return pick(hi)
