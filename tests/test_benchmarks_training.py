"""Smoke and oracle tests for benchmarks/permuted_digits.py and benchmarks/tune_samples.py."""

from __future__ import annotations

import torch

from benchmarks import permuted_digits, tune_samples


def test_upsampled_tasks_are_permutations_of_task_zero() -> None:
    task = permuted_digits.make_task(width=8, upsample=True)
    (x0, y0), *_ = task.batches(0, "test")
    (x3, y3), *_ = task.batches(3, "test")
    assert x0.shape[1] == 784 and torch.equal(y0, y3)
    assert not torch.equal(x0, x3)
    torch.testing.assert_close(x0.sort(dim=1).values, x3.sort(dim=1).values)
    separate = permuted_digits.make_task(width=8, upsample=True, offset=3)
    assert torch.equal(separate.batches(0, "test")[0][0], x3)


def test_small_tasks_are_the_sample_tasks() -> None:
    from samples import digits_task

    task = permuted_digits.make_task(width=8, upsample=False)
    (x, _), *_ = task.batches(2, "test")
    (expected, _), *_ = digits_task.load_data(2, "test")
    assert torch.equal(x, expected)


def test_permuted_digits_runs(capsys) -> None:
    permuted_digits.main(
        ["--tasks", "2", "--width", "16", "--steps", "3", "--no-upsample", "--kinds", "binary"]
    )
    out = capsys.readouterr().out
    assert "| method | mean accuracy over 2 tasks (%) |" in out
    for method in ("standard", "binary", "separate"):
        assert f"| {method} |" in out


def test_tune_samples_runs(capsys) -> None:
    tune_samples.main(["--kinds", "binary", "--steps", "4", "--eval-every", "2"])
    out = capsys.readouterr().out
    assert "| binary | 3 |" in out and "objective distill" in out
