"""Each tensor's fan-in axis from the architecture (pspctl.architectures): GPT-2's Conv1D is
bound on its true fan-in (dim 0), depthwise convs get in/groups × kernel, and the axis is
recorded in the file and used by every reader."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from pspctl.architectures import axes_from_config, axes_from_model, parse_overrides, resolve_axes
from pspctl.contexts import make_contexts
from pspctl.errors import FormatError, PolicyError
from pspctl.fileformat import SuperposedFile
from pspctl.header import parse_header
from pspctl.merge import MergeOptions, merge
from pspctl.policy import Policy, TensorInfo, decide
from pspctl.superpose import as_matrix, bind, fan_in, from_matrix, predicted_output_error, unbind


def test_as_matrix_moves_the_fan_in_last_and_back():
    t = torch.arange(24.0).reshape(2, 3, 4)
    for axis in (None, 0, 1, 2):
        m = as_matrix(t, axis)
        assert m.shape[1] == fan_in(t.shape, axis)
        assert torch.equal(from_matrix(m, t.shape, axis), t)
    assert torch.equal(as_matrix(t[0], 0), t[0].T)  # a 2-d [in, out] weight becomes [out, in]


@pytest.mark.parametrize("kind", ["binary", "complex", "rotation", "onepower"])
def test_bind_on_axis_0_is_bind_of_the_transpose(kind):
    # The oracle: binding a Conv1D weight [in, out] on axis 0 is binding its Linear form [out, in].
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(6, 5, generator=gen) for _ in range(3)]
    ctx = make_contexts(kind, 3, 6, seed=1, name="w")
    on_axis = bind(weights, ctx, axis=0)
    transposed = bind([w.T for w in weights], ctx)
    assert torch.allclose(on_axis, transposed.T)
    for k in range(3):
        assert torch.allclose(unbind(on_axis, ctx, k, axis=0), unbind(transposed, ctx, k).T)


def test_axes_from_model_module_types():
    model = nn.Sequential(
        nn.Linear(4, 3), nn.Conv2d(3, 3, 3, groups=3), nn.ConvTranspose2d(3, 2, 3), nn.Embedding(5, 4)
    )
    assert axes_from_model(model) == {"2.weight": 0}  # Linear, Conv, Embedding: the default


def test_resolve_axes_sources_and_overrides():
    shapes = {"h.0.attn.c_attn.weight": (8, 24), "h.0.ln.weight": (8,), "w": (4, 3, 2)}
    config = axes_from_config({"model_type": "gpt2"}, list(shapes))
    assert config == {"h.0.attn.c_attn.weight": 0}
    assert axes_from_config({"model_type": "llama"}, list(shapes)) == {}
    assert axes_from_config({"architectures": ["GPT2LMHeadModel"]}, list(shapes)) == config
    assert resolve_axes(shapes, config=config) == {"h.0.attn.c_attn.weight": 0}
    # Overrides win; 'rest' restores the default; a 2-d axis 1 is the default; 1-d never.
    overrides = parse_overrides(["*c_attn*=rest", "w=2", "*ln*=0"])
    assert resolve_axes(shapes, config=config, overrides=overrides) == {"w": 2}
    assert resolve_axes(shapes, overrides=parse_overrides(["*c_attn*=1"])) == {}
    with pytest.raises(PolicyError, match="has only 3 dims"):
        resolve_axes(shapes, overrides=parse_overrides(["w=3"]))
    with pytest.raises(PolicyError, match="GLOB=AXIS"):
        parse_overrides(["w:0"])


def test_depthwise_and_grouped_convs_get_their_true_fan_in(tmp_path: Path):
    # A depthwise 3×3 conv sums over 1 channel × 9 taps: M = 9; a grouped 5×5, C/groups × 25.
    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(16, 16, 3, groups=16), nn.Conv2d(16, 16, 5, groups=4))

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.pt")
        torch.save(model(i).state_dict(), paths[-1])
    infos = [
        TensorInfo("0.weight", (16, 1, 3, 3), "float32"),
        TensorInfo("1.weight", (16, 4, 5, 5), "float32"),
    ]
    decisions = decide(infos, 3, Policy())
    assert [d.fan_in for d in decisions] == [9, 100]
    assert decisions[0].interference == pytest.approx(2 / 9)
    out = tmp_path / "w.safetensors"
    eta = 0.5
    report = merge(paths, out, MergeOptions(base="none", policy=Policy(superpose=("*.weight",), eta=eta)))
    sf = SuperposedFile(out)
    assert sf.header.tensors["0.weight"].fan_in == 9
    assert sf.header.tensors["1.weight"].fan_in == 100
    # The policy's predicted error used M = 9: Proposition 2 with the models' own norms.
    d = next(d for d in report.decisions if d.name == "0.weight")
    norms = [float(torch.load(p)["0.weight"].norm()) ** 2 for p in paths]
    expected = max(math.sqrt((sum(norms) - n) / (9 * eta**2 * n)) for n in norms)
    assert d.error == pytest.approx(expected, rel=1e-4)
    assert sf.contexts("0.weight").fan_in == 9


def test_header_checks_the_axis():
    meta = '"role":"superposed","dtype":"float32","shape":[6,5],"fan_in":6,"fan_in_axis":0'
    text = '{"kind":"binary","seed":0,"num_contexts":2,"labels":["a","b"],"tensors":{"w":{' + meta + "}}}"
    header = parse_header(text)
    assert header.tensors["w"].fan_in_axis == 0
    from pspctl.header import check_header

    check_header(header, "2")
    with pytest.raises(FormatError, match="fan_in 6 does not fit"):
        check_header(parse_header(text.replace('"fan_in_axis":0', '"fan_in_axis":1')), "2")
    with pytest.raises(FormatError, match="fan_in_axis 2 does not fit"):
        check_header(parse_header(text.replace('"fan_in_axis":0', '"fan_in_axis":2')), "2")


# --- GPT-2: transformers' Conv1D stores [in, out] -------------------------------------------

K, EMBD = 4, 64


def _gpt2_family(tmp_path: Path, *, folders: bool) -> list[Path]:
    """K fine-tunes of one tiny GPT-2: the parent plus 1% noise per weight."""
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=EMBD, n_head=4, vocab_size=97, n_positions=32, resid_pdrop=0.0,
        embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    parent = transformers.GPT2LMHeadModel(config).eval()
    paths = []
    for k in range(K):
        torch.manual_seed(100 + k)
        child = transformers.GPT2LMHeadModel(config).eval()
        child.load_state_dict(parent.state_dict())
        with torch.no_grad():
            for p in child.parameters():
                p.add_(0.01 * p.std() * torch.randn_like(p) if p.dim() > 1 else 0)
        if folders:
            child.save_pretrained(tmp_path / f"child{k}")
            paths.append(tmp_path / f"child{k}")
        else:
            paths.append(tmp_path / f"child{k}.pt")
            torch.save(child.state_dict(), paths[-1])
    return paths


def _aligned_error(
    sf: SuperposedFile, originals: list[dict[str, torch.Tensor]], names: list[str]
) -> tuple[float, float]:
    """(relative output error, mean alignment η) of retrieved Conv1D weights [in, out], over
    all K and `names`, on inputs aligned with each output unit's weights: x = sign(w_i), so
    that |⟨w_i, x⟩| = η‖w_i‖‖x‖ with η ≈ 0.8 and, as Proposition 2 assumes, x_m² independent
    of the other models' weights (x = w_i itself would weigh the noise by w⁴). One tensor's
    units share its M contexts, so several tensors average Proposition 2's expectation."""
    num = den = 0.0
    etas = []
    for k, name in [(k, n) for k in range(len(originals)) for n in names]:
        state = originals[k]
        W = state[name].double()  # [in, out]: output unit i's fan-in weights are W[:, i]
        W_hat = sf.retrieve(name, k).double()
        x = torch.sign(W)
        y, y_hat = (W * x).sum(0), (W_hat * x).sum(0)
        etas += (y.abs() / (W.norm(dim=0) * x.norm(dim=0))).tolist()
        num += float((y_hat - y).square().sum())
        den += float(y.square().sum())
    return math.sqrt(num / den), sum(etas) / len(etas)


@pytest.mark.parametrize("source", ["config.json", "override", "task"])
def test_gpt2_true_fan_in_gives_proposition_2s_error_and_the_fan_out_does_not(tmp_path: Path, source: str):
    folders = source == "config.json"
    paths = _gpt2_family(tmp_path, folders=folders)
    # Every Conv1D with fan-in 64: c_attn [64, 192], attn.c_proj [64, 64], c_fc [64, 256].
    names = [
        f"transformer.h.{i}.{w}.weight" for i in range(2) for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc")
    ]
    name = names[-1]
    policy = Policy(superpose=("*.c_attn.weight", "*.attn.c_proj.weight", "*.mlp.c_fc.weight"))
    options = {
        "config.json": MergeOptions(base="none", policy=policy),
        "override": MergeOptions(base="none", policy=policy, fan_in_axes=parse_overrides(["*.c_*.weight=0"])),
        "task": MergeOptions(base="none", policy=policy, task=str(_gpt2_task(tmp_path))),
    }[source]
    merge(paths, tmp_path / "true.safetensors", options)
    fan_out = MergeOptions(base="none", policy=policy, fan_in_axes=parse_overrides(["*=rest"]))
    merge(paths, tmp_path / "fan_out.safetensors", fan_out)

    true_sf, out_sf = (
        SuperposedFile(tmp_path / "true.safetensors"),
        SuperposedFile(tmp_path / "fan_out.safetensors"),
    )
    assert true_sf.header.tensors[name].fan_in_axis == 0
    assert true_sf.header.tensors[name].fan_in == EMBD
    assert out_sf.header.tensors[name].fan_in_axis is None
    assert out_sf.header.tensors[name].fan_in == 4 * EMBD
    originals = [_state(p) for p in paths]
    measured_true, eta = _aligned_error(true_sf, originals, names)
    measured_out, _ = _aligned_error(out_sf, originals, names)
    predicted = predicted_output_error("binary", K, EMBD, eta)  # sqrt(3/64)/0.8 ≈ 0.27
    assert 0.7 < eta < 0.9
    assert measured_true == pytest.approx(predicted, rel=0.15)
    # On the fan-out, each unit's whole fan-in vector carries one sign: the fine-tunes' nearly
    # equal weights add up instead of cancelling, error ≈ sqrt(K−1), far above either prediction.
    assert measured_out > 4 * predicted
    assert measured_out > 4 * predicted_output_error("binary", K, EMBD, eta)
    print(
        f"{source}: η {eta:.3f}, predicted {predicted:.3f}, true fan-in {measured_true:.3f}, fan-out {measured_out:.3f}"
    )


def _state(path: Path) -> dict[str, torch.Tensor]:
    from pspctl.checkpoints import open_checkpoint

    ckpt = open_checkpoint(path)
    return {n: ckpt[n] for n in ckpt.names}


def _gpt2_task(tmp_path: Path) -> Path:
    task = tmp_path / "gpt2_task.py"
    task.write_text(
        "import torch, transformers\n"
        "def build_model():\n"
        f"    c = transformers.GPT2Config(n_layer=2, n_embd={EMBD}, n_head=4, vocab_size=97, n_positions=32,\n"
        "        use_cache=False)\n"
        "    return transformers.GPT2LMHeadModel(c).eval()\n"
        "def example_inputs():\n"
        "    return (torch.arange(12).reshape(2, 6) % 97,)\n"
    )
    return task


def test_gpt2_readers_use_the_axis(tmp_path: Path):
    """nn.load and the multi-context graph's in-graph retrieval agree with extraction."""
    pytest.importorskip("transformers")
    from pspctl.nn import load
    from pspctl.onnx_export.modules import MultiContextModel
    from pspctl.task import load_state, load_task

    paths = _gpt2_family(tmp_path, folders=True)
    out = tmp_path / "w.safetensors"
    merge(
        paths,
        out,
        MergeOptions(
            base="none", policy=Policy(superpose=("*.c_attn.weight", "*.c_proj.weight", "*.c_fc.weight"))
        ),
    )
    sf = SuperposedFile(out)
    assert {n for n, m in sf.metas.items() if m.fan_in_axis == 0 and m.role == "superposed"} == {
        f"transformer.h.{i}.{w}.weight"
        for i in range(2)
        for w in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    task = load_task(str(_gpt2_task(tmp_path)))
    (ids,) = task.example_inputs()
    psp = load(sf, task.build_model())
    graph = MultiContextModel(task.build_model(), sf)
    for k in range(K):
        want = load_state(task.build_model(), sf.state_dict(k), "k").eval()(ids).logits
        with torch.no_grad(), psp.context(k):
            assert torch.allclose(psp(ids).logits, want, atol=1e-5)
            assert torch.allclose(graph(torch.tensor(k), ids)[0], want, atol=1e-5)


def test_cli_fan_in_axis(tmp_path: Path):
    from typer.testing import CliRunner

    from pspctl.cli import app

    paths = []
    for i in range(2):
        torch.manual_seed(i)
        paths.append(tmp_path / f"m{i}.pt")
        torch.save({"w": torch.randn(6, 40), "b": torch.randn(6)}, paths[-1])
    out = tmp_path / "w.safetensors"
    args = ["merge", *map(str, paths), "-o", str(out), "--superpose", "w", "--base", "none"]
    result = CliRunner().invoke(app, [*args, "--fan-in-axis", "w=0", "--json"])
    assert result.exit_code == 0, result.output
    sf = SuperposedFile(out)
    assert (sf.metas["w"].fan_in_axis, sf.metas["w"].fan_in) == (0, 6)
    assert sf.header.recipe["fan_in_axes"] == ["w=0"]
    info = CliRunner().invoke(app, ["info", str(out)], env={"COLUMNS": "200"})
    assert info.exit_code == 0 and "6 (dim 0)" in info.output
    originals = [torch.load(p)["w"] for p in paths]
    for k in range(2):  # K=2 binary, retrieved on dim 0: W_k ± the other model, column-signed
        ctx = sf.contexts("w").vector(k)
        other = originals[1 - k] * (sf.contexts("w").vector(1 - k) * ctx)[:, None]
        assert torch.allclose(sf.retrieve("w", k), originals[k] + other, atol=1e-6)
    bad = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "x.safetensors"), "--fan-in-axis", "w:0"])
    assert bad.exit_code == 7
    assert "expected GLOB=AXIS" in bad.output
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.slow
def test_gpt2_multi_context_onnx_retrieves_conv1d_on_its_axis(tmp_path: Path):
    """The multi-context graph retrieves Conv1D weights on dim 0; onnxruntime matches extraction."""
    pytest.importorskip("onnx")
    from pspctl.onnx_export.api import export_multi
    from pspctl.task import load_task

    paths = _gpt2_family(tmp_path, folders=True)
    out = tmp_path / "w.safetensors"
    merge(
        paths, out, MergeOptions(base="none", policy=Policy(superpose=("*.c_attn.weight", "*.c_fc.weight")))
    )
    report = export_multi(out, load_task(str(_gpt2_task(tmp_path))), tmp_path / "multi.onnx")
    assert [c.context for c in report.checks] == list(range(K))
    assert all(c.passed and c.max_abs < 1e-5 for c in report.checks)
