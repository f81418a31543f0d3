"""The bundled sample task and checkpoints: contract, accuracy, reproducibility."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from samples import digits_task
from samples.train import NUM_CONTEXTS, checkpoint_path, main

# Test accuracy measured when the checkpoints were trained (97.56, 97.11, 98.00, 98.00),
# minus one point so that a different BLAS on another machine does not fail the test.
ACCURACY_FLOOR = {0: 96.5, 1: 96.0, 2: 97.0, 3: 97.0}
EXPECTED_KEYS = ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]


def load_checkpoint(context: int) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint_path(context), weights_only=True)


@pytest.mark.parametrize("context", range(NUM_CONTEXTS))
def test_checkpoint_loads_strictly_and_is_accurate(context: int) -> None:
    state = load_checkpoint(context)
    assert list(state) == EXPECTED_KEYS
    model = digits_task.build_model()
    model.load_state_dict(state, strict=True)
    accuracy = digits_task.evaluate(model, context)["accuracy"]
    assert ACCURACY_FLOOR[context] < accuracy <= 100.0


def test_models_do_not_transfer_across_permutations() -> None:
    # Otherwise the tasks would not need separate weights and PSP would show nothing.
    model = digits_task.build_model()
    model.load_state_dict(load_checkpoint(0))
    assert digits_task.evaluate(model, 1)["accuracy"] < 50.0


def test_splits_are_deterministic_and_sized() -> None:
    train = list(digits_task.load_data(2, "train"))
    assert all(len(x) == digits_task.TRAIN_BATCH for x, _ in train[:-1])
    sizes = {s: sum(len(y) for _, y in digits_task.load_data(2, s)) for s in digits_task.SPLITS}
    assert sizes == {"train": 1347, "test": 450, "calib": 256}
    again = list(digits_task.load_data(2, "train"))
    pairs = zip(train, again, strict=True)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in pairs)
    x, y = train[0]
    assert x.dtype == torch.float32 and x.shape[1] == 64 and y.dtype == torch.int64


def test_contexts_permute_the_same_pixels() -> None:
    (x0, y0), (x3, y3) = (next(iter(digits_task.load_data(c, "test"))) for c in (0, 3))
    perm = torch.from_numpy(digits_task.permutation(3))
    assert torch.equal(y0, y3)
    assert torch.equal(x0[:, perm], x3)
    assert not torch.equal(x0, x3)
    assert (digits_task.permutation(0) == range(64)).all()


def test_unknown_split_and_negative_context_raise() -> None:
    with pytest.raises(ValueError, match="unknown split 'val'"):
        next(iter(digits_task.load_data(0, "val")))
    with pytest.raises(ValueError, match="context must be >= 0"):
        next(iter(digits_task.load_data(-1, "test")))


def test_example_inputs_are_one_real_batch() -> None:
    (x,) = digits_task.example_inputs()
    assert x.shape == (8, 64) and x.abs().sum() > 0


def test_train_reproduces_committed_checkpoint(tmp_path: Path, capsys) -> None:
    # Training is deterministic on any one machine: two runs must agree bit for bit. Against
    # the committed file (trained elsewhere) another CPU/BLAS may round differently, so
    # compare what the model does, and its weights closely.
    main(["--contexts", "1", "--out", str(tmp_path / "a")])
    main(["--contexts", "1", "--out", str(tmp_path / "b")])
    assert "context 0: test accuracy" in capsys.readouterr().out
    fresh = torch.load(tmp_path / "a" / "digits_0.pt", weights_only=True)
    again = torch.load(tmp_path / "b" / "digits_0.pt", weights_only=True)
    committed = load_checkpoint(0)
    assert list(fresh) == list(again) == list(committed)
    for key in committed:
        assert torch.equal(fresh[key], again[key]), key
        assert torch.allclose(fresh[key], committed[key], rtol=1e-2, atol=1e-3), key
    model = digits_task.build_model()
    model.load_state_dict(fresh)
    committed_model = digits_task.build_model()
    committed_model.load_state_dict(committed)
    assert (
        abs(digits_task.evaluate(model, 0)["accuracy"] - digits_task.evaluate(committed_model, 0)["accuracy"])
        <= 1.0
    )
