"""measure_bind: one blocked pass equals the whole-tensor computation it replaces."""

import pytest
import torch

import pspctl.measure as measure_mod
from pspctl.contexts import Kind, make_contexts
from pspctl.measure import measure_bind
from pspctl.superpose import bind, fan_in


def _copies(shape, dtype, K=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    parent = torch.randn(shape, generator=g)
    return [(parent + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(K)], parent.to(dtype)


@pytest.mark.parametrize("kind", ["binary", "complex", "onepower", "rotation"])
@pytest.mark.parametrize("centre", ["none", "mean", "base"])
@pytest.mark.parametrize(
    "shape, dtype, axis",
    [((37, 16), torch.float32, None), ((12, 3, 2, 2), torch.bfloat16, None), ((16, 9), torch.float64, 0)],
)
def test_one_pass_equals_the_whole_tensor_computation(monkeypatch, kind, centre, shape, dtype, axis):
    monkeypatch.setattr(measure_mod, "BLOCK", 40)  # several blocks, the last one partial
    copies, parent = _copies(shape, dtype)
    ctx = make_contexts(Kind(kind), len(copies), fan_in(shape, axis), 0, "w")
    found = measure_bind(copies, mean=True, parent=parent, ctx=ctx, centre=centre, axis=axis)

    wide = torch.float64 if dtype == torch.float64 else torch.float32
    mean = (sum(c.to(wide) for c in copies) / len(copies)).to(dtype)
    assert found.mean is not None and found.mean.dtype == dtype
    assert torch.allclose(found.mean.to(wide), mean.to(wide), rtol=1e-2 if dtype == torch.bfloat16 else 1e-6)
    mean = found.mean  # the deltas are taken from the mean as stored
    for k, c in enumerate(copies):
        c = c.to(wide)
        assert found.w_sq[k] == pytest.approx(float(c.double().norm()) ** 2, rel=1e-5)
        assert found.to_mean[k] == pytest.approx(float((c - mean.to(wide)).double().norm()) ** 2, rel=1e-5)
        assert found.to_parent[k] == pytest.approx(
            float((c - parent.to(wide)).double().norm()) ** 2, rel=1e-5
        )
    centre_of = {"none": None, "mean": mean, "base": parent}[centre]
    terms = [c.to(wide) - (0 if centre_of is None else centre_of.to(wide)) for c in copies]
    expected = bind(terms, ctx, axis)
    assert found.bound is not None and found.bound.shape == expected.shape
    assert torch.allclose(found.bound, expected, atol=1e-5), (found.bound - expected).abs().max()
    if kind != "rotation":  # the same sums in the same order: bit for bit
        assert torch.equal(found.bound, expected)
    assert not found.equal


def test_equal_copies_are_found_equal():
    copies, _ = _copies((8, 8), torch.float32, K=1)
    found = measure_bind(copies * 3)
    assert found.equal and found.bound is None and found.mean is None
    other = [copies[0], copies[0].clone(), copies[0].clone()]
    other[2][7, 7] += 1  # differs in the last block only
    assert not measure_bind(other).equal


def test_copies_are_taken_again_as_it_goes_with_the_same_result(monkeypatch):
    """`copies[k]` is indexed again every REREAD values (merge's sequence maps its input afresh
    each time, releasing the pages measured): the same result, from fresh tensors."""
    monkeypatch.setattr(measure_mod, "BLOCK", 40)  # 2 rows of 16 per block
    copies, parent = _copies((37, 16), torch.float32)
    ctx = make_contexts(Kind.BINARY, len(copies), 16, 0, "w")
    whole = measure_bind(copies, mean=True, parent=parent, ctx=ctx, centre="mean")

    class Fresh(list):
        fetched = 0

        def __getitem__(self, k):
            Fresh.fetched += 1
            return super().__getitem__(k).clone()  # a new tensor each time, as a new mapping is

    monkeypatch.setattr(measure_mod, "REREAD", 100)  # every 6 rows (3 blocks)
    found = measure_bind(Fresh(copies), mean=True, parent=parent, ctx=ctx, centre="mean")
    assert Fresh.fetched == len(copies) * 7  # rows 0, 6, 12, 18, 24, 30, 36
    assert torch.equal(found.bound, whole.bound) and torch.equal(found.mean, whole.mean)
    assert found.w_sq == whole.w_sq and found.to_mean == whole.to_mean and found.to_parent == whole.to_parent
