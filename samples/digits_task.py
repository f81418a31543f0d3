"""Permuted-digits task file: a template for your own.

A *task file* is a plain Python module that tells pspctl how to build a model and where
its data lives. pspctl commands import it (this runs the file's code) and call:

- ``build_model() -> nn.Module`` (required): a fresh, untrained model whose
  ``state_dict`` keys and shapes match the checkpoints being merged.
- ``example_inputs() -> tuple[Tensor, ...]``: one batch of inputs, used by ``export``
  to trace the model and to validate the exported graph against PyTorch.
- ``load_data(context: int, split: str) -> Iterable[tuple[Tensor, Tensor]]``:
  ``(inputs, targets)`` minibatches of task ``context``; ``split`` is ``"train"``,
  ``"test"`` or ``"calib"`` (a small subset of train). Unknown splits raise ValueError.
- ``evaluate(model, context: int) -> dict[str, float]``: metrics of ``model`` on task
  ``context``; pspctl falls back to argmax accuracy over the test split without it.

Here task ``context`` is scikit-learn's bundled 8x8 digits with its 64 pixels shuffled by
permutation number ``context`` (0 is the identity), as in the PSP paper's permuted MNIST.
Everything is deterministic and nothing is downloaded. Only torch, numpy and
scikit-learn are imported so the file can be copied as is.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HIDDEN = 256  # see docs/policy.md: big enough that superposing the hidden layer is cheap
SEED = 1234  # fixes the split, the permutations and the batch order
TRAIN_BATCH = 64
CALIB_ROWS = 256
SPLITS = ("train", "test", "calib")


def build_model() -> nn.Module:
    """64 -> HIDDEN -> HIDDEN -> 10 MLP. Sequential keeps the keys ``0.weight`` ... ``4.bias``."""
    return nn.Sequential(
        nn.Linear(64, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, 10),
    )


def example_inputs() -> tuple[torch.Tensor, ...]:
    """Eight real test images of task 0 (zeros would only exercise the biases)."""
    x, _ = _arrays(0, "test")
    return (x[:8],)


def load_data(context: int, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` minibatches: x is float32 (B, 64), y is int64 (B,).

    Raises:
        ValueError: ``split`` is not one of "train", "test", "calib"; ``context`` < 0.
    """
    x, y = _arrays(context, split)
    # The test and calib splits are small enough for one batch.
    step = TRAIN_BATCH if split == "train" else len(x)
    for start in range(0, len(x), step):
        yield x[start : start + step], y[start : start + step]


def evaluate(model: nn.Module, context: int) -> dict[str, float]:
    """Test accuracy in percent, computed in eval mode without gradients."""
    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in load_data(context, "test"):
            correct += int((model(x).argmax(dim=1) == y).sum())
            total += len(y)
    model.train(was_training)
    return {"accuracy": 100.0 * correct / total}


def permutation(context: int) -> np.ndarray:
    """Pixel order of task ``context``: identity for 0, else seeded by (SEED, context)."""
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if context == 0:
        return np.arange(64)
    return np.random.default_rng([SEED, context]).permutation(64)


@lru_cache(maxsize=1)
def _standardized_split() -> tuple[np.ndarray, ...]:
    """Train/test split (75/25, stratified) scaled to [0, 1] then standardized on train."""
    digits = load_digits()
    x = digits.data.astype(np.float32) / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std[std == 0] = 1.0  # border pixels are always blank; leave them at zero
    # Shuffle train once so minibatches and the calib subset mix all classes.
    order = np.random.default_rng(SEED).permutation(len(x_train))
    x_train, y_train = x_train[order], y_train[order]
    return (x_train - mean) / std, y_train, (x_test - mean) / std, y_test


def _arrays(context: int, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    x_train, y_train, x_test, y_test = _standardized_split()
    if split == "test":
        x, y = x_test, y_test
    elif split == "calib":
        x, y = x_train[:CALIB_ROWS], y_train[:CALIB_ROWS]
    else:
        x, y = x_train, y_train
    x = x[:, permutation(context)]
    return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), torch.from_numpy(y.astype(np.int64))
