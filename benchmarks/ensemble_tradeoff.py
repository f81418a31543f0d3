"""Issue 13's ensemble target (K=5 folds: every fold corr ≥ 0.98, ensemble ≥ 0.995, storage
≥ 2.2×): the best trade-offs pspctl's merge reaches, storage against the worst fold.

Tries, on the ensemble suite (benchmarks/suites.py, unchanged): binary, complex and onepower
contexts; the η prior against η measured on the calib split (`merge --task`); budgets
`--max-error` 0.2 … 2; and `tune` (distilled from the originals) after the merges that reach
2.2×. Every row also gives magnitude-pruned deltas from the mean in the same bytes.

    python benchmarks/ensemble_tradeoff.py [--small] [--tune-steps 300] [--tune-lr 1e-4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import base_methods as bm  # noqa: E402
from benchmarks import suites  # noqa: E402
from benchmarks.base_superposition import (  # noqa: E402
    Method,
    choices,
    pruned_same_bytes,
    retrieved,
    run_merge,
    suite_task,
    summarise,
)
from pspctl.training.tune import TuneOptions, tune  # noqa: E402

KINDS = ("binary", "complex", "onepower")
MAX_ERRORS = (0.2, 0.3, 0.5, 0.8, 1.2, 2.0)
TARGET = {"min_corr": 0.98, "ens_corr": 0.995, "ratio": 2.2}


def met(r: dict) -> bool:
    return (
        r["min_corr"] >= TARGET["min_corr"]
        and r["ens_corr"] >= TARGET["ens_corr"]
        and r["ratio"] >= TARGET["ratio"]
    )


def run(small: bool = False, tune_steps: int = 300, tune_lr: float = 1e-4) -> list[dict]:
    torch.set_num_threads(1)
    suite = suites.build("ensemble", suites.default_dir("ensemble", small=small), small=small)
    states = suite.states()
    K = len(states)
    evaluation = bm.Evaluation.of(suite, states)
    mean = bm.centres(states, None)["mean"]
    mean_bytes = sum(t.numel() * bm.VALUE_BYTES for t in mean.values())
    rows, seen = [], set()
    with tempfile.TemporaryDirectory() as tmp:
        for kind in KINDS:
            for calib in (False, True):
                for e in MAX_ERRORS:
                    out = Path(tmp) / "w.safetensors"
                    rep = run_merge(suite, Method("x", kind, max_error=e, calib=calib), out)
                    key = (kind, choices(rep), tuple(d.centre for d in rep.decisions))
                    eta = "measured" if calib else "prior 0.15"
                    row = {"kind": kind, "eta": eta, "max_error": e, "ratio": rep.storage_ratio,
                           "tensors": choices(rep), "tuned": 0}  # fmt: skip
                    if key in seen:
                        continue  # the same choice as a smaller budget: the same file
                    seen.add(key)
                    row |= summarise(suite, evaluation(retrieved(out, K)))
                    row["pruned"] = summarise(
                        suite, evaluation(pruned_same_bytes(states, mean, rep.output_bytes - mean_bytes))
                    )
                    rows.append(row)
                    if tune_steps and rep.storage_ratio >= TARGET["ratio"]:
                        tuned = Path(tmp) / "t.safetensors"
                        tune(
                            out,
                            suite_task(suite),
                            tuned,
                            TuneOptions(steps=tune_steps, lr=tune_lr),
                            force=True,
                        )
                        rows.append(
                            row | summarise(suite, evaluation(retrieved(tuned, K))) | {"tuned": tune_steps}
                        )
    return rows


def render(rows: list[dict]) -> str:
    lines = [
        "| kind | η | --max-error | tune steps | tensors | storage | worst fold corr | ensemble corr | target | "
        "pruned Δ, same bytes: worst / ensemble |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (-r["ratio"], -r["min_corr"])):
        p = r["pruned"]
        lines.append(
            f"| {r['kind']} | {r['eta']} | {r['max_error']:g} | {r['tuned'] or ''} | {r['tensors']} | "
            f"{r['ratio']:.2f}× | {r['min_corr']:.4f} | {r['ens_corr']:.4f} | {'MET' if met(r) else ''} | "
            f"{p['min_corr']:.4f} / {p['ens_corr']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true")
    p.add_argument("--tune-steps", type=int, default=300)
    p.add_argument("--tune-lr", type=float, default=1e-4)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    start = time.perf_counter()
    rows = run(args.small, args.tune_steps, args.tune_lr)
    print(render(rows))
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
