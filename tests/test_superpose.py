import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pspctl.contexts import Kind, make_contexts
from pspctl.superpose import bind, fan_in, predicted_output_error, unbind

KINDS = list(Kind)


def naive_bind(weights, ctx):
    """The paper's eq. 2 written as loops over rows and fan-in elements."""
    n = weights[0].shape[0]
    flat = [w.reshape(n, -1).double() for w in weights]
    m = flat[0].shape[1]
    out = torch.zeros(n, m, dtype=torch.complex128 if ctx.kind.is_complex else torch.float64)
    for k, w in enumerate(flat):
        for i in range(n):
            if ctx.kind is Kind.ROTATION:
                C = ctx.matrix(k).double()
                for j in range(m):
                    out[i, j] += sum(w[i, t] * C[j, t] for t in range(m))  # (w Cᵀ)_j
            else:
                c = ctx.vector(k).to(torch.complex128 if ctx.kind.is_complex else torch.float64)
                for j in range(m):
                    out[i, j] += w[i, j] * (c[j].conj() if ctx.kind.is_complex else c[j])
    return out


def naive_unbind(W, ctx, k):
    n, m = W.shape[0], W[0].numel()
    flat = W.reshape(n, m).to(torch.complex128 if W.is_complex() else torch.float64)
    out = torch.zeros(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            if ctx.kind is Kind.ROTATION:
                C = ctx.matrix(k).double()
                out[i, j] = sum(flat[i, t].real * C[t, j] for t in range(m))
            elif ctx.kind.is_complex:
                out[i, j] = (flat[i, j] * ctx.vector(k)[j].to(torch.complex128)).real
            else:
                out[i, j] = flat[i, j].real * ctx.vector(k)[j]
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(3, 5), (2, 2, 3), (2, 1, 2, 2)])
def test_vectorised_matches_naive_loop(kind, shape):
    K = 3
    ws = [torch.randn(shape) for _ in range(K)]
    ctx = make_contexts(kind, K, fan_in(shape), seed=1, name="t")
    W = bind(iter(ws), ctx)
    assert W.shape == torch.Size(shape)
    assert torch.allclose(W.reshape(shape[0], -1).to(torch.complex128 if kind in ("complex", "onepower") else torch.float64),
                          naive_bind(ws, ctx), atol=1e-5)  # fmt: skip
    for k in range(K):
        assert torch.allclose(
            unbind(W, ctx, k).reshape(shape[0], -1).double(), naive_unbind(W, ctx, k), atol=1e-5
        )


@pytest.mark.parametrize("kind", KINDS)
def test_single_model_is_recovered_exactly(kind):
    w = torch.randn(7, 9)
    ctx = make_contexts(kind, 1, 9, seed=0)
    got = unbind(bind([w], ctx), ctx, 0)
    if kind == "binary":
        assert torch.equal(got, w)  # ±1 products are exact in floating point
    else:
        assert torch.allclose(got, w, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_retrieval_is_unbiased_and_has_the_predicted_weight_error(kind):
    # Prop. 1 and the weight-space residual: ‖Ŵ_k − W_k‖² ≈ v·Σ_{s≠k}‖W_s‖².
    K, M = 4, 256
    ws = [torch.randn(64, M) for _ in range(K)]
    ctx = make_contexts(kind, K, M, seed=3)
    W = bind(ws, ctx)
    residual = unbind(W, ctx, 0) - ws[0]
    expected = math.sqrt(Kind(kind).variance_factor * sum(w.norm() ** 2 for w in ws[1:]))
    assert residual.norm().item() == pytest.approx(expected, rel=0.05)
    assert abs(residual.mean().item()) < 5 * residual.std().item() / math.sqrt(residual.numel())


def aligned_inputs(w: torch.Tensor, eta: float, gen: torch.Generator) -> torch.Tensor:
    """One input per row of w with |⟨w_i, x_i⟩| = η‖w_i‖‖x_i‖ exactly."""
    u = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    w_hat = w / w.norm(dim=1, keepdim=True)
    u = u - (u * w_hat).sum(1, keepdim=True) * w_hat
    u = u / u.norm(dim=1, keepdim=True)
    return eta * w_hat + math.sqrt(1 - eta**2) * u


@settings(max_examples=12, deadline=None)
@given(
    kind=st.sampled_from(KINDS),
    K=st.integers(2, 8),
    M=st.sampled_from([128, 256, 512]),
    eta=st.floats(0.1, 0.9),
    seed=st.integers(0, 10_000),
)
def test_output_residual_follows_proposition_2(kind, K, M, eta, seed):
    """noise/signal of a retrieved row ≈ sqrt(v(K−1)/M)/η, within 15% (RMS over 2048 rows)."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2048
    ws = [torch.randn(rows, M, generator=gen, dtype=torch.float64) for _ in range(K)]
    ctx = make_contexts(kind, K, M, seed=seed, name="prop2")
    W = bind(ws, ctx)
    x = aligned_inputs(ws[0], eta, gen)
    signal = (ws[0] * x).sum(1)
    noise = ((unbind(W, ctx, 0).double() - ws[0]) * x).sum(1)
    measured = noise.pow(2).mean().sqrt() / signal.pow(2).mean().sqrt()
    assert measured.item() == pytest.approx(predicted_output_error(kind, K, M, eta), rel=0.15)


def test_low_precision_is_accumulated_in_fp32():
    ws = [torch.randn(4, 300).half() for _ in range(3)]
    ctx = make_contexts("binary", 3, 300, seed=0)
    W = bind(ws, ctx)
    assert W.dtype == torch.float32
    exact = sum(w.double() * ctx.vector(k).double() for k, w in enumerate(ws))
    assert torch.allclose(W.double(), exact, atol=1e-6)


def test_bind_checks_counts_and_fan_in():
    ctx = make_contexts("binary", 2, 4, seed=0)
    with pytest.raises(ValueError, match="needs 2"):
        bind([torch.ones(3, 4)], ctx)
    with pytest.raises(ValueError, match="fan-in"):
        bind([torch.ones(3, 5)] * 2, ctx)
