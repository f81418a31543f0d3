"""Probe, not a feature: would scaling each retrieved delta fix the ensemble suite?

A centred tensor is retrieved as B + R_k with R_k = unbind(Σ_s Δ_s ⊙ c_s, c_k) = Δ_k + N_k,
N_k the other models' interference. The least-squares scale of the retrieved delta,
α_k = ⟨Δ_k, R_k⟩ / ‖R_k‖², gives B + α_k R_k, never further from W_k than B alone nor than
B + R_k (in the norm it is fitted in). Stored, it would cost K numbers per tensor. This script
measures what it would buy on both suites of benchmarks/suites.py, with α fitted on the
weights, on each layer's outputs over the calib inputs, from the η prior
(α = η²‖Δ‖² / (η²‖Δ‖² + ‖N‖²/M)), or from η_Δ, the deltas' own alignment with the calib
inputs, against the mean alone and plain centring: on the ensemble (5 folds of one 6-layer
MLP) for the six weight matrices and for all but the head (kept per context), on the
fine-tunes (8 fine-tunes of one MLP) for its three weights, which the default merge centres.

    python benchmarks/shrinkage_probe.py [--kind binary] [--suite ensemble finetunes]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import base_methods as bm  # noqa: E402
import suites  # noqa: E402

from pspctl.contexts import Kind, make_contexts  # noqa: E402
from pspctl.superpose import bind, unbind  # noqa: E402

ETA = 0.15
METHODS = (
    "mean only",
    "plain",
    "α on weights",
    "α on calib outputs",
    f"α from η {ETA}",
    "α from η_Δ on calib",
)


def probe(name: str, kind: Kind) -> list[dict]:
    build = suites.build_ensemble if name == "ensemble" else suites.build_finetunes
    suite = build(suites.default_dir(name))
    states = suite.states()
    K = len(states)
    evaluate = bm.Evaluation.of(suite, states)
    mean = {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}
    weights = [n for n, t in states[0].items() if n.endswith("weight") and t.dim() == 2]
    weights.sort(key=lambda n: int(n.split(".")[0]))  # layer order (the files' keys are sorted as text)
    calib = [bm.linear_inputs(suite, states[k], suite.data(k, "calib")[0]) for k in range(K)]

    def scale(how: str, name: str, k: int, delta: torch.Tensor, got: torch.Tensor) -> float:
        if how == "plain":
            return 1.0
        if how == "mean only":
            return 0.0
        if how == "α on weights":
            return float((delta * got).sum() / (got * got).sum())
        x = calib[k][name]
        if how == "α on calib outputs":
            want, have = x @ delta.T, x @ got.T
            return float((want * have).sum() / (have * have).sum())
        eta = ETA if how == f"α from η {ETA}" else bm.eta_rms(delta, x)
        signal, noise = eta**2 * float(delta.norm() ** 2), float((got - delta).norm() ** 2) / delta.shape[1]
        return signal / (signal + noise)

    def storage(names: list[str]) -> float:
        """K models' bytes over the file's: base + bound sum (+ K sign bits, or phases) per
        superposed tensor, K copies of the rest; float32."""
        stored = 0
        for n, t in states[0].items():
            if n in names:
                values = 2 if kind.is_complex else 1
                stored += (1 + values) * 4 * t.numel() + K * (
                    t.shape[1] * 4 if values == 2 else math.ceil(t.shape[1] / 8)
                )
            else:
                stored += K * 4 * t.numel()
        return K * sum(4 * t.numel() for t in states[0].values()) / stored

    print(f"\n{name}: alignment with the calib inputs, mean over contexts (η_W: weights, η_Δ: deltas)")
    for n in weights:
        eta_w = sum(bm.eta_rms(states[k][n], calib[k][n]) for k in range(K)) / K
        eta_d = sum(bm.eta_rms(states[k][n] - mean[n], calib[k][n]) for k in range(K)) / K
        print(f"  {n}: η_W {eta_w:.3f}, η_Δ {eta_d:.3f}")
    scopes = (
        (("all six weights", weights), ("all but the head", weights[:-1]))
        if name == "ensemble"
        else (("all three weights", weights),)
    )
    rows = []
    for scope, names in scopes:
        for how in METHODS:
            out = [dict(s) for s in states]
            for n in names:
                deltas = [s[n] - mean[n] for s in states]
                ctx = make_contexts(kind, K, deltas[0].shape[1], 0, n)
                bound = bind(deltas, ctx)
                for k in range(K):
                    got = unbind(bound, ctx, k)
                    out[k][n] = mean[n] + scale(how, n, k, deltas[k], got) * got
            r = bm.averaged([evaluate(out)])
            rows.append({"suite": name, "scope": scope, "method": how, "storage": storage(names)} | r)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="binary", choices=[k.value for k in Kind if k is not Kind.ROTATION])
    parser.add_argument(
        "--suite", nargs="+", default=["ensemble", "finetunes"], choices=["ensemble", "finetunes"]
    )
    args = parser.parse_args(argv)
    rows = []
    for name in args.suite:
        found = probe(name, Kind(args.kind))
        rows += found
        print(f"\n{name} suite, {args.kind} contexts, centred on the models' mean\n")
        quality = "worst fold corr | ensemble corr" if name == "ensemble" else "acc. drop mean / worst (pt)"
        sep = "|---" * (6 if name == "ensemble" else 5)
        print(f"| superposed | storage | retrieval | {quality} | logit rel. err |\n{sep}|")
        for r in found:
            q = (
                f"{r['min_corr']:.4f} | {r['ens_corr']:.4f}"
                if name == "ensemble"
                else f"{r['mean_drop']:+.2f} / {r['worst_drop']:+.2f}"
            )
            print(f"| {r['scope']} | {r['storage']:.2f}× | {r['method']} | {q} | {r['mean_rel_err']:.3f} |")
    return rows


if __name__ == "__main__":
    main()
