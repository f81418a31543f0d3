"""Train the bundled sample models: one MLP per permuted-digits task.

Run from the repository root (takes well under a minute on two cores):

    python -m samples.train            # writes samples/models/digits_0.pt ... digits_3.pt

Each checkpoint is a plain ``state_dict`` for ``samples.digits_task.build_model()``.
Training is deterministic: seeds are fixed and torch runs single-threaded, so a rerun
on the same machine reproduces every tensor bit for bit.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

if __package__ in (None, ""):  # run as `python samples/train.py`: make `samples` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from samples.digits_task import build_model, evaluate, load_data  # noqa: E402

NUM_CONTEXTS = 4
EPOCHS = 30
LEARNING_RATE = 1e-3
SEED = 0
MODELS_DIR = Path(__file__).resolve().parent / "models"


def train_model(context: int, *, epochs: int = EPOCHS, seed: int = SEED) -> nn.Module:
    """Train a fresh ``build_model()`` on task ``context`` with Adam; deterministic."""
    threads = torch.get_num_threads()
    # Reduction order in the CPU kernels depends on the thread count; one thread pins it.
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed + context)
        model = build_model()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        model.train()
        for _ in range(epochs):
            for x, y in load_data(context, "train"):
                optimizer.zero_grad()
                F.cross_entropy(model(x), y).backward()
                optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model


def checkpoint_path(context: int, models_dir: Path = MODELS_DIR) -> Path:
    """Where the sample checkpoint for ``context`` lives."""
    return models_dir / f"digits_{context}.pt"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=NUM_CONTEXTS, help="models to train")
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="output directory")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for context in range(args.contexts):
        model = train_model(context)
        path = checkpoint_path(context, args.out)
        torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, path)
        accuracy = evaluate(model, context)["accuracy"]
        print(f"context {context}: test accuracy {accuracy:.2f}%  -> {path}")


if __name__ == "__main__":
    main()
