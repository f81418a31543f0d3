import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from pspctl.contexts import Kind
from pspctl.errors import MismatchError, OutputError, PolicyError
from pspctl.extract import extract
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.policy import SHAPE_RULES, Policy, Role
from pspctl.superpose import bind, unbind
from tests.conftest import cnn, mlp, save_models

ALL = Policy(superpose=("*",))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kind=st.sampled_from(list(Kind)),
    K=st.integers(2, 4),
    seed=st.integers(0, 1000),
    suffix=st.sampled_from([".pt", ".safetensors"]),
)
def test_extract_merge_restores_per_context_tensors_exactly(tmp_path_factory, kind, K, seed, suffix):
    tmp = tmp_path_factory.mktemp("m")
    models = [mlp(seed + i, width=24) for i in range(K)]
    paths = save_models(models, tmp, suffix)
    merge(
        paths,
        tmp / "w.safetensors",
        MergeOptions(base="none", kind=kind, seed=seed, policy=Policy(keep=("4.*",))),
    )
    sf = SuperposedFile(tmp / "w.safetensors")
    for k, model in enumerate(models):
        got = sf.state_dict(k)
        original = model.state_dict()
        # .pt keeps the model's key order; safetensors lists names sorted.
        assert list(got) == (list(original) if suffix == ".pt" else sorted(original))
        for name in sf.names(Role.PER_CONTEXT):
            assert torch.equal(got[name], original[name]), name
        fresh = mlp(0, width=24)
        fresh.load_state_dict(got)  # strict: keys, shapes, dtypes fit


@pytest.mark.parametrize("kind", list(Kind))
def test_superposed_tensors_are_retrieved_with_the_stored_contexts(tmp_path, kind):
    models = [mlp(i) for i in range(3)]
    paths = save_models(models, tmp_path)
    merge(paths, tmp_path / "w.safetensors", MergeOptions(base="none", kind=kind, policy=ALL))
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert sf.names(Role.SUPERPOSED) == ["0.weight", "2.weight", "4.weight"]
    W = sf.superposed("2.weight")
    ctx = sf.contexts("2.weight")
    ws = [m.state_dict()["2.weight"] for m in models]
    for k in range(3):
        assert torch.equal(sf.retrieve("2.weight", k), unbind(W, ctx, k))
        # Ŵ_k = W_k + residual from the others, with E‖residual‖² = v Σ‖W_s‖².
        others = sum(w.norm() ** 2 for s, w in enumerate(ws) if s != k)
        err = (sf.retrieve("2.weight", k) - ws[k]).norm()
        assert 0.6 < err / (Kind(kind).variance_factor * others).sqrt() < 1.4


def test_conv_kernel_is_bound_over_in_channels_per_group_times_kernel(tmp_path):
    """Eq. 8: binding the kernel equals binding its flattened fan-in, groups included."""
    models = [cnn(i) for i in range(2)]
    paths = save_models(models, tmp_path)
    merge(paths, tmp_path / "w.safetensors", MergeOptions(base="none", kind="binary", policy=ALL))
    sf = SuperposedFile(tmp_path / "w.safetensors")
    meta = sf.header.tensors["3.weight"]
    assert meta.fan_in == (8 // 2) * 3 * 3 and meta.role == "superposed"
    c = sf.contexts("3.weight").vector(1).reshape(4, 3, 3)
    x = torch.randn(2, 8, 5, 5)
    bound = F.conv2d(x, sf.superposed("3.weight") * c, padding=1, groups=2)
    retrieved = F.conv2d(x, sf.retrieve("3.weight", 1), padding=1, groups=2)
    assert torch.allclose(bound, retrieved, atol=1e-5)
    # BatchNorm statistics and num_batches_tracked come back exactly, per context.
    sd = sf.state_dict(1)
    assert torch.equal(sd["1.running_mean"], models[1].state_dict()["1.running_mean"])
    assert sd["1.num_batches_tracked"].dtype == torch.int64


def test_default_policy_superposes_nothing_of_unrelated_models_and_says_so(tmp_path):
    paths = save_models([mlp(i, width=256) for i in range(3)], tmp_path)
    report = merge(paths, tmp_path / "w.safetensors", MergeOptions())
    # Independently trained: centring on the mean barely shrinks them; every error is over budget.
    assert all(d.role is not Role.SUPERPOSED for d in report.decisions)
    assert "over the budget" in {d.name: d.reason for d in report.decisions}["2.weight"]
    assert report.storage_ratio == pytest.approx(1.0, abs=0.01) and "--base PATH" in report.notes[-1]


def test_shape_rules_keep_small_fan_in_and_heads(tmp_path):
    paths = save_models([mlp(i, width=256) for i in range(3)], tmp_path)
    report = merge(paths, tmp_path / "w.safetensors", MergeOptions(base="none", policy=SHAPE_RULES))
    roles = {d.name: (d.role, d.reason) for d in report.decisions}
    assert roles["0.weight"][0] is Role.PER_CONTEXT and "interference" in roles["0.weight"][1]  # 2/16
    assert roles["2.weight"] == (Role.SUPERPOSED, "within the error budget")  # 2/256 < 0.02
    assert roles["4.weight"][0] is Role.PER_CONTEXT and "share" in roles["4.weight"][1]
    assert roles["2.bias"][1] == "fewer than 2 dims"
    assert report.storage_ratio > 1.5
    assert report.output_bytes == (tmp_path / "w.safetensors").stat().st_size


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_dtypes_are_kept(tmp_path, dtype):
    paths = save_models([mlp(i).to(dtype) for i in range(2)], tmp_path)
    merge(paths, tmp_path / "w.safetensors", MergeOptions(base="none", kind="complex", policy=ALL))
    sf = SuperposedFile(tmp_path / "w.safetensors")
    assert sf.raw("superposed/2.weight").dtype == dtype
    assert all(t.dtype == dtype for t in sf.state_dict(0).values())
    merge(paths, tmp_path / "w32.safetensors", MergeOptions(base="none", policy=ALL, dtype="float32"))
    sf32 = SuperposedFile(tmp_path / "w32.safetensors")
    assert sf32.raw("superposed/2.weight").dtype == torch.float32
    assert sf32.state_dict(0)["2.weight"].dtype == dtype  # extraction restores the input dtype


def test_mismatched_inputs_list_the_differences_and_write_nothing(tmp_path):
    a = mlp(0).state_dict()
    b = dict(mlp(1).state_dict())
    b["2.weight"] = torch.zeros(5, 48)
    b["extra"] = torch.zeros(1)
    del b["4.bias"]
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    with pytest.raises(MismatchError) as e:
        merge([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "w.safetensors")
    msg = str(e.value)
    assert "2.weight: shape [5, 48] in b.pt vs [48, 48]" in msg
    assert "4.bias: missing in b.pt" in msg and "extra: only in b.pt" in msg
    assert not (tmp_path / "w.safetensors").exists()


def test_dtype_mismatch(tmp_path):
    torch.save(mlp(0).state_dict(), tmp_path / "a.pt")
    torch.save(mlp(1).half().state_dict(), tmp_path / "b.pt")
    with pytest.raises(MismatchError, match="dtype float16 in b.pt vs float32"):
        merge([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "w.safetensors")


def test_nonfinite_weights_are_refused_and_no_partial_file_is_left(tmp_path):
    sd = mlp(1).state_dict()
    sd["4.bias"][0] = float("nan")  # the last tensor: the merge fails after doing all the others
    torch.save(mlp(0).state_dict(), tmp_path / "a.pt")
    torch.save(sd, tmp_path / "b.pt")
    with pytest.raises(PolicyError, match=r"'4.bias' has NaN/Inf.*--allow-nonfinite"):
        merge([tmp_path / "a.pt", tmp_path / "b.pt"], tmp_path / "w.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt"]
    merge(
        [tmp_path / "a.pt", tmp_path / "b.pt"],
        tmp_path / "w.safetensors",
        MergeOptions(base="none", allow_nonfinite=True),
    )
    assert torch.isnan(SuperposedFile(tmp_path / "w.safetensors").state_dict(1)["4.bias"][0])


def test_rotation_fan_in_limit(tmp_path):
    paths = save_models([mlp(i) for i in range(2)], tmp_path)
    with pytest.raises(PolicyError, match="rotation fan-in 48 exceeds the limit 32"):
        merge(
            paths,
            tmp_path / "w.safetensors",
            MergeOptions(base="none", kind="rotation", policy=ALL, max_rotation_fan_in=32),
        )
    assert not (tmp_path / "w.safetensors").exists()


def test_output_safety(tmp_path, mlp_paths):
    with pytest.raises(OutputError, match="output is one of the inputs"):
        merge(mlp_paths, mlp_paths[0], MergeOptions(base="none", force=True))
    out = tmp_path / "w.safetensors"
    merge(mlp_paths, out)
    with pytest.raises(OutputError, match="already exists"):
        merge(mlp_paths, out)
    merge(mlp_paths, out, MergeOptions(base="none", kind="complex", force=True))
    assert SuperposedFile(out).kind is Kind.COMPLEX
    with pytest.raises(MismatchError, match="at least 2 inputs"):
        merge(mlp_paths[:1], tmp_path / "x.safetensors")


def test_labels_and_context_resolution(tmp_path, mlp_paths):
    out = tmp_path / "w.safetensors"
    merge(mlp_paths, out, MergeOptions(base="none", labels=["day", "night", "dusk"]))
    sf = SuperposedFile(out)
    assert sf.labels == ["day", "night", "dusk"]
    assert sf.resolve_context("night") == 1 and sf.resolve_context(2) == 2
    with pytest.raises(MismatchError, match="2 labels for 3 inputs"):
        merge(mlp_paths, tmp_path / "x.safetensors", MergeOptions(base="none", labels=["a", "b"]))


def test_extract_all_and_formats(tmp_path, mlp_paths):
    out = tmp_path / "w.safetensors"
    merge(mlp_paths, out)
    written = extract(out, "all", tmp_path / "models", fmt="pt")
    assert [p.name for p in written] == ["model0.pt", "model1.pt", "model2.pt"]
    one = extract(out, "model1", tmp_path / "one.safetensors")[0]
    from_pt = torch.load(written[1], weights_only=True)
    from safetensors.torch import load_file

    from_st = load_file(one)
    assert all(torch.equal(from_pt[k], from_st[k]) for k in from_pt)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        extract(out, "all", tmp_path / "afile")


@pytest.mark.parametrize(
    "base, kind",
    [("none", "binary"), ("mean", "binary"), ("auto", "binary"), ("auto", "complex"), ("auto", "rotation")],
)
def test_merge_reads_each_superposed_tensor_once(tmp_path, monkeypatch, base, kind):
    """One read per input of a superposed tensor: measured and bound while its K copies are
    held (one tensor name at a time), never read again to be written; and what is written
    equals binding the inputs afresh."""
    from collections import Counter

    from pspctl.checkpoints import Checkpoint

    paths = save_models([mlp(i) for i in range(3)], tmp_path, ".safetensors")
    reads: Counter[str] = Counter()
    real_get = Checkpoint.__getitem__

    def spy(self, name):
        reads[name] += 1
        return real_get(self, name)

    monkeypatch.setattr(Checkpoint, "__getitem__", spy)
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base=base, kind=kind, policy=ALL))
    sf = SuperposedFile(out)
    superposed = [n for n, m in sf.metas.items() if m.role == Role.SUPERPOSED]
    assert superposed and all(reads[n] == 3 for n in superposed), reads
    originals = [load_file(p) for p in paths]
    for name in superposed:
        ctx = sf.contexts(name)
        if sf.metas[name].centred:
            B = torch.stack([o[name] for o in originals]).mean(0)
            assert torch.allclose(sf.base(name), B, atol=1e-6)
            expected = bind([o[name] - sf.base(name) for o in originals], ctx)
        else:
            expected = bind([o[name] for o in originals], ctx)
        assert torch.allclose(sf.superposed(name), expected, atol=1e-5)


def test_a_checksum_taken_ahead_is_taken_again_after_an_in_place_change(tmp_path, monkeypatch):
    """merge checksums what it binds while it reads; `--base auto` then adds the mean back in
    place to a sum that ends up without a base: the file's checksums are of the bytes written."""
    from pspctl.fileformat import SuperposedWriter

    real = SuperposedWriter.checksum_ahead

    def at_once(self, tensor):
        real(self, tensor)
        self._ahead[id(tensor)][2].result()  # taken before the change, not racing it

    monkeypatch.setattr(SuperposedWriter, "checksum_ahead", at_once)
    paths = save_models([mlp(i) for i in range(3)], tmp_path, ".safetensors")  # unrelated: no base
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base="auto", policy=ALL))
    sf = SuperposedFile(out)
    plain = [n for n, m in sf.metas.items() if m.role == Role.SUPERPOSED and not m.centred]
    assert plain
    originals = [load_file(p) for p in paths]
    for name in plain:  # every read checks the stored checksum
        assert torch.allclose(
            sf.superposed(name), bind([o[name] for o in originals], sf.contexts(name)), atol=1e-5
        )


def test_a_superposed_file_is_not_a_merge_input(tmp_path, mlp_paths):
    merge(mlp_paths, tmp_path / "w.safetensors")
    save_file({"w": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
    from pspctl.errors import InputError

    with pytest.raises(InputError, match="is a pspctl superposed file"):
        merge([tmp_path / "w.safetensors", mlp_paths[0]], tmp_path / "x.safetensors")


def test_a_16_bit_sum_stored_without_a_base_is_rounded_once(tmp_path):
    """--base auto binds on the mean first; a tensor that ends up plain is bound afresh when it
    is stored in 16 bits (putting the mean back would round it twice)."""
    models = [mlp(i).to(torch.bfloat16) for i in range(3)]  # unrelated: auto picks no base
    paths = save_models(models, tmp_path, ".safetensors")
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base="auto", policy=ALL))
    sf = SuperposedFile(out)
    plain = [n for n in sf.names(Role.SUPERPOSED) if not sf.metas[n].centred]
    assert plain
    originals = [load_file(p) for p in paths]
    for name in plain:
        exact = bind([o[name] for o in originals], sf.contexts(name))
        assert torch.equal(sf.raw(f"superposed/{name}"), exact.to(torch.bfloat16))


def test_a_mean_of_values_near_the_float32_limit_stays_finite(tmp_path):
    g = torch.Generator().manual_seed(0)
    big = [{"w": (torch.rand(8, 16, generator=g) + 0.5) * 1.5e38} for _ in range(3)]
    paths = []
    for k, state in enumerate(big):
        save_file(state, tmp_path / f"big{k}.safetensors")
        paths.append(tmp_path / f"big{k}.safetensors")
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base="mean", policy=Policy(superpose=("w",))))
    sf = SuperposedFile(out)
    assert sf.metas["w"].centred and torch.isfinite(sf.base("w")).all()
    assert torch.allclose(
        sf.base("w").double(), torch.stack([s["w"].double() for s in big]).mean(0), rtol=1e-6
    )
    assert all(torch.isfinite(sf.retrieve("w", k)).all() for k in range(3))
