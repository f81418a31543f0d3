"""The pure parts of the `merge --base` prototype: per-tensor plans, retrieval, storage, metrics.

A plan says for every tensor how it is stored: superposed around a centre ("none", the
inputs' "mean", or the "parent"), per context, or shared. `retrieve` gives back what a merge
with that plan would; `prune_same_bytes` is the baseline that spends the same bytes on
magnitude-pruned deltas; `storage` counts the bytes; `Evaluation` compares each context's
logits with its original's. Only pspctl's pure core is used (`make_contexts`, `bind`,
`unbind`, `predicted_output_error`); benchmarks/base_prototype.py runs it on the suites, and
docs/base-prototype.md derives the formulas.
"""

from __future__ import annotations

import math
import statistics
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import suites  # noqa: E402
from benchmarks.suites import StateDict, Suite  # noqa: E402
from pspctl.contexts import ContextSet, Kind, make_contexts  # noqa: E402
from pspctl.superpose import bind, fan_in, predicted_output_error, unbind  # noqa: E402

KINDS = ("binary", "complex")
ETA_PRIOR = 0.15  # see docs/base-prototype.md: at or below every η measured on both suites' layers
VALUE_BYTES = 4  # float32

# --- What is stored: a plan per tensor -------------------------------------------------------


@dataclass(frozen=True)
class Choice:
    """How one tensor is stored: role "superposed", "per_context" or "shared"; centre "none", "mean", "parent"."""

    role: str
    centre: str = "none"


Plan = dict[str, Choice]


def superposable(t: Tensor) -> bool:
    return t.is_floating_point() and t.dim() >= 2


def uniform_plan(states: list[StateDict], centre: str) -> Plan:
    """Every ≥2-d weight superposed around `centre`; biases per context (the paper's setting)."""
    return {
        n: Choice("superposed", centre) if superposable(t) else Choice("per_context")
        for n, t in states[0].items()
    }


def centres(states: list[StateDict], parent: StateDict | None) -> dict[str, StateDict]:
    """The bases a plan may name: the inputs' mean and, when there is one, the parent."""
    mean = {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}
    return {"mean": mean} | ({"parent": parent} if parent is not None else {})


def deltas(states: list[StateDict], bases: dict[str, StateDict], name: str, centre: str) -> list[Tensor]:
    """What gets superposed for tensor `name`: W_k, or W_k − B."""
    if centre == "none":
        return [s[name] for s in states]
    return [s[name] - bases[centre][name] for s in states]


def predicted_errors(
    weights: list[Tensor], ds: list[Tensor], kind: str, eta: float | list[float]
) -> list[float]:
    """Per context k: Proposition 2 with the norms of what is superposed (docs/base-prototype.md).

    err_k = sqrt(v·(K−1)/M)/η_k · sqrt(mean_{s≠k} ‖D_s‖²)/‖W_k‖, i.e. pspctl's
    `predicted_output_error` scaled by the superposed deltas' RMS norm relative to W_k.
    """
    K, M = len(ds), fan_in(ds[0].shape)
    sq = [float(d.double().pow(2).sum()) for d in ds]
    etas = eta if isinstance(eta, list) else [eta] * K
    out = []
    for k in range(K):
        others = (sum(sq) - sq[k]) / max(K - 1, 1)
        ratio = math.sqrt(max(others, 0.0)) / max(float(weights[k].norm()), 1e-30)
        out.append(predicted_output_error(kind, K, M, etas[k]) * ratio)
    return out


def tensor_bytes(t: Tensor, choice: Choice, kind: str, K: int) -> tuple[int, int]:
    """(bytes stored for this tensor, of which base bytes), at float32 values.

    A superposed tensor costs its values (complex: two floats each) plus its contexts as
    pspctl stores them (binary: packed bits, K·⌈M/8⌉; complex: K·M float32 phases).
    """
    n = t.numel()
    if choice.role == "per_context":
        return K * n * VALUE_BYTES, 0
    if choice.role == "shared":
        return n * VALUE_BYTES, 0
    M = fan_in(t.shape)
    ctx = K * math.ceil(M / 8) if kind == "binary" else K * M * 4
    values = n * VALUE_BYTES * (2 if Kind(kind).is_complex else 1)
    base = n * VALUE_BYTES if choice.centre != "none" else 0
    return values + ctx + base, base


def auto_plan(states: list[StateDict], bases: dict[str, StateDict], kind: str, budget: float,
              centre: str = "mean", eta: float = ETA_PRIOR) -> Plan:  # fmt: skip
    """`--base auto`: per tensor, the fewest bytes among none / `centre` / per context whose
    worst predicted error (η prior) is within `budget`; biases per context; equal tensors shared."""
    K = len(states)
    plan: Plan = {}
    for n, t in states[0].items():
        if all(torch.equal(s[n], t) for s in states[1:]):
            plan[n] = Choice("shared")
            continue
        if not superposable(t):
            plan[n] = Choice("per_context")
            continue
        weights = [s[n] for s in states]
        options = [Choice("per_context")]
        for c in ("none", centre):
            if max(predicted_errors(weights, deltas(states, bases, n, c), kind, eta)) <= budget:
                options.append(Choice("superposed", c))
        plan[n] = min(options, key=lambda ch: tensor_bytes(t, ch, kind, K)[0])
    return plan


# --- Retrieval: superposition, and pruning at the same bytes ----------------------------------


def contexts_for(name: str, t: Tensor, kind: str, K: int, seed: int) -> ContextSet:
    return make_contexts(kind, K, fan_in(t.shape), seed, name)


def retrieve(states: list[StateDict], bases: dict[str, StateDict], plan: Plan, kind: str,
             seed: int) -> list[StateDict]:  # fmt: skip
    """Each context's weights as a merge with `plan` would give them back."""
    K = len(states)
    out: list[StateDict] = [dict(s) for s in states]
    for n, choice in plan.items():
        if choice.role != "superposed":
            continue  # per context and shared tensors come back exactly
        ctx = contexts_for(n, states[0][n], kind, K, seed)
        ds = deltas(states, bases, n, choice.centre)
        S = bind(ds, ctx)
        for k in range(K):
            back = unbind(S, ctx, k).to(states[k][n].dtype)
            out[k][n] = back if choice.centre == "none" else bases[choice.centre][n] + back
    return out


def index_bytes(numel: int) -> int:
    """The narrowest standard integer that addresses every entry (uint16 up to 65,536)."""
    return 2 if numel <= 2**16 else 4


def prune_same_bytes(states: list[StateDict], bases: dict[str, StateDict], plan: Plan,
                     kind: str) -> list[StateDict]:  # fmt: skip
    """The baseline: for each superposed tensor, keep per context the largest |W_k − B| entries
    (B the plan's centre, 0 for none) in the bytes the superposed values and contexts take."""
    K = len(states)
    out: list[StateDict] = [dict(s) for s in states]
    for n, choice in plan.items():
        if choice.role != "superposed":
            continue
        t = states[0][n]
        stored, base_bytes = tensor_bytes(t, choice, kind, K)
        keep = int((stored - base_bytes) / K // (VALUE_BYTES + index_bytes(t.numel())))
        base = bases[choice.centre][n] if choice.centre != "none" else torch.zeros_like(t)
        for k, d in enumerate(deltas(states, bases, n, choice.centre)):
            flat = d.flatten()
            kept = torch.zeros_like(flat)
            if keep > 0:
                top = flat.abs().topk(min(keep, flat.numel())).indices
                kept[top] = flat[top]
            out[k][n] = base + kept.reshape(t.shape)
    return out


def storage(states: list[StateDict], plan: Plan, kind: str) -> dict[str, float]:
    """K inputs' bytes over stored bytes; "ratio_linked" leaves out the parent, which exists
    already and can be linked rather than stored (a mean cannot: it is new)."""
    K = len(states)
    inputs = K * sum(t.numel() * VALUE_BYTES for t in states[0].values())
    stored = parent = 0
    for n, choice in plan.items():
        b, bb = tensor_bytes(states[0][n], choice, kind, K)
        stored += b
        parent += bb if choice.centre == "parent" else 0
    out = {"ratio": inputs / stored}
    uses_mean = any(c.role == "superposed" and c.centre == "mean" for c in plan.values())
    return out if uses_mean else out | {"ratio_linked": inputs / (stored - parent)}


def predicted_total(states: list[StateDict], bases: dict[str, StateDict], plan: Plan, kind: str) -> float:
    """sqrt(Σ err_t²) over the superposed tensors (worst context, η prior): if the layers'
    errors added up independently, the relative error of the logits."""
    total = 0.0
    for n, choice in plan.items():
        if choice.role == "superposed":
            weights = [s[n] for s in states]
            total += (
                max(predicted_errors(weights, deltas(states, bases, n, choice.centre), kind, ETA_PRIOR)) ** 2
            )
    return math.sqrt(total)


# --- Measurements -------------------------------------------------------------------------------


def linear_inputs(suite: Suite, state: StateDict, x: Tensor) -> dict[str, Tensor]:
    """The input of every Linear layer when `state` runs on x, keyed by its weight's name."""
    model = suite.model()
    model.load_state_dict(state)
    out = {}
    with torch.no_grad():
        for i, layer in enumerate(model):
            if isinstance(layer, torch.nn.Linear):
                out[f"{i}.weight"] = x
            x = layer(x)
    return out


def eta_rms(w: Tensor, x: Tensor) -> float:
    """η² = ‖W x‖²/(‖W‖_F²‖x‖²), sums over the batch: the energy-weighted RMS of the paper's cos(w_i, x)."""
    return math.sqrt(float((x @ w.T).pow(2).sum() / (w.pow(2).sum() * x.pow(2).sum())))


def logits(suite: Suite, state: StateDict, x: Tensor) -> Tensor:
    """The model's outputs with `state`'s tensors, without building a model per call."""
    with torch.no_grad():
        return functional_call(_model(suite.config), state, (x,))


@lru_cache(maxsize=4)
def _model(cfg: suites.SuiteConfig) -> torch.nn.Module:
    return suites.make_model(cfg).eval()


def corr(a: Tensor, b: Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack([a, b]))[0, 1])


@dataclass
class Evaluation:
    """Outputs of every context's original model on its test inputs, to compare retrievals with."""

    suite: Suite
    inputs: list[tuple[Tensor, Tensor]]
    original: list[Tensor]

    @classmethod
    def of(cls, suite: Suite, states: list[StateDict]) -> Evaluation:
        inputs = [suite.data(k, "test") for k in range(len(states))]
        return cls(suite, inputs, [logits(suite, s, x) for s, (x, _) in zip(states, inputs, strict=True)])

    def __call__(self, retrieved: list[StateDict]) -> dict:
        rows = []
        outs = []
        for k, state in enumerate(retrieved):
            (x, y), orig = self.inputs[k], self.original[k]
            out = logits(self.suite, state, x)
            outs.append(out)
            rows.append({"acc_orig": _acc(orig, y), "acc": _acc(out, y), "corr": corr(out, orig),
                         "rel_err": float((out - orig).norm() / orig.norm())})  # fmt: skip
        result: dict = {"contexts": rows}
        if self.suite.name == "ensemble":  # every fold sees the same test inputs
            y = self.inputs[0][1]
            avg, avg_orig = torch.stack(outs).mean(0), torch.stack(self.original).mean(0)
            result |= {
                "ens_corr": corr(avg, avg_orig),
                "ens_acc": _acc(avg, y),
                "ens_acc_orig": _acc(avg_orig, y),
            }
        return result


def _acc(out: Tensor, y: Tensor) -> float:
    return 100.0 * float((out.argmax(1) == y).float().mean())


def averaged(results: list[dict]) -> dict:
    """The mean over context seeds of every number, per context; then the summary numbers."""
    first = results[0]
    rows = [{f: statistics.fmean(r["contexts"][k][f] for r in results) for f in first["contexts"][k]}
            for k in range(len(first["contexts"]))]  # fmt: skip
    out = {f: statistics.fmean(r[f] for r in results) for f in first if f != "contexts"}
    drops = [r["acc_orig"] - r["acc"] for r in rows]
    return out | {"contexts": rows, "mean_drop": statistics.fmean(drops), "worst_drop": max(drops),
                  "min_corr": min(r["corr"] for r in rows), "mean_rel_err": statistics.fmean(r["rel_err"] for r in rows),
                  "max_rel_err": max(r["rel_err"] for r in rows)}  # fmt: skip


def describe(plan: Plan) -> str:
    """e.g. "3 mean, 3 per-context": how many tensors each choice got."""
    counts: dict[str, int] = {}
    for c in plan.values():
        key = c.centre if c.role == "superposed" else c.role.replace("_", "-")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in counts.items())


def rms(values: list[float]) -> float:
    return math.sqrt(statistics.fmean(v * v for v in values))
