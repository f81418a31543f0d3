"""The torch modules of the multi-context graph, against `unbind` (an independent computation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pspctl.contexts import Kind, make_contexts
from pspctl.onnx_export.modules import (
    AllContextsLinear,
    BoundConv,
    BoundLinear,
    ContextSlot,
    Retriever,
    all_k_pays,
)
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


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(list(Kind)), K=st.integers(2, 4), seed=st.integers(0, 2**16), data=st.data())
def test_centred_bound_linear_is_base_plus_retrieved(kind, K, seed, data):
    """y = [B | S][x ; c_k ⊙ x] (complex: [B | Re S | Im S][x ; cos ⊙ x ; −sin ⊙ x]) = (B + Ŵ_k) x."""
    W, ctx = superposed(kind, K, (5, 6), seed)
    base = torch.randn(5, 6, generator=torch.Generator().manual_seed(seed + 2))
    k = data.draw(st.integers(0, K - 1))
    slot = ContextSlot()
    bound = BoundLinear(nn.Linear(6, 5), W, ctx, slot, base)
    slot.index = torch.tensor(k)
    want = base + unbind(W, ctx, k)
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(seed + 1))
    torch.testing.assert_close(bound.weight, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bound(x), F.linear(x, want, bound.bias), atol=1e-5, rtol=1e-4)


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(list(Kind)),
    K=st.integers(2, 4),
    stride=st.integers(1, 3),
    padding=st.integers(0, 2),
    centred=st.booleans(),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_pointwise_conv_binds_on_the_input_side_exactly(kind, K, stride, padding, centred, seed, data):
    """A 1×1 kernel: eq. 8's context is one number per input channel, so W * (c_k ⊙ x) = Ŵ_k * x
    for any stride and zero padding."""
    W, ctx = superposed(kind, K, (4, 3, 1, 1), seed)
    base = torch.randn(4, 3, 1, 1, generator=torch.Generator().manual_seed(seed + 2)) if centred else None
    conv = nn.Conv2d(3, 4, 1, stride=stride, padding=padding)
    assert BoundConv.exact(conv, "weight")
    k = data.draw(st.integers(0, K - 1))
    slot = ContextSlot()
    bound = BoundConv(conv, W, ctx, slot, base)
    slot.index = torch.tensor(k)
    kernel = unbind(W, ctx, k) + (0 if base is None else base)
    x = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(seed + 1))
    want = F.conv2d(x, kernel, conv.bias, stride, padding)
    torch.testing.assert_close(bound(x), want, atol=1e-5, rtol=1e-4)


def test_input_side_conv_binding_only_where_exact():
    """A 3×3 kernel: c_k differs between kernel positions of one channel (eq. 8), so no context
    on the input's channels reproduces Ŵ_k * x; grouped and non-zero-padded convs are left too."""
    assert not BoundConv.exact(nn.Conv2d(3, 4, 3), "weight")
    assert not BoundConv.exact(nn.Conv2d(4, 4, 1, groups=2), "weight")
    assert not BoundConv.exact(nn.Conv2d(3, 4, 1, padding=1, padding_mode="reflect"), "weight")
    assert BoundConv.exact(nn.Conv1d(3, 4, 1, stride=2), "weight")
    W, ctx = superposed(Kind.BINARY, 2, (4, 3, 3, 3), 0)
    signs = ctx.data[0].reshape(3, 3, 3)
    assert (signs != signs[:, :1, :1]).any()  # the context varies over the window of a channel


def test_all_contexts_linear_is_the_per_context_linear():
    K, slot = 3, ContextSlot()
    weights, biases = torch.randn(K, 5, 7), torch.randn(K, 5)
    layer = AllContextsLinear(weights, biases, slot)
    for x in (torch.randn(4, 7), torch.randn(2, 3, 7)):  # rows, and any leading dims
        for k in range(K):
            slot.index = torch.tensor(k)
            torch.testing.assert_close(layer(x), F.linear(x, weights[k], biases[k]))
            torch.testing.assert_close(layer.weight, weights[k])


def test_the_cost_model_gathers_at_large_batch_or_size():
    assert all_k_pays(2, 64, 64, batch=1) and all_k_pays(3, 64, 64, batch=1)
    assert not all_k_pays(4, 64, 64, batch=1)  # measured: the Gather wins at K = 4
    assert not all_k_pays(2, 64, 64, batch=64)
    assert not all_k_pays(2, 4096, 4096, batch=1)  # K copies of 64 MiB: no
