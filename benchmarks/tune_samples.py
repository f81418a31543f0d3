"""`pspctl tune` on the bundled samples: merge the four digit models with each kind, then heal.

For every kind: merge samples/models/digits_{0..3}.pt (default policy unless --all-weights),
tune with the default (distill) objective, and report each context's test accuracy for the
originals, the merge and the tuned file, with the first evaluated step at which the mean is
within --target points of the originals' mean, and the wall time.

    python benchmarks/tune_samples.py                 # the numbers in docs/training.md
    python benchmarks/tune_samples.py --all-weights   # superpose every weight: a harder merge
    python benchmarks/tune_samples.py --hidden 2048 --contexts 8 --kinds binary
                                      # trains 8 wider models on the fly first (not committed)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pspctl.merge import MergeOptions, merge  # noqa: E402
from pspctl.policy import SHAPE_RULES, Policy  # noqa: E402
from pspctl.task import Task, load_task  # noqa: E402
from pspctl.training import TuneOptions, tune  # noqa: E402
from pspctl.training.common import mean_primary  # noqa: E402
from samples import digits_task  # noqa: E402

KINDS = ("binary", "complex", "onepower", "rotation")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kinds", nargs="*", default=list(KINDS), choices=KINDS)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--target", type=float, default=0.5, help="points below the originals' mean")
    p.add_argument(
        "--all-weights", action="store_true", help="superpose every weight, not the default policy"
    )
    p.add_argument("--hidden", type=int, default=256, help="hidden width; not 256: train models first")
    p.add_argument("--contexts", type=int, default=4, help="models to merge; not 4: train models first")
    p.add_argument("--epochs", type=int, default=10, help="epochs per model trained on the fly")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    task_path = ROOT / "samples" / "digits_task.py"
    task = load_task(task_path)
    policy = Policy(superpose=("*weight",)) if args.all_weights else SHAPE_RULES
    summary = []
    with tempfile.TemporaryDirectory() as tmp:
        if (args.hidden, args.contexts) == (256, 4):
            inputs = [ROOT / "samples" / "models" / f"digits_{k}.pt" for k in range(4)]
        else:
            task, inputs = _train_models(args, Path(tmp))
        print("| kind | context | original | merged | tuned |")
        print("|---|---|---:|---:|---:|")
        for kind in args.kinds:
            merged = Path(tmp) / f"{kind}.safetensors"
            merge(inputs, merged, MergeOptions(kind=kind, policy=policy, task=str(task_path), base="none"))
            opts = TuneOptions(steps=args.steps, eval_every=args.eval_every, lr=args.lr)
            r = tune(merged, task, Path(tmp) / f"{kind}.tuned.safetensors", opts)
            assert r.originals is not None
            for k in range(len(r.before)):
                print(f"| {kind} | {k} | {r.originals[k]['accuracy']:.2f} | {r.before[k]['accuracy']:.2f} "
                      f"| {r.after[k]['accuracy']:.2f} |")  # fmt: skip
            goal = mean_primary(r.originals) - args.target
            reached = next((c["step"] for c in r.curve if mean_primary(c["metrics"]) >= goal), None)
            summary.append((kind, r, reached))
    print(f"\n| kind | originals | merged | tuned | Δ tuned − originals | first step within {args.target} | "
          f"steps | wall (s) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r, reached in summary:
        o, b, a = mean_primary(r.originals or []), mean_primary(r.before), mean_primary(r.after)
        print(f"| {kind} | {o:.2f} | {b:.2f} | {a:.2f} | {a - o:+.2f} | {reached if reached is not None else '–'} "
              f"| {r.steps} | {r.wall_s:.1f} |")  # fmt: skip
    print(f"\nsettings: {vars(args)}; objective {summary[0][1].objective}")


def _train_models(args: argparse.Namespace, folder: Path) -> tuple[Task, list[Path]]:
    """K models of width args.hidden, one per task, trained like samples/train.py."""
    from samples.train import train_model

    digits_task.HIDDEN = args.hidden  # build_model() reads it at call time
    paths = []
    for k in range(args.contexts):
        model = train_model(k, epochs=args.epochs)
        paths.append(folder / f"digits_{k}.pt")
        torch.save(model.state_dict(), paths[-1])
    print(f"trained {args.contexts} models 64->{args.hidden}->{args.hidden}->10, {args.epochs} epochs each")
    task = Task(source="samples/digits_task.py", build_model=digits_task.build_model,
                load_data=digits_task.load_data, evaluate=digits_task.evaluate)  # fmt: skip
    return task, paths


if __name__ == "__main__":
    main()
