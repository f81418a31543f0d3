"""Smoke and oracle tests for benchmarks/policy_sweep.py (the numbers in docs/policy.md)."""

from __future__ import annotations

import torch

from benchmarks import policy_sweep


def test_superpose_is_exact_for_one_context() -> None:
    w = torch.randn(3, 5)
    for kind in ("binary", "complex"):
        (back,) = policy_sweep.superpose([w], kind, torch.Generator().manual_seed(0))
        torch.testing.assert_close(back, w)


def test_superpose_matches_a_naive_loop() -> None:
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(2, 4, generator=gen) for _ in range(3)]
    retrieved = policy_sweep.superpose(weights, "binary", torch.Generator().manual_seed(2))
    c = torch.randint(0, 2, (3, 4), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    for k in range(3):
        for i in range(2):
            for j in range(4):
                expected = sum(weights[m][i, j] * c[m, j] * c[k, j] for m in range(3))
                assert torch.isclose(retrieved[k][i, j], expected)


def test_sweep_runs_on_the_committed_models(capsys) -> None:
    policy_sweep.main(["--seeds", "1"])
    out = capsys.readouterr().out
    assert "K=4, 64->256->256->10" in out
    assert "hidden only" in out and "complex" in out
