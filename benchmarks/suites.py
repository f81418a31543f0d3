"""Two multi-model sets that post-hoc PSP merging meets in practice (issue 13), built on digits.

- **finetunes**: one parent MLP (64→256→256→10, Adam, seed 0) trained on scikit-learn's
  digits, then K=8 fine-tunes of it, one per related task: task k is digits with 16 of the
  informative pixels shuffled by a fixed permutation k (100 gentle SGD-momentum steps, lr
  5e-4). The fine-tunes differ from the parent by 0.6–5 % of each tensor's norm, and each
  needs its own weights: the parent or another fine-tune loses points on task k.
- **ensemble**: K=5 folds of one 6-layer MLP (64→128→128→128→128→128→10), all from ONE
  initialisation (seed 0) and one batch order, trained by 5-fold cross-validation on the
  training split (fold k leaves out the k-th fifth). No tensor is private to a fold.

Everything is deterministic (one thread, seeded generators) and CPU-only; nothing is
downloaded. Checkpoints are plain state_dicts in `.safetensors`, keys as `nn.Sequential`
names them (`0.weight` … ). Each directory gets a `recipe.json`: the recipe, its hash, every
file's sha256 and the build's measurements; a later build with the same recipe hash and
intact files is skipped.

    python benchmarks/suites.py                  # both suites into benchmarks/suites-data/
    python benchmarks/suites.py --small          # the reduced variants the tests build
    python benchmarks/suites.py ensemble --force # rebuild one

API: `build(name, out_dir, small=..., force=...) -> Suite` (or `build_finetunes`,
`build_ensemble`); a `Suite` loads its states, builds its model, and gives each context's
inputs (`suite.data(k, "test")`); `evaluate(suite, state, k)` is accuracy in percent.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # make `samples` importable when run as a script

from samples import digits_task  # noqa: E402

__all__ = [
    "SUITES",
    "Suite",
    "SuiteConfig",
    "build",
    "build_ensemble",
    "build_finetunes",
    "config",
    "evaluate",
]

SUITES = ("finetunes", "ensemble")
DEFAULT_DIR = ROOT / "benchmarks" / "suites-data"
RECIPE_VERSION = 2  # bump when the build code changes what it writes
BATCH = 64
StateDict = dict[str, Tensor]


@dataclass(frozen=True)
class SuiteConfig:
    """Everything that determines a suite's checkpoints (hashed into the recipe)."""

    name: str
    small: bool
    contexts: int
    hidden: int
    depth: int  # number of Linear layers
    steps: int  # per fine-tune / per fold
    lr: float
    base_steps: int = 0  # finetunes: the parent's Adam steps
    base_lr: float = 0.0
    shuffled_pixels: int = 0  # finetunes: pixels permuted per task
    seed: int = 0


def config(name: str, *, small: bool = False, hidden: int | None = None) -> SuiteConfig:
    """The configuration of suite `name` ("finetunes" or "ensemble"), full or small; `hidden`
    overrides the width of the hidden layers (a variant, e.g. the ensemble at 1.1M parameters)."""
    if hidden is not None:
        return replace(config(name, small=small), hidden=hidden)
    if name == "finetunes":
        # Gentle fine-tuning (lr 5e-4, 100 SGD-momentum steps): every tensor moves by ≤ 5 % of
        # its norm, as fine-tunes of one parent do; 16 shuffled pixels keep each task distinct
        # enough that the parent or another fine-tune loses points on it.
        common = dict(contexts=8, depth=3, lr=5e-4, steps=100, base_lr=1e-3, shuffled_pixels=16)
        if small:
            return SuiteConfig(name, True, hidden=64, base_steps=150, **common)
        return SuiteConfig(name, False, hidden=256, base_steps=400, **common)
    if name == "ensemble":
        if small:
            return SuiteConfig(name, True, contexts=5, hidden=32, depth=6, steps=150, lr=1e-3)
        return SuiteConfig(name, False, contexts=5, hidden=128, depth=6, steps=600, lr=1e-3)
    raise ValueError(f"unknown suite {name!r}; expected one of {', '.join(SUITES)}")


def make_model(cfg: SuiteConfig) -> nn.Module:
    """64 → hidden (× depth−1 Linear+ReLU) → 10, as an `nn.Sequential`."""
    layers: list[nn.Module] = []
    width = 64
    for _ in range(cfg.depth - 1):
        layers += [nn.Linear(width, cfg.hidden), nn.ReLU()]
        width = cfg.hidden
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


@lru_cache(maxsize=4)
def _digits(split: str) -> tuple[Tensor, Tensor]:
    """The sample task's standardized digits (its split and seed), unpermuted."""
    batches = list(digits_task.load_data(0, split))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])


def task_permutation(cfg: SuiteConfig, k: int) -> Tensor:
    """Finetunes: pixel order of task k, `shuffled_pixels` informative pixels shuffled among themselves."""
    x, _ = _digits("train")
    informative = (x.std(dim=0) > 0).nonzero().flatten().numpy()
    rng = np.random.default_rng([digits_task.SEED, cfg.shuffled_pixels, k])
    chosen = rng.choice(informative, cfg.shuffled_pixels, replace=False)
    order = np.arange(64)
    order[chosen] = rng.permutation(chosen)
    return torch.from_numpy(order)


def fold_rows(cfg: SuiteConfig, k: int) -> Tensor:
    """Ensemble: indices of the training rows fold k trains on (all but the k-th fifth)."""
    n = len(_digits("train")[0])
    held_out = np.array_split(np.arange(n), cfg.contexts)[k]
    return torch.from_numpy(np.setdiff1d(np.arange(n), held_out))


@dataclass(frozen=True)
class Suite:
    """A built suite: K checkpoints (and the parent, for finetunes) in `directory`."""

    config: SuiteConfig
    directory: Path
    paths: tuple[Path, ...]
    base: Path | None
    report: dict

    @property
    def name(self) -> str:
        return self.config.name

    def model(self) -> nn.Module:
        return make_model(self.config)

    def states(self) -> list[StateDict]:
        return [load_file(str(p)) for p in self.paths]

    def base_state(self) -> StateDict | None:
        return None if self.base is None else load_file(str(self.base))

    def data(self, k: int, split: str) -> tuple[Tensor, Tensor]:
        """Context k's inputs and labels: split "train" (fold k's rows for the ensemble), "test", "calib"."""
        x, y = _digits(split)
        if self.name == "finetunes":
            return x[:, task_permutation(self.config, k)], y
        if split == "train":
            rows = fold_rows(self.config, k)
            return x[rows], y[rows]
        return x, y


def evaluate(suite: Suite, state: StateDict, k: int, split: str = "test") -> float:
    """Accuracy (%) of `state` on context k's data."""
    return _accuracy(_loaded(suite.config, state), *suite.data(k, split))


def _loaded(cfg: SuiteConfig, state: StateDict) -> nn.Module:
    model = make_model(cfg)
    model.load_state_dict(state, strict=True)
    return model.eval()


def _accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(dim=1) == y).float().mean())


def _train(model: nn.Module, x: Tensor, y: Tensor, steps: int, optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, len(x), (BATCH,), generator=gen)
        optimizer.zero_grad()
        F.cross_entropy(model(x[rows]), y[rows]).backward()
        optimizer.step()
    model.eval()


def _state(model: nn.Module) -> StateDict:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def _relative(a: StateDict, b: StateDict) -> dict[str, float]:
    """‖a − b‖/‖a‖ per tensor."""
    return {n: float((a[n] - b[n]).norm() / a[n].norm().clamp_min(1e-30)) for n in a}


def _mean_state(states: list[StateDict]) -> StateDict:
    return {n: torch.stack([s[n] for s in states]).mean(0) for n in states[0]}


def _delta_report(states: list[StateDict], ref: StateDict | None) -> dict[str, dict[str, float]]:
    """Per tensor: mean over contexts of ‖W_k − mean‖/‖W_k‖ (and of ‖W_k − ref‖/‖W_k‖)."""
    mean = _mean_state(states)
    out: dict[str, dict[str, float]] = {}
    for n in states[0]:
        row = {"to_mean": float(np.mean([_relative(s, mean)[n] for s in states]))}
        if ref is not None:
            row["to_base"] = float(np.mean([_relative(s, ref)[n] for s in states]))
        out[n] = row
    # The whole model's ‖ΔW‖/‖W‖ over the K contexts, as one vector.
    total = {"to_mean": _pooled(states, mean)} | ({} if ref is None else {"to_base": _pooled(states, ref)})
    return out | {"(all)": total}


def _pooled(states: list[StateDict], ref: StateDict) -> float:
    num = sum(float(((s[n] - ref[n]) ** 2).sum()) for s in states for n in ref)
    return (num / sum(float((s[n] ** 2).sum()) for s in states for n in ref)) ** 0.5


def _build_finetunes(cfg: SuiteConfig) -> tuple[dict[str, StateDict], dict]:
    """The parent and its K fine-tunes, with the accuracies that show retrieval matters."""
    suite = Suite(cfg, Path(), (), None, {})
    torch.manual_seed(cfg.seed)
    parent = make_model(cfg)
    x, y = _digits("train")
    _train(parent, x, y, cfg.base_steps, torch.optim.Adam(parent.parameters(), lr=cfg.base_lr), cfg.seed)
    tuned = []
    for k in range(cfg.contexts):
        model = copy.deepcopy(parent)
        # SGD, not Adam: Adam moves every weight by ~lr per step whatever its gradient, so the
        # deltas would be dense noise rather than what the task needs.
        sgd = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=0.9)
        _train(model, *suite.data(k, "train"), cfg.steps, sgd, cfg.seed + 1 + k)
        tuned.append(model)
    files = {"base": _state(parent), **{f"ft{k}": _state(m) for k, m in enumerate(tuned)}}
    states = [files[f"ft{k}"] for k in range(cfg.contexts)]
    rows = []
    for k, model in enumerate(tuned):
        xk, yk = suite.data(k, "test")
        others = [_accuracy(m, xk, yk) for j, m in enumerate(tuned) if j != k]
        rows.append({"own": _accuracy(model, xk, yk), "base": _accuracy(parent, xk, yk),
                     "other_mean": float(np.mean(others)), "other_best": max(others)})  # fmt: skip
    report = {"accuracy": rows, "base_accuracy_unpermuted": _accuracy(parent, *_digits("test")),
              "relative_delta": _delta_report(states, files["base"])}  # fmt: skip
    return files, report


def _build_ensemble(cfg: SuiteConfig) -> tuple[dict[str, StateDict], dict]:
    """K folds from one initialisation and one batch order, on K different training subsets."""
    suite = Suite(cfg, Path(), (), None, {})
    torch.manual_seed(cfg.seed)
    init = make_model(cfg)
    folds = []
    for k in range(cfg.contexts):
        model = copy.deepcopy(init)
        adam = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        _train(model, *suite.data(k, "train"), cfg.steps, adam, cfg.seed)
        folds.append(model)
    files = {f"fold{k}": _state(m) for k, m in enumerate(folds)}
    x, y = _digits("test")
    with torch.no_grad():
        logits = [m(x) for m in folds]
    ensemble = 100.0 * float((torch.stack(logits).mean(0).argmax(1) == y).float().mean())
    report = {"accuracy": [_accuracy(m, x, y) for m in folds], "ensemble_accuracy": ensemble,
              "relative_delta": _delta_report(list(files.values()), _state(init))}  # fmt: skip
    return files, report


_BUILDERS: dict[str, Callable[[SuiteConfig], tuple[dict[str, StateDict], dict]]] = {
    "finetunes": _build_finetunes,
    "ensemble": _build_ensemble,
}


def recipe(cfg: SuiteConfig) -> dict:
    """What the checkpoints depend on; torch's version too, since kernels may change the bits."""
    return {"config": asdict(cfg), "version": RECIPE_VERSION, "torch": torch.__version__.split("+")[0]}


def recipe_hash(cfg: SuiteConfig) -> str:
    return hashlib.sha256(json.dumps(recipe(cfg), sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _suite(cfg: SuiteConfig, directory: Path, meta: dict) -> Suite:
    names = list(meta["files"])
    paths = tuple(directory / f for f in names if f != "base.safetensors")
    base = directory / "base.safetensors" if "base.safetensors" in names else None
    return Suite(cfg, directory, paths, base, meta["report"])


def _cached(cfg: SuiteConfig, directory: Path) -> dict | None:
    """recipe.json's contents when it records this recipe and every file is intact, else None."""
    try:
        meta = json.loads((directory / "recipe.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("hash") != recipe_hash(cfg):
        return None
    for name, digest in meta.get("files", {}).items():
        path = directory / name
        if not path.is_file() or _sha256(path) != digest:
            return None
    return meta


def build(
    name: str, out_dir: str | Path, *, small: bool = False, force: bool = False, hidden: int | None = None
) -> Suite:
    """Build suite `name` into `out_dir` (skipped when its recipe.json matches), and return it.

    Args:
        name: "finetunes" or "ensemble".
        out_dir: directory for the checkpoints and recipe.json; created if missing.
        small: the reduced variant (a few seconds), for tests.
        force: rebuild even when the cached files match.
        hidden: another width for the hidden layers (see `config`).
    """
    cfg = config(name, small=small, hidden=hidden)
    directory = Path(out_dir)
    if not force and (meta := _cached(cfg, directory)) is not None:
        return _suite(cfg, directory, meta)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the CPU kernels' reduction order depends on the thread count
    try:
        start = time.perf_counter()
        files, report = _BUILDERS[name](cfg)
        report["build_s"] = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "recipe.json").unlink(missing_ok=True)  # invalid until every file is written
    digests = {}
    for stem, state in files.items():
        path = directory / f"{stem}.safetensors"
        # One metadata key: safetensors writes a map's keys in no fixed order, which would change
        # the file's bytes (and its sha256) from one build to the next.
        save_file(state, str(path), metadata={"pspctl_suite": f"{name}/{recipe_hash(cfg)}"})
        digests[path.name] = _sha256(path)
    meta = {"recipe": recipe(cfg), "hash": recipe_hash(cfg), "files": digests, "report": report}
    (directory / "recipe.json").write_text(json.dumps(meta, indent=1) + "\n")
    return _suite(cfg, directory, meta)


def build_finetunes(out_dir: str | Path, *, small: bool = False, force: bool = False) -> Suite:
    """The fine-tunes suite: base.safetensors and ft0 … ft7.safetensors in `out_dir`."""
    return build("finetunes", out_dir, small=small, force=force)


def build_ensemble(out_dir: str | Path, *, small: bool = False, force: bool = False) -> Suite:
    """The ensemble suite: fold0 … fold4.safetensors in `out_dir`."""
    return build("ensemble", out_dir, small=small, force=force)


def default_dir(name: str, *, small: bool = False, hidden: int | None = None) -> Path:
    return DEFAULT_DIR / ((f"{name}-small" if small else name) + (f"-h{hidden}" if hidden else ""))


def summary(suite: Suite) -> str:
    """The build's measurements as text: accuracies and ‖ΔW‖/‖W‖ per tensor."""
    r = suite.report
    lines = [f"{suite.name}{' (small)' if suite.config.small else ''}: {suite.directory}  "
             f"(built in {r['build_s']:.1f} s)"]  # fmt: skip
    if suite.name == "finetunes":
        lines.append(f"parent on unpermuted digits: {r['base_accuracy_unpermuted']:.1f}%")
        lines.append("task | fine-tune | parent | other fine-tunes, mean | best other")
        for k, a in enumerate(r["accuracy"]):
            lines.append(
                f"{k} | {a['own']:.1f} | {a['base']:.1f} | {a['other_mean']:.1f} | {a['other_best']:.1f}"
            )
    else:
        folds = " ".join(f"{a:.1f}" for a in r["accuracy"])
        lines.append(f"fold accuracies: {folds}; averaged ensemble {r['ensemble_accuracy']:.1f}%")
    ref = "parent" if suite.name == "finetunes" else "init"
    lines.append(f"tensor | ‖W_k − mean‖/‖W_k‖ | ‖W_k − {ref}‖/‖W_k‖")
    for n, d in r["relative_delta"].items():
        lines.append(f"{n} | {d['to_mean']:.4f} | {d['to_base']:.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("suites", nargs="*", help=f"any of {', '.join(SUITES)} (default: all)")
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="parent directory of the suites")
    p.add_argument("--small", action="store_true", help="the reduced variants")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    args = p.parse_args(argv)
    # Checked here: argparse (3.11) rejects an empty nargs="*" list against `choices`.
    if unknown := sorted(set(args.suites) - set(SUITES)):
        p.error(f"unknown suite(s) {', '.join(unknown)}; expected {', '.join(SUITES)}")
    for name in args.suites or SUITES:
        directory = args.out / (f"{name}-small" if args.small else name)
        cached = not args.force and _cached(config(name, small=args.small), directory) is not None
        start = time.perf_counter()
        suite = build(name, directory, small=args.small, force=args.force)
        print(summary(suite))
        print(f"({'cached' if cached else 'built'}; this run {time.perf_counter() - start:.1f} s)\n")


if __name__ == "__main__":
    main()
