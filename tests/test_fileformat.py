import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pspctl.errors import ContextError, FormatError, InputError
from pspctl.fileformat import SuperposedFile
from tests.data.make_golden import GOLDEN_V2, HERE, V3_FOLDERS, V3_OPTIONS, inputs


@pytest.mark.parametrize("kind", ["binary", "complex"])
def test_golden_v1_file_still_reads(kind):
    """Files written by format v1 must extract the same forever."""
    sf = SuperposedFile(HERE / f"golden-v1-{kind}.safetensors")
    originals = inputs()
    assert sf.header.format_version == 1 and sf.kind.value == kind and sf.labels == ["golden-a", "golden-b"]
    assert sf.header.inputs[0]["path"] == "golden-a.safetensors"
    for k, name in enumerate(["a", "b"]):
        sd = sf.state_dict(k)
        for key in ("lin.bias", "head.weight", "steps"):
            assert torch.equal(sd[key], originals[name][key])
        # The superposed weight decodes by the documented rule from the stored contexts.
        other = originals["b" if k == 0 else "a"]["lin.weight"]
        if kind == "binary":
            bits = sf.raw("contexts/lin.weight")
            signs = ((bits.unsqueeze(-1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).reshape(2, -1)[
                :, :10
            ] * 2.0 - 1
            expected = originals[name]["lin.weight"] + other * signs[0] * signs[1]
        else:
            phi = sf.raw("contexts/lin.weight")
            expected = originals[name]["lin.weight"] + other * torch.cos(phi[k] - phi[1 - k])
        assert torch.allclose(sd["lin.weight"], expected, atol=1e-6)


@pytest.mark.parametrize("name", list(GOLDEN_V2))
def test_writer_reproduces_the_golden_tensors(tmp_path, name, monkeypatch):
    """Same inputs and seed give the same tensors and header: contexts and layout are pinned."""
    from pspctl.merge import merge

    for source in ("golden-a.safetensors", "golden-b.safetensors"):
        shutil.copy(HERE / source, tmp_path / source)
    monkeypatch.chdir(tmp_path)
    merge(["golden-a.safetensors", "golden-b.safetensors"], "new.safetensors", GOLDEN_V2[name])
    golden, new = load_file(HERE / f"golden-v2-{name}.safetensors"), load_file(tmp_path / "new.safetensors")
    assert golden.keys() == new.keys()
    for k in golden:
        if k.startswith("superposed/"):
            # Complex binding goes through vectorised cos/sin, whose last bit may vary by CPU.
            assert torch.allclose(golden[k], new[k], rtol=1e-6, atol=1e-7), k
        else:  # contexts come from the seeded RNG, per-context tensors are copies: bit-exact
            assert torch.equal(golden[k], new[k]), k
    headers = []
    for path in (HERE / f"golden-v2-{name}.safetensors", tmp_path / "new.safetensors"):
        with safe_open(str(path), "pt") as f:
            header = json.loads(f.metadata()["pspctl.header"])
        header.pop("pspctl_version")
        for meta in header["tensors"].values():  # informative text (docs/format.md), not format
            assert isinstance(meta.pop("reason"), str)
        headers.append(header)
    assert headers[0] == headers[1]


def test_golden_v3_file_keeps_each_contexts_config(tmp_path, monkeypatch):
    """Format v3 (HF folders whose config.json differs in its labels): each context's config
    comes back byte for byte; the writer reproduces the file's tensors and header."""
    from pspctl.extract import extract
    from pspctl.merge import merge

    sf = SuperposedFile(HERE / "golden-v3-labels.safetensors")
    assert sf.header.format_version == 3 and sf.labels == ["golden-hf-a", "golden-hf-b"]
    for k, folder in enumerate(V3_FOLDERS):
        (out,) = extract(sf.path, k, tmp_path / f"x{k}", fmt="hf")
        assert (out / "config.json").read_bytes() == (HERE / folder / "config.json").read_bytes()
        assert torch.equal(
            sf.state_dict(k)["lin.bias"], load_file(HERE / folder / "model.safetensors")["lin.bias"]
        )
    for folder in V3_FOLDERS:
        shutil.copytree(HERE / folder, tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    merge(V3_FOLDERS, "new.safetensors", V3_OPTIONS)
    golden, new = load_file(HERE / "golden-v3-labels.safetensors"), load_file("new.safetensors")
    assert golden.keys() == new.keys() and "files/1/config.json" in golden
    assert all(torch.equal(golden[k], new[k]) for k in golden)
    headers = []
    for path in (HERE / "golden-v3-labels.safetensors", tmp_path / "new.safetensors"):
        with safe_open(str(path), "pt") as f:
            assert f.metadata()["pspctl.format_version"] == "3"
            header = json.loads(f.metadata()["pspctl.header"])
        header.pop("pspctl_version")
        for meta in header["tensors"].values():
            meta.pop("reason")
        headers.append(header)
    assert headers[0] == headers[1]


def test_golden_v2_centred_file_retrieves_base_plus_unbound_deltas():
    """v2, centred: Ŵ_k = B + unbind(Σ_s (W_s − B) ⊙ c_s, c_k), B the inputs' mean, exactly as
    the spec computes it; per-context tensors exact."""
    sf = SuperposedFile(HERE / "golden-v2-mean.safetensors")
    originals = inputs()
    assert sf.header.format_version == 2 and sf.header.base == {
        "source": "mean",
        "path": None,
        "sha256": None,
        "linked": False,
    }
    assert sf.metas["lin.weight"].centred and not sf.metas["head.weight"].centred
    a, b = originals["a"]["lin.weight"], originals["b"]["lin.weight"]
    base = (a.double() + b.double()) / 2
    assert torch.equal(sf.raw("base/lin.weight"), base.float())
    bits = sf.raw("contexts/lin.weight")
    signs = ((bits.unsqueeze(-1) >> torch.arange(7, -1, -1, dtype=torch.uint8)) & 1).reshape(2, -1)[
        :, :10
    ] * 2.0 - 1
    deltas = [a - base.float(), b - base.float()]
    S = deltas[0] * signs[0] + deltas[1] * signs[1]
    for k, name in enumerate("ab"):
        expected = base.float() + S * signs[k]
        assert torch.equal(sf.state_dict(k)["lin.weight"], expected)
        # the other model's delta is the residual: W_k + Δ_other ⊙ c_other ⊙ c_k
        assert torch.allclose(
            expected, originals[name]["lin.weight"] + deltas[1 - k] * signs[0] * signs[1], atol=1e-6
        )
        assert torch.equal(sf.state_dict(k)["head.weight"], originals[name]["head.weight"])


def _rewrite_metadata(src, dst, **changes):
    with safe_open(str(src), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(dst), metadata=meta)


def test_unknown_version_and_plain_files_are_refused(tmp_path):
    src = HERE / "golden-v1-binary.safetensors"
    _rewrite_metadata(src, tmp_path / "v9.safetensors", **{"pspctl.format_version": "9"})
    with pytest.raises(FormatError, match="format version 9, this pspctl reads versions 1, 2, 3"):
        SuperposedFile(tmp_path / "v9.safetensors")
    with pytest.raises(FormatError, match="plain safetensors file, not a pspctl"):
        SuperposedFile(HERE / "golden-a.safetensors")
    _rewrite_metadata(src, tmp_path / "bad.safetensors", **{"pspctl.header": "{not json"})
    with pytest.raises(FormatError, match="corrupt pspctl header"):
        SuperposedFile(tmp_path / "bad.safetensors")


def test_truncated_superposed_file(tmp_path):
    data = (HERE / "golden-v1-binary.safetensors").read_bytes()
    (tmp_path / "t.safetensors").write_bytes(data[:-10])
    with pytest.raises(InputError, match="not a readable safetensors file"):
        SuperposedFile(tmp_path / "t.safetensors")


def test_context_errors():
    sf = SuperposedFile(HERE / "golden-v1-binary.safetensors")
    with pytest.raises(ContextError, match=r"context 2 out of range: this file holds contexts 0..1"):
        sf.state_dict(2)
    with pytest.raises(ContextError, match="unknown context 'c'; labels are golden-a, golden-b"):
        sf.state_dict("c")
    for spec in (1.7, 0.2, True):  # int() would truncate them to a context silently
        with pytest.raises(ContextError, match=r"give an index \(an integer\) or a label \(str\)"):
            sf.state_dict(spec)
    assert sf.resolve_context("1") == sf.resolve_context(1) == 1
    import numpy as np

    # Integers of other kinds (an argmax, torch.arange) are indices too.
    assert sf.resolve_context(torch.tensor(1)) == sf.resolve_context(np.int64(1)) == 1
    with pytest.raises(ContextError, match="give an index"):
        sf.resolve_context(torch.tensor(1.0))
