"""The merge's fast paths give what the plain computations give."""

import pytest
import torch
from safetensors.torch import save_file

from pspctl.errors import PolicyError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, _mean, merge


def save(tmp_path, states):
    paths = []
    for i, state in enumerate(states):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(state, str(paths[-1]))
    return paths


def states(dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(0)
    parent = torch.randn(64, 64, generator=g)
    return [{"w": ((parent + 0.1 * torch.randn(64, 64, generator=g)) * scale).to(dtype)} for _ in range(3)]


def test_huge_finite_weights_merge_and_a_nan_is_blamed_on_its_input(tmp_path):
    huge = states(scale=1e30)  # their float32 norm overflows to inf; every value is finite
    merge(save(tmp_path, huge), tmp_path / "w.safetensors")
    bad = states()
    bad[2]["w"][3, 4] = float("nan")
    (tmp_path / "bad").mkdir()
    with pytest.raises(PolicyError, match=r"m2\.safetensors: tensor 'w' has NaN/Inf"):
        merge(save(tmp_path / "bad", bad), tmp_path / "bad" / "w.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_stored_mean_is_the_inputs_mean(tmp_path, dtype):
    inputs = states(dtype)
    merge(save(tmp_path, inputs), tmp_path / "w.safetensors", MergeOptions(base="mean"))
    file = SuperposedFile(tmp_path / "w.safetensors")
    expected = _mean(s["w"] for s in inputs).to(dtype)
    if dtype == torch.bfloat16:  # summed in fp32: equal but for a rare last bit
        torch.testing.assert_close(file.base("w"), expected, rtol=0, atol=2**-7)
    else:
        assert torch.equal(file.base("w"), expected)
    assert file.metas["w"].centred and file.retrieve("w", 0).dtype == dtype
