"""The paper's Table 2 on permuted scikit-learn digits: K tasks in sequence, mean accuracy at the end.

A two-hidden-layer MLP learns K permutations of the digits one after another (the paper's
online protocol, `pspctl.training.train`), once as a standard network, once per context
kind in superposition, and, as the reference, once as K separate networks, one per task.
Nothing is downloaded: the data is the sample task's (samples/digits_task.py), optionally
upsampled from 8×8 to 28×28 so that the first layer's fan-in is MNIST's 784.

    python benchmarks/permuted_digits.py                       # the settings in docs/training.md
    python benchmarks/permuted_digits.py --width 128 --steps 50 --no-upsample   # a quick look

Superposition covers every weight (as in the paper); biases stay per context.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pspctl.policy import Policy  # noqa: E402
from pspctl.task import Task  # noqa: E402
from pspctl.training import TrainOptions, train  # noqa: E402
from samples import digits_task  # noqa: E402

KINDS = ("binary", "complex", "onepower", "rotation")
BATCH = 64


@lru_cache(maxsize=4)
def _base(split: str, upsample: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Task 0's (unpermuted, standardized) images and labels, 64 or 784 pixels each."""
    batches = list(digits_task.load_data(0, split))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    if upsample:
        x = F.interpolate(x.reshape(-1, 1, 8, 8), size=(28, 28), mode="bilinear", align_corners=False)
        x = x.reshape(len(x), -1)
    return x, y


def _permutation(context: int, size: int) -> torch.Tensor:
    if size == 64:  # exactly the sample task's permutations
        return torch.from_numpy(digits_task.permutation(context))
    if context == 0:
        return torch.arange(size)
    return torch.from_numpy(np.random.default_rng([digits_task.SEED, size, context]).permutation(size))


def make_task(width: int, upsample: bool, offset: int = 0) -> Task:
    """The permuted-digits task; `offset` maps context 0 to task `offset` (separate networks)."""
    fan_in = 784 if upsample else 64

    def build_model() -> nn.Module:
        return nn.Sequential(
            nn.Linear(fan_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )

    def load_data(context: int, split: str):
        x, y = _base(split, upsample)
        x = x[:, _permutation(context + offset, fan_in)]
        step = BATCH if split == "train" else len(x)
        return [(x[i : i + step], y[i : i + step]) for i in range(0, len(x), step)]

    return Task(source=f"permuted digits ({fan_in} px)", build_model=build_model, load_data=load_data)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    base = dict(num_contexts=args.tasks, steps=args.steps, lr=args.lr, seed=args.seed)
    everything = Policy(superpose=("*weight",))
    results: dict[str, dict] = {}
    methods = ["standard", *args.kinds, "separate"]
    for method in methods:
        start = time.perf_counter()
        if method == "separate":
            finals = []
            for k in range(args.tasks):
                task = make_task(args.width, args.upsample, offset=k)
                opts = TrainOptions(**{**base, "num_contexts": 1}, baseline=True)
                finals.append(train(task, None, opts).final[0]["accuracy"])
            evaluations = None
        else:
            task = make_task(args.width, args.upsample)
            opts = TrainOptions(**base, baseline=method == "standard", kind=method if method in KINDS else "binary",
                                policy=everything)  # fmt: skip
            report = train(task, None, opts)
            finals = [row["accuracy"] for row in report.final]
            evaluations = report.evaluations
        wall = time.perf_counter() - start
        results[method] = {"final": finals, "mean": sum(finals) / len(finals), "wall_s": wall,
                           "evaluations": evaluations}  # fmt: skip
        print(f"{method:>9}: mean {results[method]['mean']:6.2f}%  ({wall:6.1f} s)  "
              + " ".join(f"{a:5.1f}" for a in finals), flush=True)  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", type=int, default=10)
    p.add_argument("--width", type=int, default=512, help="units per hidden layer")
    p.add_argument("--steps", type=int, default=250, help="steps per task (batch 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    p.add_argument("--upsample", action=argparse.BooleanOptionalAction, default=True,
                   help="28×28 inputs (fan-in 784) instead of 8×8 (64)")  # fmt: skip
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="write task 1's accuracy over training (the paper's Figure 6)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = run(args)
    total = time.perf_counter() - start
    print(f"\n| method | mean accuracy over {args.tasks} tasks (%) | Δ vs standard | wall (s) |")
    print("|---|---:|---:|---:|")
    for method, r in results.items():
        delta = r["mean"] - results["standard"]["mean"]
        print(f"| {method} | {r['mean']:.1f} | {delta:+.1f} | {r['wall_s']:.0f} |")
    print(f"\ntotal {total:.0f} s; settings: {vars(args)}")
    if args.json:
        args.json.write_text(json.dumps({"settings": {k: str(v) for k, v in vars(args).items()},
                                         "results": results, "total_s": total}, indent=1))  # fmt: skip
    if args.plot:
        from pspctl.training.plot import plot_first_task

        runs = {m: r["evaluations"] for m, r in results.items() if r["evaluations"]}
        plot_first_task(runs, args.plot, metric="accuracy", block=args.steps)


if __name__ == "__main__":
    main()
