"""Prototype of `merge --base` (issue 13) on the two suites of benchmarks/suites.py.

Superposing K near-identical models directly leaves noise proportional to ‖W‖ in every
retrieval. Centring on a base B (the parent, or the inputs' mean) superposes only the
deltas: S = Σ_k (W_k − B) ⊙ c_k, Ŵ_k = B + unbind(S, c_k). This script measures, with
pspctl's pure core only (`make_contexts`, `bind`, `unbind`, `predicted_output_error`; the
plans, retrieval and byte counts are in benchmarks/base_methods.py):

- per layer: the alignment η, Proposition 2's predicted relative output error and the
  measured one, for plain and centred superposition;
- end to end, per method and kind: accuracy (original vs retrieved), relative logit
  error, output correlation, averaged-ensemble correlation and the storage ratio;
- the same-bytes baseline: magnitude pruning of the deltas;
- a sweep of the budget of `--base auto` (per tensor the cheapest of none / mean / per
  context whose predicted error, with the η prior, is within the budget);
- how close the models must be: the same merges with every delta shrunk by a factor α;
- `pspctl merge` with its current default policy, for comparison.

    python benchmarks/base_prototype.py            # the numbers in docs/base-prototype.md
    python benchmarks/base_prototype.py --small    # the reduced suites, a quick look

Formulas and their derivation: docs/base-prototype.md.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import suites  # noqa: E402
from benchmarks.base_methods import (  # noqa: E402
    ETA_PRIOR,
    KINDS,
    Evaluation,
    Plan,
    auto_plan,
    averaged,
    centres,
    contexts_for,
    deltas,
    describe,
    eta_rms,
    linear_inputs,
    predicted_errors,
    predicted_total,
    prune_same_bytes,
    retrieve,
    rms,
    storage,
    superposable,
    uniform_plan,
)
from benchmarks.suites import StateDict, Suite  # noqa: E402
from pspctl.contexts import Kind  # noqa: E402
from pspctl.superpose import bind, fan_in, unbind  # noqa: E402

BUDGETS = (0.02, 0.03, 0.05, 0.07, 0.1, 0.15, 0.2, 0.22, 0.25, 0.3)
DEFAULT_BUDGET = 0.1
SCALES = (1.0, 0.75, 0.5, 0.35, 0.25)  # synthetic: the deltas from the mean, shrunk


# --- Per-layer: η, predicted and measured error ----------------------------------------------


def layer_rows(
    suite: Suite, states: list[StateDict], bases: dict[str, StateDict], seeds: range
) -> list[dict]:
    """Per Linear weight, centre and kind: Proposition 2's prediction against the measured error.

    Inputs are the *original* model k's activations on its calibration data, so one layer's
    error does not compound into the next (as `pspctl analyze` does).
    """
    K = len(states)
    acts = [linear_inputs(suite, s, suite.data(k, "calib")[0]) for k, s in enumerate(states)]
    rows = []
    for name in acts[0]:
        weights = [s[name] for s in states]
        xs = [a[name] for a in acts]
        signal = [float((x @ w.T).pow(2).sum()) for w, x in zip(weights, xs, strict=True)]
        etas = [eta_rms(w, x) for w, x in zip(weights, xs, strict=True)]
        for centre in ("none", *bases):
            ds = deltas(states, bases, name, centre)
            rel = rms([float(d.norm() / w.norm()) for d, w in zip(ds, weights, strict=True)])
            # Exact expectation over the contexts, column by column: E‖e_k‖² = v Σ_{s≠k} Σ_i ‖D_s[:,i]‖² Σ_p x_pi².
            col = [d.pow(2).sum(0) for d in ds]
            for kind in KINDS:
                v = Kind(kind).variance_factor
                expected = [math.sqrt(v * float(sum(c for j, c in enumerate(col) if j != k) @ xs[k].pow(2).sum(0))
                                      / signal[k]) for k in range(K)]  # fmt: skip
                measured = []
                for seed in seeds:
                    ctx = contexts_for(name, weights[0], kind, K, seed)
                    S = bind(ds, ctx)
                    for k in range(K):
                        err = (unbind(S, ctx, k) - ds[k]) @ xs[k].T
                        measured.append(math.sqrt(float(err.pow(2).sum()) / signal[k]))
                rows.append({"layer": name, "fan_in": fan_in(weights[0].shape), "centre": centre, "kind": kind,
                             "rel_delta": rel, "eta": statistics.fmean(etas), "eta_min": min(etas),
                             "predicted": rms(predicted_errors(weights, ds, kind, etas)),
                             "predicted_prior": rms(predicted_errors(weights, ds, kind, ETA_PRIOR)),
                             "expected": rms(expected), "measured": rms(measured)})  # fmt: skip
    return rows


# --- End to end ------------------------------------------------------------------------------


@dataclass
class Bench:
    suite: Suite
    states: list[StateDict]
    bases: dict[str, StateDict]
    evaluation: Evaluation
    seeds: range

    def run(self, label: str, plan: Plan, kind: str, *, prune: bool = True) -> dict:
        """Mean over context seeds of the retrieval metrics, the storage, and the pruning baseline."""
        runs = [self.evaluation(retrieve(self.states, self.bases, plan, kind, s)) for s in self.seeds]
        result = {"label": label, "kind": kind, "plan": describe(plan)} | averaged(runs)
        result |= storage(self.states, plan, kind)
        result["predicted_total"] = predicted_total(self.states, self.bases, plan, kind)
        if prune:
            pruned = averaged([self.evaluation(prune_same_bytes(self.states, self.bases, plan, kind))])
            result["pruned"] = pruned
        return result


def current_policy(bench: Bench, tmp: Path) -> dict:
    """`pspctl merge` with its default policy (binary), then `extract --context all`, evaluated."""
    out, ext = tmp / f"{bench.suite.name}.safetensors", tmp / f"{bench.suite.name}-extracted"
    cmd = [
        sys.executable,
        "-m",
        "pspctl",
        "merge",
        *map(str, bench.suite.paths),
        "-o",
        str(out),
        "-q",
        "--json",
    ]
    report = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    subprocess.run([sys.executable, "-m", "pspctl", "extract", str(out), "-c", "all", "-o", str(ext)],
                   check=True, capture_output=True)  # fmt: skip
    retrieved = [load_file(str(ext / f"{p.stem}.safetensors")) for p in bench.suite.paths]
    superposed = [t["name"] for t in report["tensors"] if t["role"] == "superposed"]
    reasons = sorted({t["reason"] for t in report["tensors"] if t["role"] != "superposed"})
    return {"label": "pspctl merge (default policy)", "kind": "binary", "ratio": report["storage_ratio"],
            "superposed": superposed, "reasons": reasons} | averaged([bench.evaluation(retrieved)])  # fmt: skip


def quality_ok(suite: str, r: dict) -> bool:
    """The issue's accuracy / correlation targets (meant for kind binary)."""
    if suite == "finetunes":
        return r["mean_drop"] <= 1.0 and r["worst_drop"] <= 2.0
    return r["min_corr"] >= 0.98 and r["ens_corr"] >= 0.995


def storage_ok(suite: str, r: dict) -> bool:
    """Fine-tunes: ≥ 3.5× with the base stored and ≥ 7× with it linked; ensemble: ≥ 2.2×."""
    if suite == "finetunes":
        # A mean cannot be linked (it is new), so plans using one answer to 3.5× alone.
        return r["ratio"] >= 3.5 and r.get("ratio_linked", 7.0) >= 7.0
    return r["ratio"] >= 2.2


# --- Report ------------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list]) -> str:
    cells = [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in cells])


def layer_table(rows: list[dict]) -> str:
    header = ["layer", "M", "centre", "kind", "‖D‖/‖W‖", "η (mean)", "η (min)", "predicted (η measured)",
              f"predicted (η={ETA_PRIOR})", "expected (per column)", "measured", "measured/predicted"]  # fmt: skip
    return _table(header, [[r["layer"], r["fan_in"], r["centre"], r["kind"], r["rel_delta"], r["eta"], r["eta_min"],
                            r["predicted"], r["predicted_prior"], r["expected"], r["measured"],
                            f"{r['measured'] / r['predicted']:.2f}"] for r in rows])  # fmt: skip


def method_table(suite: str, results: list[dict]) -> str:
    rows = []
    for r in results:
        linked = f"{r['ratio_linked']:.2f}×" if "ratio_linked" in r else "–"
        row = [r["label"], r["kind"], r.get("plan", ", ".join(r.get("superposed", [])) or "nothing superposed"),
               f"{r['ratio']:.2f}×", linked]  # fmt: skip
        p = r.get("pruned")
        total = f"{r['predicted_total']:.3f}" if "predicted_total" in r else "–"
        if suite == "finetunes":
            row += [
                f"{r['mean_drop']:+.2f}",
                f"{r['worst_drop']:+.2f}",
                r["mean_rel_err"],
                r["max_rel_err"],
                total,
            ]
            row += [f"{p['mean_drop']:+.2f} / {p['worst_drop']:+.2f}" if p else "–"]
        else:
            row += [r["min_corr"], f"{r['ens_corr']:.4f}", r["mean_rel_err"], r["max_rel_err"], total,
                    f"{r['ens_acc_orig']:.1f} → {r['ens_acc']:.1f}"]  # fmt: skip
            row += [f"{p['min_corr']:.3f} / {p['ens_corr']:.4f}" if p else "–"]
        row += ["yes" if quality_ok(suite, r) else "no", "yes" if storage_ok(suite, r) else "no"]
        rows.append(row)
    if suite == "finetunes":
        header = ["method", "kind", "tensors", "ratio (base stored)", "ratio (base linked)", "acc. drop mean",
                  "worst", "logit err mean", "max", "predicted (quadrature)", "pruned Δ, same bytes: drop mean / worst"]  # fmt: skip
    else:
        header = ["method", "kind", "tensors", "ratio (base stored)", "ratio (base linked)", "min fold corr",
                  "averaged corr", "logit err mean", "max", "predicted (quadrature)", "ensemble acc.", "pruned Δ, same bytes: min corr / avg corr"]  # fmt: skip
    return _table(header + ["quality target", "storage target"], rows)


def condensed(sweep: list[dict]) -> list[dict]:
    """Consecutive budgets that chose the same tensors, as one row labelled with the budget range."""
    rows: list[dict] = []
    for r in sweep:
        prev = rows[-1] if rows else None
        if prev and (prev["kind"], prev["centre"], prev["plan"]) == (r["kind"], r["centre"], r["plan"]):
            prev["label"] = f"auto ({r['centre']}), budget {prev['budget']:g}–{r['budget']:g}"
        else:
            rows.append(dict(r))
    return rows


def scaled_table(suite: str, rows: list[dict]) -> str:
    names = list(rows[0]["rel_delta"])
    quality = ["acc. drop mean", "worst"] if suite == "finetunes" else ["min fold corr", "averaged corr"]
    out = []
    for r in rows:
        q = ([f"{r['mean_drop']:+.2f}", f"{r['worst_drop']:+.2f}"] if suite == "finetunes"
             else [f"{r['min_corr']:.3f}", f"{r['ens_corr']:.4f}"])  # fmt: skip
        out.append([f"{r['alpha']:g}", *[f"{r['rel_delta'][n]:.3f}" for n in names], r["label"], r["plan"], f"{r['ratio']:.2f}×",
                    r["mean_rel_err"], *q, "yes" if quality_ok(suite, r) else "no"])  # fmt: skip
    header = [
        "α",
        *[f"‖D‖/‖W‖ {n}" for n in names],
        "method",
        "tensors",
        "ratio",
        "logit err",
        *quality,
        "quality target",
    ]
    return _table(header, out)


def eta_table(rows: list[dict]) -> str:
    """η per layer: mean and min over contexts, and η·√M (1 for inputs unrelated to the weights)."""
    return _table(["layer", "M", "η (mean)", "η (min)", "η·√M"],
                  [[r["layer"], r["fan_in"], r["eta"], r["eta_min"], f"{r['eta'] * math.sqrt(r['fan_in']):.2f}"]
                   for r in rows if r["centre"] == "none" and r["kind"] == "binary"])  # fmt: skip


def context_table(suite: str, r: dict) -> str:
    p = r["pruned"]["contexts"]
    rows = [[k, f"{c['acc_orig']:.1f}", f"{c['acc']:.1f}", f"{p[k]['acc']:.1f}", f"{c['corr']:.4f}",
             f"{p[k]['corr']:.4f}", c["rel_err"], p[k]["rel_err"]] for k, c in enumerate(r["contexts"])]  # fmt: skip
    return _table(["context", "acc. original", "acc. retrieved", "acc. pruned Δ", "corr", "corr pruned",
                   "logit err", "logit err pruned"], rows)  # fmt: skip


def scaled_rows(suite: Suite, states: list[StateDict], seeds: range) -> list[dict]:
    """How close must the models be? Shrink every model towards the mean, W_k' = B + α(W_k − B),
    take those as the originals, and merge them (binary): every weight around the mean, and
    the auto choice at the default budget and one step above it."""
    mean = centres(states, None)["mean"]
    names = sorted((n for n in mean if superposable(mean[n])), key=lambda n: int(n.split(".")[0]))
    rows = []
    for alpha in SCALES:
        close = [{n: mean[n] + alpha * (s[n] - mean[n]) for n in s} for s in states]
        bench = Bench(suite, close, {"mean": mean}, Evaluation.of(suite, close), seeds)
        rel = {n: rms([float((c[n] - mean[n]).norm() / c[n].norm()) for c in close]) for n in names}
        plans = {"all weights, mean": uniform_plan(close, "mean")}
        for budget in (DEFAULT_BUDGET, 0.15):
            plans[f"auto (mean), budget {budget:g}"] = auto_plan(close, {"mean": mean}, "binary", budget)
        for label, plan in plans.items():
            rows.append(bench.run(label, plan, "binary", prune=False) | {"alpha": alpha, "rel_delta": rel})
    return rows


def run_suite(suite: Suite, seeds: range, budgets: tuple[float, ...], tmp: Path) -> dict:
    states, parent = suite.states(), suite.base_state()
    bases = centres(states, parent)
    bench = Bench(suite, states, bases, Evaluation.of(suite, states), seeds)
    out: dict = {"suite": suite.name, "timings": {}}
    clock = time.perf_counter()
    out["layers"] = layer_rows(suite, states, bases, seeds)
    out["timings"]["layers_s"], clock = time.perf_counter() - clock, time.perf_counter()
    methods = []
    for kind in KINDS:
        for centre in ("none", *bases):
            methods.append(bench.run(f"all weights, centre {centre}", uniform_plan(states, centre), kind))
        for centre in bases:
            plan = auto_plan(states, bases, kind, DEFAULT_BUDGET, centre)
            methods.append(bench.run(f"auto ({centre}), budget {DEFAULT_BUDGET:g}", plan, kind))
    out["methods"] = methods
    out["timings"]["methods_s"], clock = time.perf_counter() - clock, time.perf_counter()
    out["current_policy"] = current_policy(bench, tmp)
    out["timings"]["pspctl_merge_s"], clock = time.perf_counter() - clock, time.perf_counter()
    sweep = []
    for kind in KINDS:
        for centre in bases:
            for budget in budgets:
                plan = auto_plan(states, bases, kind, budget, centre)
                row = bench.run(f"auto ({centre}), budget {budget:g}", plan, kind)
                sweep.append(row | {"budget": budget, "centre": centre})
    out["sweep"] = sweep
    out["timings"]["sweep_s"], clock = time.perf_counter() - clock, time.perf_counter()
    out["scaled"] = scaled_rows(suite, states, seeds)
    out["timings"]["scaled_s"] = time.perf_counter() - clock
    return out


def _quality(suite: str, r: dict) -> str:
    if suite == "finetunes":
        return f"accuracy drop mean {r['mean_drop']:+.2f} / worst {r['worst_drop']:+.2f} points"
    return f"fold corr ≥ {r['min_corr']:.3f}, averaged {r['ens_corr']:.4f}"


def verdict(suite: str, r: dict) -> list[str]:
    """For kind binary: the most storage that keeps the quality target, the best quality that
    reaches the storage target, and magnitude-pruned deltas at those bytes."""
    rows = [m for m in [*r["methods"], *condensed(r["sweep"])] if m["kind"] == "binary"]
    lines = []
    good = [m for m in rows if quality_ok(suite, m)]
    if good:
        m = max(good, key=lambda m: (m["ratio"], m.get("ratio_linked", 0.0)))
        linked = f", {m['ratio_linked']:.2f}× linked" if "ratio_linked" in m else ""
        lines.append(f"- most storage with the quality target met: {m['label']} ({m['plan']}): "
                     f"{m['ratio']:.2f}×{linked}; {_quality(suite, m)}; storage target {'met' if storage_ok(suite, m) else 'NOT met'}")  # fmt: skip
    big = [m for m in rows if storage_ok(suite, m)]
    if big:
        key = (lambda m: m["worst_drop"]) if suite == "finetunes" else (lambda m: -m["min_corr"])
        m = min(big, key=key)
        lines.append(f"- best quality with the storage target met: {m['label']} ({m['plan']}): {m['ratio']:.2f}×; "
                     f"{_quality(suite, m)}; quality target {'met' if quality_ok(suite, m) else 'NOT met'}")  # fmt: skip
        p = m["pruned"]
        lines.append(f"- magnitude-pruned deltas in the same bytes: {_quality(suite, p)}; "
                     f"quality target {'met' if quality_ok(suite, p) else 'NOT met'}")  # fmt: skip
    return lines


def print_suite(suite: Suite, r: dict) -> None:
    print(f"\n## {suite.name}{' (small)' if suite.config.small else ''}\n")
    print(suites.summary(suite))
    print("\n### η on calibration inputs\n")
    print(eta_table(r["layers"]))
    print("\n### Per layer (inputs: the original's activations; measured = RMS over contexts and seeds)\n")
    print(layer_table(r["layers"]))
    print("\n### Methods\n")
    print(method_table(suite.name, [*r["methods"], r["current_policy"]]))
    if reasons := r["current_policy"]["reasons"]:
        print(f"\npspctl merge kept per context because: {'; '.join(reasons)}")
    print("\n### Budget sweep of --base auto\n")
    print(method_table(suite.name, condensed(r["sweep"])))
    for label in (f"auto (mean), budget {DEFAULT_BUDGET:g}", "all weights, centre mean"):
        row = next(m for m in r["methods"] if m["kind"] == "binary" and m["label"] == label)
        print(f"\n### Per context: {label}, binary ({row['plan']})\n")
        print(context_table(suite.name, row))
    print("\n### How close must the models be? (synthetic: deltas from the mean × α; binary)\n")
    print(scaled_table(suite.name, r["scaled"]))
    print("\n### Targets (binary)\n")
    print("\n".join(verdict(suite.name, r)))
    timings = ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items())
    print(f"\ntimings (s): {timings}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", help=f"any of {', '.join(suites.SUITES)} (default: all)")
    p.add_argument("--small", action="store_true", help="the reduced suites")
    p.add_argument("--seeds", type=int, default=3, help="context seeds to average")
    p.add_argument(
        "--data", type=Path, default=suites.DEFAULT_DIR, help="where the suites are (built if missing)"
    )
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument("--threads", type=int, default=1, help="torch threads (2 is slower here)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.suites or suites.SUITES:
            start = time.perf_counter()
            suite = suites.build(
                name, args.data / (f"{name}-small" if args.small else name), small=args.small
            )
            build_s = time.perf_counter() - start
            results[name] = run_suite(suite, range(args.seeds), BUDGETS, Path(tmp))
            results[name]["timings"] = {"build_or_cache_s": build_s} | results[name]["timings"]
            print_suite(suite, results[name])
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
