"""Which weights can share one superposed tensor? Measure it on the sample models.

Simulates PSP directly (independent of pspctl's core, as an oracle) and prints the
retrieved test accuracy of every context when a chosen set of weight matrices is
superposed and everything else (biases included) stays per context:

    binary:  c_k in {-1,+1}^fan_in,  W = sum_k W_k * c_k,          W_k^ = W * c_k
    complex: phi_k ~ U[-pi,pi]^fan_in, W = sum_k W_k * exp(-i phi_k), W_k^ = Re(W * exp(i phi_k))

Contexts run along the fan-in (columns of an nn.Linear weight) and are drawn
independently per tensor. Results are averaged over ``--seeds`` context draws.

    python benchmarks/policy_sweep.py                 # K=4, committed sample models
    python benchmarks/policy_sweep.py --contexts 8    # K=8, trained on the fly
    python benchmarks/policy_sweep.py --hidden 512    # another width, trained on the fly
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `samples` importable

from samples import digits_task  # noqa: E402
from samples.train import checkpoint_path, train_model  # noqa: E402

StateDict = dict[str, Tensor]
COMMITTED_HIDDEN = digits_task.HIDDEN  # width of samples/models/*.pt

SETTINGS: dict[str, tuple[str, ...]] = {
    "all": ("0.weight", "2.weight", "4.weight"),
    "all but first (= hidden+output)": ("2.weight", "4.weight"),
    "hidden only": ("2.weight",),
    "first only": ("0.weight",),
    "output only": ("4.weight",),
    "first+hidden": ("0.weight", "2.weight"),
}


def superpose(weights: list[Tensor], kind: str, gen: torch.Generator) -> list[Tensor]:
    """Bind K same-shaped (out, fan_in) weights into one and retrieve each again."""
    k, fan_in = len(weights), weights[0].shape[1]
    if kind == "binary":
        c = torch.randint(0, 2, (k, fan_in), generator=gen).float() * 2 - 1
        w = sum(wk * ck for wk, ck in zip(weights, c, strict=True))
        return [w * ck for ck in c]
    phi = (torch.rand(k, fan_in, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    rot = torch.polar(torch.ones_like(phi), phi)
    w = sum(wk.double() * r.conj() for wk, r in zip(weights, rot, strict=True))
    return [(w * r).real.float() for r in rot]


def retrieved_states(states: list[StateDict], keys: tuple[str, ...], kind: str, seed: int):
    """Per-context state dicts after superposing ``keys`` across all contexts."""
    out = [dict(s) for s in states]
    for i, key in enumerate(keys):
        gen = torch.Generator().manual_seed(seed * 1000 + i)
        for s, w in zip(out, superpose([s[key] for s in states], kind, gen), strict=True):
            s[key] = w
    return out


def accuracy(state: StateDict, context: int) -> float:
    model = digits_task.build_model()
    model.load_state_dict(state, strict=True)
    return digits_task.evaluate(model, context)["accuracy"]


def load_or_train(num_contexts: int, hidden: int) -> list[StateDict]:
    """Committed checkpoints when they fit the request, else train (not saved)."""
    committed = [checkpoint_path(k) for k in range(num_contexts)]
    if hidden == COMMITTED_HIDDEN and all(p.exists() for p in committed):
        return [torch.load(p, weights_only=True) for p in committed]
    print(f"training {num_contexts} models with H={hidden} on the fly ...", file=sys.stderr)
    return [train_model(k).state_dict() for k in range(num_contexts)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=4, help="K, number of models")
    parser.add_argument("--hidden", type=int, default=digits_task.HIDDEN, help="hidden width H")
    parser.add_argument("--seeds", type=int, default=3, help="context draws to average")
    args = parser.parse_args(argv)
    digits_task.HIDDEN = args.hidden  # build_model() reads it at call time
    torch.set_num_threads(1)

    k = args.contexts
    states = load_or_train(k, args.hidden)
    total = sum(t.numel() for t in states[0].values())
    print(f"\nK={k}, 64->{args.hidden}->{args.hidden}->10, {total} parameters per model\n")
    print(f"{'weight':<10} {'shape':>12} {'fan-in':>6} {'share':>7} {'(K-1)/fan_in':>13}")
    for key in ("0.weight", "2.weight", "4.weight"):
        w = states[0][key]
        share = 100 * w.numel() / total
        shape = "x".join(map(str, w.shape))
        print(f"{key:<10} {shape:>12} {w.shape[1]:>6} {share:>6.1f}% {(k - 1) / w.shape[1]:>13.4f}")

    original = [accuracy(s, c) for c, s in enumerate(states)]
    cols = " ".join(f"{'c' + str(c):>6}" for c in range(k))
    print(f"\n{'setting':<32} {'kind':<8} {cols} {'mean':>6} {'min':>6}")
    print(f"{'original':<32} {'-':<8} {_row(original)}")
    for name, keys in SETTINGS.items():
        for kind in ("binary", "complex"):
            acc = torch.zeros(k, dtype=torch.float64)
            for seed in range(args.seeds):
                retrieved = retrieved_states(states, keys, kind, seed)
                acc += torch.tensor([accuracy(s, c) for c, s in enumerate(retrieved)])
            print(f"{name:<32} {kind:<8} {_row((acc / args.seeds).tolist())}")


def _row(values: list[float]) -> str:
    cells = " ".join(f"{v:6.1f}" for v in values)
    return f"{cells} {sum(values) / len(values):6.1f} {min(values):6.1f}"


if __name__ == "__main__":
    main()
