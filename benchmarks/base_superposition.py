"""The real `pspctl merge --base` on the issue-13 suites, against the issue's targets.

For each suite (benchmarks/suites.py) this runs pspctl's own merge (python API) with
`--base auto` (the default), `--base mean`, and for the fine-tunes `--base PATH` (the parent)
stored and `--link-base`, each with binary and complex contexts; then `pspctl tune` (distilled
from the originals) on the default binary fine-tunes merge; and the same-budget baseline:
magnitude-pruned deltas from the same base in the merge's bytes. It prints one table per
suite, the targets with PASS/FAIL measured in this run, and a sweep of the policy's
`max_error` and `eta` for the default binary merge.

    python benchmarks/base_superposition.py                 # full suites (built/cached)
    python benchmarks/base_superposition.py --small         # CI smoke test (small suites)
    python benchmarks/base_superposition.py --json out.json
    python benchmarks/base_superposition.py --kinds binary complex rotation onepower --no-sweep
    python benchmarks/base_superposition.py --ensemble-hidden 1024 --kinds binary   # a wider ensemble
    python benchmarks/base_superposition.py --kinds binary --no-sweep --measured 0.15 0.2 0.3

Accuracies are on the 450-image test split (one image = 0.22 points). CPU, one thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import base_methods as bm  # noqa: E402
from benchmarks import suites  # noqa: E402
from benchmarks.suites import StateDict, Suite  # noqa: E402
from pspctl.fileformat import SuperposedFile  # noqa: E402
from pspctl.merge import MergeOptions, MergeReport, merge  # noqa: E402
from pspctl.planning import policy_for_merge  # noqa: E402
from pspctl.policy import Policy  # noqa: E402
from pspctl.task import Task  # noqa: E402
from pspctl.training.tune import TuneOptions, tune  # noqa: E402

MAX_ERRORS = (0.1, 0.2, 0.3, 0.5)
ALL_KINDS = ("binary", "complex", "rotation", "onepower")
ETAS = (0.15, 0.2, 0.25)
TARGETS = {  # the targets
    "finetunes": {
        "mean_drop": 1.0,
        "worst_drop": 2.0,
        "tuned_mean_drop": 0.3,
        "ratio": 3.5,
        "ratio_linked": 7.0,
    },
    "ensemble": {"min_corr": 0.98, "ens_corr": 0.995, "ratio": 2.2},
}


@dataclass(frozen=True)
class Method:
    label: str
    kind: str
    base: str = "auto"  # auto, mean, none, parent
    link: bool = False
    max_error: float | None = None  # None: pspctl's default
    eta: float | None = None
    calib: bool = False  # merge --task: η measured on the suite's calib inputs
    measured: float | None = None  # merge --task --policy measured --max-drop 100 --max-output-error E


def methods(
    suite: Suite, kinds: tuple[str, ...] = bm.KINDS, measured: tuple[float, ...] = ()
) -> list[Method]:
    out = []
    for kind in kinds:
        out += [Method(f"--policy measured --max-output-error {e:g} ({kind})", kind, calib=True, measured=e)
                for e in measured]  # fmt: skip
        out += [Method(f"--base auto ({kind})", kind), Method(f"--base mean ({kind})", kind, "mean")]
        out.append(Method(f"--base auto --task, η measured ({kind})", kind, calib=True))
        if suite.base is not None:
            out += [Method(f"--base PATH ({kind})", kind, "parent"),
                    Method(f"--base PATH --link-base ({kind})", kind, "parent", link=True)]  # fmt: skip
    return out


TASK_FILE = """import sys
sys.path.insert(0, {root!r})
from benchmarks import suites

_suite = suites.build({name!r}, {directory!r}, small={small!r}, hidden={hidden!r})
BATCH = suites.BATCH


def build_model():
    return _suite.model()


def load_data(k, split):
    x, y = _suite.data(k, split)
    return [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, len(x), BATCH)]
"""


def task_file(suite: Suite) -> Path:
    """A task file for `merge --task` (η on the calib split), written beside the suite."""
    path = suite.directory / "task.py"
    root = str(Path(__file__).resolve().parents[1])
    text = TASK_FILE.format(
        root=root, name=suite.name, directory=str(suite.directory), small=suite.config.small,
        hidden=None if suite.config == suites.config(suite.name, small=suite.config.small) else suite.config.hidden,
    )  # fmt: skip
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
    return path


def run_merge(suite: Suite, m: Method, out: Path) -> MergeReport:
    policy = Policy()
    if m.max_error is not None:
        policy = Policy(max_error=m.max_error, eta=policy.eta if m.eta is None else m.eta)
    elif m.eta is not None:
        policy = Policy(eta=m.eta)
    base = str(suite.base) if m.base == "parent" else m.base
    task = str(task_file(suite)) if m.calib else None
    options = MergeOptions(kind=m.kind, base=base, link_base=m.link, policy=policy, force=True, task=task)
    paths = [str(p) for p in suite.paths]
    if m.measured is not None:
        chosen, _ = policy_for_merge(paths, options, max_drop=100.0, max_output_error=m.measured)
        options = replace(options, policy=chosen)
    return merge(paths, out, options)


def retrieved(path: Path, K: int) -> list[StateDict]:
    f = SuperposedFile(path)
    return [{n: t.float() for n, t in f.state_dict(k).items()} for k in range(K)]


def pruned_same_bytes(states: list[StateDict], base: StateDict, budget: int) -> list[StateDict]:
    """DARE/TIES-style baseline: per context keep the largest |W_k − B| entries of every tensor,
    one density for all tensors, in `budget` bytes (values float32 + an index each)."""
    K = len(states)
    per_entry = sum(t.numel() * (bm.VALUE_BYTES + bm.index_bytes(t.numel())) for t in base.values())
    density = max(0.0, min(1.0, budget / (K * per_entry)))
    out = []
    for s in states:
        kept = {}
        for n, b in base.items():
            d = (s[n] - b).flatten()
            keep = int(density * d.numel())
            sparse = torch.zeros_like(d)
            if keep > 0:
                top = d.abs().topk(keep).indices
                sparse[top] = d[top]
            kept[n] = b + sparse.reshape(b.shape)
        out.append(kept)
    return out


def summarise(suite: Suite, r: dict) -> dict:
    """The table's numbers from an Evaluation result."""
    ctx = r["contexts"]
    drops = [c["acc_orig"] - c["acc"] for c in ctx]
    row = {"mean_drop": statistics.fmean(drops), "worst_drop": max(drops),
           "min_corr": min(c["corr"] for c in ctx), "mean_rel_err": statistics.fmean(c["rel_err"] for c in ctx)}  # fmt: skip
    if suite.name == "ensemble":
        row |= {"ens_corr": r["ens_corr"], "ens_acc": r["ens_acc"], "ens_acc_orig": r["ens_acc_orig"]}
    return row


def suite_task(suite: Suite) -> Task:
    def load_data(k: int, split: str):
        x, y = suite.data(k, split)
        return [(x[i : i + suites.BATCH], y[i : i + suites.BATCH]) for i in range(0, len(x), suites.BATCH)]

    return Task(source=f"<suite {suite.name}>", build_model=suite.model, load_data=load_data)


def choices(report: MergeReport) -> str:
    counts: dict[str, int] = {}
    for d in report.decisions:
        key = d.role.value + (f" {d.centre}" if d.role.value == "superposed" else "")
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))


def run_suite(
    suite: Suite,
    tmp: Path,
    *,
    sweep: bool = True,
    tune_steps: int = 300,
    kinds: tuple[str, ...] = bm.KINDS,
    measured: tuple[float, ...] = (),
) -> dict:
    torch.set_num_threads(1)
    states = suite.states()
    K = len(states)
    evaluation = bm.Evaluation.of(suite, states)
    parent = suite.base_state()
    mean = bm.centres(states, None)["mean"]
    rows = []
    default_path = None
    for i, m in enumerate(methods(suite, kinds, measured)):
        out = tmp / f"{suite.name}-{i}.safetensors"
        start = time.perf_counter()
        rep = run_merge(suite, m, out)
        merge_s = time.perf_counter() - start
        row = {"method": m.label, "kind": m.kind, "ratio": rep.storage_ratio, "tensors": choices(rep),
               "predicted": max(rep.predicted_error or [0.0]), "merge_s": merge_s}  # fmt: skip
        row |= summarise(suite, evaluation(retrieved(out, K)))
        # The same bytes on magnitude-pruned deltas from the same base (the parent for PATH,
        # the mean otherwise; a linked parent costs nothing, like the merge's).
        base = parent if m.base == "parent" else mean
        base_bytes = 0 if m.link else sum(t.numel() * bm.VALUE_BYTES for t in base.values())
        pruned = pruned_same_bytes(states, base, rep.output_bytes - base_bytes)
        row["pruned"] = summarise(suite, evaluation(pruned))
        rows.append(row)
        if m.base == "auto" and m.kind == "binary" and not m.calib and m.measured is None:
            default_path = out
    result: dict = {"suite": suite.name, "small": suite.config.small, "rows": rows}
    if suite.name == "finetunes" and default_path is not None and tune_steps:
        tuned = tmp / "finetunes-tuned.safetensors"
        start = time.perf_counter()
        tune(default_path, suite_task(suite), tuned, TuneOptions(steps=tune_steps, lr=1e-4), force=True)
        tune_s = time.perf_counter() - start
        row = {"method": f"--base auto (binary) + tune {tune_steps} steps", "kind": "binary",
               "ratio": rows[0]["ratio"], "tensors": rows[0]["tensors"], "predicted": float("nan"), "merge_s": tune_s}  # fmt: skip
        row |= summarise(suite, evaluation(retrieved(tuned, K)))
        row["pruned"] = rows[0]["pruned"]
        result["tuned"] = row
    if sweep:
        grid = [(e, h) for e in MAX_ERRORS for h in ETAS]
        result["sweep"] = []
        for e, h in grid:
            out = tmp / f"{suite.name}-sweep.safetensors"
            rep = run_merge(suite, Method("sweep", "binary", max_error=e, eta=h), out)
            row = {"max_error": e, "eta": h, "ratio": rep.storage_ratio, "tensors": choices(rep)}
            row |= summarise(suite, evaluation(retrieved(out, K)))
            base_bytes = sum(t.numel() * bm.VALUE_BYTES for t in mean.values())
            row["pruned"] = summarise(
                suite, evaluation(pruned_same_bytes(states, mean, rep.output_bytes - base_bytes))
            )
            result["sweep"].append(row)
    return result


def targets(result: dict) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for the default binary merge, measured in this run."""
    rows = {r["method"]: r for r in result["rows"]}
    default = rows["--base auto (binary)"]
    if result["suite"] == "finetunes":
        t = TARGETS["finetunes"]
        out = [
            ("mean drop ≤ 1 pt", default["mean_drop"] <= t["mean_drop"], f"{default['mean_drop']:+.2f}"),
            ("worst drop ≤ 2 pt", default["worst_drop"] <= t["worst_drop"], f"{default['worst_drop']:+.2f}"),
            ("storage ≥ 3.5× (base stored)", default["ratio"] >= t["ratio"], f"{default['ratio']:.2f}×"),
        ]
        if "tuned" in result:
            d = result["tuned"]["mean_drop"]
            out.append(("after tune mean drop ≤ 0.3 pt", d <= t["tuned_mean_drop"], f"{d:+.2f}"))
        linked = rows.get("--base PATH --link-base (binary)")
        if linked:
            out.append(
                (
                    "storage ≥ 7× (--link-base)",
                    linked["ratio"] >= t["ratio_linked"],
                    f"{linked['ratio']:.2f}×",
                )
            )
        return out
    t = TARGETS["ensemble"]
    return [
        ("every fold corr ≥ 0.98", default["min_corr"] >= t["min_corr"], f"{default['min_corr']:.4f}"),
        ("ensemble corr ≥ 0.995", default["ens_corr"] >= t["ens_corr"], f"{default['ens_corr']:.4f}"),
        ("storage ≥ 2.2×", default["ratio"] >= t["ratio"], f"{default['ratio']:.2f}×"),
    ]


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join([*lines, *("| " + " | ".join(str(c) for c in r) + " |" for r in rows)])


def _quality(suite: str, r: dict) -> str:
    if suite == "finetunes":
        return f"{r['mean_drop']:+.2f} / {r['worst_drop']:+.2f}"
    return f"{r['min_corr']:.4f} / {r['ens_corr']:.4f}"


def render(result: dict) -> str:
    s = result["suite"]
    q = "acc. drop mean / worst (pt)" if s == "finetunes" else "min fold corr / ensemble corr"
    rows = result["rows"] + ([result["tuned"]] if "tuned" in result else [])
    body = [[r["method"], r["tensors"], f"{r['ratio']:.2f}×", _quality(s, r), f"{r['mean_rel_err']:.3f}",
             f"{r['predicted']:.3f}", _quality(s, r["pruned"]), f"{r['merge_s']:.2f}"] for r in rows]  # fmt: skip
    text = [f"## {s}{' (small)' if result['small'] else ''}", "",
            _table(["method", "tensors", "storage", q, "logit rel. err", "predicted (max ctx)",
                    f"pruned Δ, same bytes: {q}", "merge/tune s"], body), ""]  # fmt: skip
    text += ["Targets (default binary merge, this run):", ""]
    text += [f"- {name}: {'PASS' if ok else 'FAIL'} ({got})" for name, ok, got in targets(result)]
    if "sweep" in result:
        text += ["", "Sweep of the default binary merge (--max-error, --eta):", ""]
        text.append(_table(["max_error", "eta", "tensors", "storage", q, "pruned Δ, same bytes"],
                           [[r["max_error"], r["eta"], r["tensors"], f"{r['ratio']:.2f}×", _quality(s, r),
                             _quality(s, r["pruned"])] for r in result["sweep"]]))  # fmt: skip
    return "\n".join(text) + "\n"


def run(
    small: bool = False,
    *,
    sweep: bool = True,
    tune_steps: int | None = None,
    out: Path | None = None,
    kinds: tuple[str, ...] = bm.KINDS,
    ensemble_hidden: int | None = None,
    measured: tuple[float, ...] = (),
) -> list[dict]:
    """Build (or reuse) both suites and measure everything; returns one result per suite.
    `ensemble_hidden`: only the ensemble, with hidden layers this wide."""
    results = []
    names = ("ensemble",) if ensemble_hidden else suites.SUITES
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            directory = suites.default_dir(name, small=small, hidden=ensemble_hidden)
            directory = (out / directory.name) if out else directory
            suite = suites.build(name, directory, small=small, hidden=ensemble_hidden)
            steps = tune_steps if tune_steps is not None else (100 if small else 300)
            results.append(
                run_suite(suite, Path(tmp), sweep=sweep, tune_steps=steps, kinds=kinds, measured=measured)
            )
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="the small suites (CI smoke test)")
    p.add_argument("--no-sweep", action="store_true", help="skip the max_error × eta sweep")
    p.add_argument("--tune-steps", type=int, default=None, help="tune steps (default 300, small 100)")
    p.add_argument("--json", type=Path, help="write every number here")
    p.add_argument(
        "--kinds", nargs="+", default=list(bm.KINDS), choices=ALL_KINDS, help="context kinds to merge with"
    )
    p.add_argument(
        "--ensemble-hidden",
        type=int,
        metavar="N",
        help="only the ensemble, its hidden layers N wide (e.g. 512, 1024)",
    )
    p.add_argument(
        "--measured", type=float, nargs="+", default=[], metavar="E",
        help="also merge with --task --policy measured --max-drop 100 --max-output-error E",
    )  # fmt: skip
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = run(
        args.small, sweep=not args.no_sweep, tune_steps=args.tune_steps, kinds=tuple(args.kinds),
        ensemble_hidden=args.ensemble_hidden, measured=tuple(args.measured),
    )  # fmt: skip
    for r in results:
        print(render(r))
    print(f"total {time.perf_counter() - start:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
