"""The torch modules of the multi-context graph, against `unbind` (an independent computation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pspctl.contexts import Kind, make_contexts
from pspctl.onnx_export.modules import BoundLinear, ContextSlot, Retriever
from pspctl.superpose import bind, unbind


def superposed(kind: Kind, K: int, shape: tuple[int, ...], seed: int):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randn(*shape, generator=gen) for _ in range(K)]
    ctx = make_contexts(kind, K, int(torch.tensor(shape[1:]).prod()), seed, "w")
    return bind(weights, ctx), ctx


@settings(max_examples=40, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    K=st.integers(2, 5),
    n=st.integers(1, 6),
    m=st.integers(1, 7),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_bound_linear_equals_the_retrieved_linear(kind, K, n, m, seed, data):
    W, ctx = superposed(kind, K, (n, m), seed)
    k = data.draw(st.integers(0, K - 1))
    slot = ContextSlot()
    bound = BoundLinear(nn.Linear(m, n), W, ctx, slot)
    x = torch.randn(3, 2, m, generator=torch.Generator().manual_seed(seed + 1))  # any leading dims
    slot.index = torch.tensor(k)
    want = unbind(W, ctx, k)
    torch.testing.assert_close(bound.weight, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bound(x), F.linear(x, want, bound.bias), atol=1e-5, rtol=1e-4)


@settings(max_examples=25, deadline=None)
@given(kind=st.sampled_from(list(Kind)), K=st.integers(2, 4), seed=st.integers(0, 2**16), data=st.data())
def test_retriever_binds_a_conv_kernel_like_unbind(kind, K, seed, data):
    W, ctx = superposed(kind, K, (4, 2, 3, 3), seed)  # fan-in 2·3·3, eq. 8
    k = data.draw(st.integers(0, K - 1))
    slot = ContextSlot()
    retriever = Retriever(W, ctx, torch.float32, slot)
    slot.index = torch.tensor(k)
    torch.testing.assert_close(retriever(), unbind(W, ctx, k), atol=1e-5, rtol=1e-5)


def test_bound_layers_refuse_to_run_without_a_context():
    W, ctx = superposed(Kind.BINARY, 2, (2, 3), 0)
    bound = BoundLinear(nn.Linear(3, 2), W, ctx, ContextSlot())
    with pytest.raises(RuntimeError, match="only inside MultiContextModel.forward"):
        bound(torch.randn(1, 3))
