"""Probe, not a feature: would scaling each retrieved delta fix the ensemble suite?

A centred tensor is retrieved as B + R_k with R_k = unbind(Σ_s Δ_s ⊙ c_s, c_k) = Δ_k + N_k,
N_k the other models' interference. The least-squares scale of the retrieved delta,
α_k = ⟨Δ_k, R_k⟩ / ‖R_k‖², gives B + α_k R_k, never further from W_k than B alone nor than
B + R_k (in the norm it is fitted in). Stored, it would cost K numbers per tensor. This script
measures on the ensemble suite (benchmarks/suites.py: 5 folds of one 6-layer MLP) what it would
buy, with α fitted on the weights, on each layer's outputs over the calib inputs, or from the
η prior (α = η²‖Δ‖² / (η²‖Δ‖² + ‖N‖²/M)), against the mean alone and plain centring, for
the six weight matrices and for all but the head (kept per context).

    python benchmarks/shrinkage_probe.py [--kind binary]
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", default="binary", choices=[k.value for k in Kind if k is not Kind.ROTATION])
    args = parser.parse_args(argv)
    suite = suites.build_ensemble(suites.default_dir("ensemble"))
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
        if how == "α on calib outputs":
            x = calib[k][name]
            want, have = x @ delta.T, x @ got.T
            return float((want * have).sum() / (have * have).sum())
        signal, noise = ETA**2 * float(delta.norm() ** 2), float((got - delta).norm() ** 2) / delta.shape[1]
        return signal / (signal + noise)  # "α from the η prior"

    def storage(names: list[str]) -> float:
        """K models' bytes over the file's: base + bound sum (+ K sign bits, or phases) per
        superposed tensor, K copies of the rest; float32."""
        stored = 0
        for n, t in states[0].items():
            if n in names:
                values = 2 if Kind(args.kind).is_complex else 1
                stored += (1 + values) * 4 * t.numel() + K * (
                    t.shape[1] * 4 if values == 2 else -(-t.shape[1] // 8)
                )
            else:
                stored += K * 4 * t.numel()
        return K * sum(4 * t.numel() for t in states[0].values()) / stored

    rows = []
    for scope, names in (("all six weights", weights), ("all but the head", weights[:-1])):
        for how in ("mean only", "plain", "α on weights", "α on calib outputs", f"α from η {ETA}"):
            out = [dict(s) for s in states]
            for name in names:
                deltas = [s[name] - mean[name] for s in states]
                ctx = make_contexts(Kind(args.kind), K, deltas[0].shape[1], 0, name)
                bound = bind(deltas, ctx)
                for k in range(K):
                    got = unbind(bound, ctx, k)
                    out[k][name] = mean[name] + scale(how, name, k, deltas[k], got) * got
            r = evaluate(out)
            rows.append({"scope": scope, "method": how, "storage": storage(names),
                         "min_corr": min(c["corr"] for c in r["contexts"]), "ens_corr": r["ens_corr"]})  # fmt: skip
    print(f"ensemble suite, K = {K}, {args.kind} contexts, centred on the folds' mean\n")
    print("| superposed | storage | retrieval | worst fold corr | ensemble corr |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['scope']} | {r['storage']:.2f}× | {r['method']} | {r['min_corr']:.4f} | {r['ens_corr']:.4f} |"
        )
    return rows


if __name__ == "__main__":
    main()
