"""Issue 13: base-centred superposition, shared tensors, the error-aware policy, format v2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from pspctl.cli import app
from pspctl.contexts import ContextSet
from pspctl.errors import InputError, MismatchError, PolicyError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.policy import Option, Policy, choose, predicted_errors
from pspctl.superpose import unbind
from tests.conftest import mlp

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def finetunes(
    folder: Path, K: int = 4, scale: float = 0.02, width: int = 64, frozen: bool = True
) -> tuple[Path, list[Path]]:
    """A parent MLP and K copies that differ from it by `scale` of each weight (and a frozen layer)."""
    parent = mlp(0, width=width).state_dict()
    if frozen:
        parent["frozen.weight"] = torch.randn(width, width, generator=torch.Generator().manual_seed(9))
    save_file(parent, str(folder / "parent.safetensors"))
    paths = []
    for k in range(K):
        g = torch.Generator().manual_seed(100 + k)
        child = {n: t + scale * t.std() * torch.randn(t.shape, generator=g) if n != "frozen.weight" else t
                 for n, t in parent.items()}  # fmt: skip
        paths.append(folder / f"ft{k}.safetensors")
        save_file(child, str(paths[-1]))
    return folder / "parent.safetensors", paths


def relative_error(sf: SuperposedFile, paths: list[Path]) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for k, p in enumerate(paths):
        orig, back = load_file(str(p)), sf.state_dict(k)
        for n, t in orig.items():
            worst = max(worst, float((back[n] - t).norm() / t.norm()))
    return worst


def test_retrieval_with_a_base_is_base_plus_the_unbound_deltas_exactly(tmp_path):
    parent, paths = finetunes(tmp_path)
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base=str(parent), policy=Policy(superpose=("*weight",))))
    sf = SuperposedFile(out)
    parent_sd = {n: sf.base(n) for n in sf.names() if sf.metas[n].centred}
    assert parent_sd and sf.header.base["source"] == "checkpoint" and not sf.header.base["linked"]
    from safetensors.torch import load_file

    theirs = load_file(str(parent))
    for name, base in parent_sd.items():
        assert torch.equal(base, theirs[name])  # the parent, stored as it is
        ctx = ContextSet.from_stored(sf.kind, 4, sf.metas[name].fan_in, sf.raw("contexts/" + name))
        for k in range(4):
            expected = base + unbind(sf.superposed(name), ctx, k)
            assert torch.equal(sf.state_dict(k)[name], expected)
    # Per-context and shared tensors come back exactly.
    assert sf.metas["frozen.weight"].role == "shared"
    for k, p in enumerate(paths):
        orig = load_file(str(p))
        assert torch.equal(sf.state_dict(k)["frozen.weight"], orig["frozen.weight"])
        assert torch.equal(sf.state_dict(k)["4.bias"], orig["4.bias"])


def test_centring_shrinks_the_error_by_the_deltas_size(tmp_path):
    parent, paths = finetunes(tmp_path, scale=0.02)
    plain, centred = tmp_path / "plain.safetensors", tmp_path / "centred.safetensors"
    forced = Policy(superpose=("0.weight", "2.weight"))
    merge(paths, plain, MergeOptions(base="none", policy=forced))
    merge(paths, centred, MergeOptions(base="mean", policy=forced))
    e_plain, e_centred = (
        relative_error(SuperposedFile(plain), paths),
        relative_error(SuperposedFile(centred), paths),
    )
    assert e_centred < e_plain / 20  # deltas ~2% of the weights (~1.7% from their mean)


def test_default_merge_of_finetunes_centres_and_keeps_them(tmp_path):
    _, paths = finetunes(tmp_path, K=4, scale=0.02, width=256)
    report = merge(paths, tmp_path / "w.safetensors", MergeOptions())
    chosen = {d.name: (d.role.value, d.centre) for d in report.decisions}
    assert chosen["2.weight"] == ("superposed", "mean") and chosen["frozen.weight"][0] == "shared"
    assert report.storage_ratio > 2.5 and max(report.predicted_error) <= Policy().max_error
    assert relative_error(SuperposedFile(tmp_path / "w.safetensors"), paths) < 0.05


def test_link_base_stores_only_its_path_and_sha256(tmp_path):
    parent, paths = finetunes(tmp_path)
    stored, linked = tmp_path / "s.safetensors", tmp_path / "l.safetensors"
    forced = Policy(superpose=("*weight",))
    merge(paths, stored, MergeOptions(base=str(parent), policy=forced))
    merge(paths, linked, MergeOptions(base=str(parent), link_base=True, policy=forced))
    assert linked.stat().st_size < stored.stat().st_size
    a, b = SuperposedFile(stored), SuperposedFile(linked)
    assert b.header.base["linked"] and b.header.base["path"] == str(parent)
    for k in range(4):
        assert all(torch.equal(a.state_dict(k)[n], t) for n, t in b.state_dict(k).items())


def test_a_linked_base_is_found_beside_the_file_or_given_and_checked(tmp_path, monkeypatch):
    parent, paths = finetunes(tmp_path)
    merge(paths, tmp_path / "l.safetensors", MergeOptions(base=str(parent), link_base=True,
                                                          policy=Policy(superpose=("*weight",))))  # fmt: skip
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    os.rename(parent, moved / "parent.safetensors")
    result = run("extract", "l.safetensors", "-c", "0", "-o", "m.safetensors")
    assert result.exit_code == 2 and "linked base" in result.stderr and "pass --base PATH" in result.stderr
    assert not Path("m.safetensors").exists()
    assert run("extract", "l.safetensors", "-c", "0", "-o", "m.safetensors", "--base", moved / "parent.safetensors").exit_code == 0  # fmt: skip
    from safetensors.torch import load_file

    other = tmp_path / "other.safetensors"
    save_file({n: t + 1 for n, t in load_file(str(moved / "parent.safetensors")).items()}, str(other))
    result = run("extract", "l.safetensors", "-c", "1", "-o", "n.safetensors", "--base", other)
    assert (
        result.exit_code == 3
        and "sha256" in result.stderr
        and "merged on a base with sha256" in result.stderr
    )
    assert not Path("n.safetensors").exists()


def test_bad_bases_get_one_line_and_write_nothing(tmp_path, monkeypatch):
    parent, paths = finetunes(tmp_path)
    monkeypatch.chdir(tmp_path)
    torch.save(mlp(0, width=32).state_dict(), "small.pt")
    result = run("merge", *paths, "--base", "small.pt", "-o", "w.safetensors")
    assert (
        result.exit_code == 3
        and "is another architecture: 0.bias: shape [32] in small.pt vs [64]" in result.stderr
    )
    result = run("merge", *paths, "--base", "mean", "--link-base", "-o", "w.safetensors")
    assert result.exit_code == 7 and "--link-base needs --base PATH" in result.stderr
    result = run("merge", *paths, "--base", "missing.pt", "-o", "w.safetensors")
    assert result.exit_code == 2 and "missing.pt: no such file" in result.stderr
    v1 = Path(__file__).parent / "data" / "golden-v1-binary.safetensors"
    result = run("extract", v1, "-c", "0", "-o", "x.safetensors", "--base", parent)
    assert result.exit_code == 3 and "not centred on a base" in result.stderr
    assert not Path("w.safetensors").exists() and not Path("x.safetensors").exists()


def test_forced_superposition_over_an_error_of_one_warns(tmp_path, monkeypatch):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"m{i}.pt")
        torch.save(mlp(i).state_dict(), paths[-1])
    monkeypatch.chdir(tmp_path)
    result = run("merge", *paths, "--base", "none", "--superpose", "*", "-q")
    assert result.exit_code == 0
    assert "warning: 0.weight: superposed as forced, but its predicted output error is" in result.stderr


def test_the_merge_table_fits_80_columns_and_keeps_long_names(tmp_path, monkeypatch):
    name = "model.encoder.layers.11.self_attention.query_key_value.weight"
    for i in range(2):
        torch.save(
            {name: torch.randn(64, 64, generator=torch.Generator().manual_seed(i))}, tmp_path / f"m{i}.pt"
        )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    result = run("merge", "m0.pt", "m1.pt", "-q")
    assert result.exit_code == 0
    assert all(len(line) <= 80 for line in result.stdout.splitlines())
    assert name in "".join(line.split("│")[1].strip() for line in result.stdout.splitlines() if "│" in line)


def test_predicted_error_is_proposition_2_with_the_actual_norms():
    # Equal norms, no base: sqrt(v(K-1)/M)/η, the paper's prediction.
    errs = predicted_errors("binary", 256, 0.2, [1.0] * 4, [1.0] * 4)
    assert errs == pytest.approx([(3 / 256) ** 0.5 / 0.2] * 4)
    # Deltas a tenth of the weights: a tenth of the error; complex halves the variance.
    assert predicted_errors("complex", 256, 0.2, [1.0] * 4, [0.01] * 4)[0] == pytest.approx(
        (0.5 * 3 * 0.01 / 256) ** 0.5 / 0.2
    )
    # Lookups: no 1/M, no η.
    assert predicted_errors("binary", 256, 0.2, [1.0] * 2, [0.04] * 2, lookup=True) == pytest.approx(
        [0.2, 0.2]
    )


def test_choose_spends_the_budget_where_it_saves_most():
    options = {
        "big": [Option("", 0.0, 1000), Option("none", 0.15, 300)],
        "small": [Option("", 0.0, 100), Option("none", 0.15, 30)],
    }
    chosen = choose(options, [], budget=0.2)  # both would give sqrt(2)·0.15 = 0.21
    assert chosen["big"].centre == "none" and chosen["small"].centre == ""
    assert choose(options, [], budget=0.25)["small"].centre == "none"
    assert choose(options, ["small"], budget=0.0)["small"].centre == "none"  # forced stays superposed


def test_choose_keeps_a_forced_tensor_on_its_pinned_centre():
    options = {"w": [Option("", 0.0, 1000), Option("none", 0.3, 300), Option("mean", 0.05, 550)]}
    assert choose(options, ["w"], budget=0.2)["w"].centre == "mean"  # the budget prices the error
    assert choose(options, ["w"], budget=0.2, centres={"w": "none"})["w"].centre == "none"
    assert choose(options, ["w"], budget=1.0, centres={"w": "mean"})["w"].centre == "mean"
    assert choose(options, [], budget=1.0, centres={"w": "mean"})["w"].centre == "none"  # forced only


def test_v2_file_exports(tmp_path):
    """The multi-context graph serves a centred file (B x + S(c ⊙ x)), validated for every context."""
    from types import SimpleNamespace

    from pspctl.onnx_export import export_multi

    _, paths = finetunes(tmp_path, K=3, frozen=False)
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base="mean", policy=Policy(superpose=("*weight",))))
    assert all(SuperposedFile(out).metas[n].centred for n in ("0.weight", "2.weight", "4.weight"))
    task = SimpleNamespace(
        source="t", build_model=lambda: mlp(0, width=64), load_data=None,
        example_inputs=lambda: (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),),
    )  # fmt: skip
    report = export_multi(out, task, tmp_path / "m.onnx", measure_per_context=False)
    assert report.passed and len(report.checks) == 3


def test_v2_file_loads_trains_and_saves_in_pspctl_nn(tmp_path):
    """nn.load gives B + Ŵ_k, and nn.save writes the same centred file back."""
    from pspctl.nn import load, save

    _, paths = finetunes(tmp_path, K=3, frozen=False)
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base="mean", policy=Policy(superpose=("*weight",))))
    sf = SuperposedFile(out)
    model = load(sf, mlp(0, width=64))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    for k in range(3):
        reference = mlp(0, width=64)
        reference.load_state_dict(sf.state_dict(k))
        model.set_context(k)
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-5)
    save(model, tmp_path / "again.safetensors")
    again = SuperposedFile(tmp_path / "again.safetensors")
    assert again.header.base == sf.header.base
    for k in range(3):
        for n, t in sf.state_dict(k).items():
            torch.testing.assert_close(again.state_dict(k)[n], t, rtol=1e-6, atol=1e-6)


def test_info_json_shows_the_base_and_shared_roles(tmp_path, monkeypatch):
    parent, paths = finetunes(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert run("merge", *paths, "--base", parent, "-q").exit_code == 0
    data = json.loads(run("info", "--json").stdout)
    assert data["format_version"] == 2 and data["base"]["source"] == "checkpoint"
    assert data["tensors"]["frozen.weight"]["role"] == "shared"


def test_mean_is_not_linkable_and_path_is(tmp_path):
    parent, paths = finetunes(tmp_path)
    with pytest.raises(PolicyError, match="--link-base needs --base PATH"):
        merge(paths, tmp_path / "w.safetensors", MergeOptions(base="auto", link_base=True))
    with pytest.raises((InputError, MismatchError)):
        merge(paths, tmp_path / "w.safetensors", MergeOptions(base=str(tmp_path / "nope.pt")))


def test_analyze_reports_the_noise_with_and_without_the_base(tmp_path):
    from pspctl.analysis import analyze

    _, paths = finetunes(tmp_path, K=4, scale=0.02, frozen=False)
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base="mean", policy=Policy(superpose=("*weight",))))
    report = analyze(out, originals=[str(p) for p in paths], max_samples=16)
    rows = {w.name: w for w in report.weights}
    centred = rows["2.weight"]
    assert centred.expected_without_base is not None and rows["2.bias"].expected_without_base is None
    for err, expected, plain in zip(
        centred.error, centred.expected, centred.expected_without_base, strict=True
    ):
        assert err == pytest.approx(expected, rel=0.3)  # one draw of contexts around its expectation
        assert plain > 30 * expected  # ~2% deltas: the base took ~50× the noise away


def test_export_returns_a_failed_report_when_not_strict(tmp_path, monkeypatch):
    """safetensors' strict= style: the library raises only when asked; either way nothing is written."""
    from types import SimpleNamespace

    from pspctl.onnx_export import AtolError, api, export_multi

    _, paths = finetunes(tmp_path, K=2, frozen=False)
    out = tmp_path / "w.safetensors"
    merge(paths, out, MergeOptions(base="mean", policy=Policy(superpose=("2.weight",))))
    task = SimpleNamespace(
        source="t", build_model=lambda: mlp(0, width=64), load_data=None,
        example_inputs=lambda: (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),),
    )  # fmt: skip
    reference = api.torch_outputs
    monkeypatch.setattr(api, "torch_outputs", lambda m, x: [o + 1e-2 for o in reference(m, x)])
    report = export_multi(out, task, tmp_path / "m.onnx", measure_per_context=False, strict=False)
    assert not report.passed and report.files == {} and not (tmp_path / "m.onnx").exists()
    assert max(c.max_abs for c in report.checks) == pytest.approx(1e-2, rel=1e-3)
    with pytest.raises(AtolError, match="differ from PyTorch"):
        export_multi(out, task, tmp_path / "m.onnx", measure_per_context=False)
    assert not (tmp_path / "m.onnx").exists()


def test_analyze_and_tune_take_a_moved_linked_base(tmp_path, monkeypatch):
    parent, paths = finetunes(tmp_path, K=3, frozen=False)
    (tmp_path / "task.py").write_text(
        "import torch\nfrom tests.conftest import mlp\n\ndef build_model():\n    return mlp(0, width=64)\n\n"
        "def example_inputs():\n    return (torch.randn(4, 16, generator=torch.Generator().manual_seed(0)),)\n\n"
        "def load_data(context, split):\n    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(context))\n"
        "    return [(x, (x[:, 0] > 0).long())]\n"
    )
    monkeypatch.chdir(tmp_path)
    args = [
        "merge",
        *paths,
        "--base",
        parent,
        "--link-base",
        "--superpose",
        "*weight",
        "--task",
        "task.py",
        "-q",
    ]
    assert run(*args).exit_code == 0
    moved = tmp_path / "moved.safetensors"
    os.rename(parent, moved)
    for command in (["analyze", "-q"], ["export", "--multi", "-o", "m.onnx"]):
        assert run(*command).exit_code == 2  # the base is not where it was recorded
        result = run(*command, "--base", moved)
        assert result.exit_code == 0, result.output
    result = run(
        "tune",
        "--steps",
        "2",
        "-o",
        "sub/t.safetensors",
        "--objective",
        "distill",
        "--base",
        "moved.safetensors",
        "-q",
    )
    assert result.exit_code == 0, result.output
    from pspctl.fileformat import SuperposedFile as SF

    tuned = SF("sub/t.safetensors")  # records the base where tune read it, relative to itself
    assert tuned.header.base["linked"] and tuned.header.base["path"] == "../moved.safetensors"
    monkeypatch.chdir(tmp_path / "sub")
    result = run("extract", "t.safetensors", "--context", "1", "-o", "one.safetensors")  # no --base needed
    assert result.exit_code == 0, result.output


MEASURED_TASK = """
import torch
from torch import nn


def build_model():
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def load_data(context, split):
    g = torch.Generator().manual_seed(7 + len(split))
    yield torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
"""


def _outputs(state: dict, x: torch.Tensor) -> torch.Tensor:
    model = mlp(0, width=64)
    model.load_state_dict(state)
    with torch.no_grad():
        return model(x)


def test_measured_policy_measures_the_centre_merge_stores(tmp_path):
    """`--policy measured` measures each tensor on the centre `--base` gives it (auto: the one
    whose error × bytes is least) and merge stores exactly that: the merged file's outputs
    have the errors measured."""
    from safetensors.torch import load_file

    from pspctl.checkpoints import open_checkpoint
    from pspctl.planning import measured_policy
    from pspctl.task import load_task

    parent, paths = finetunes(tmp_path, frozen=False)
    (tmp_path / "task.py").write_text(MEASURED_TASK)
    task = load_task(str(tmp_path / "task.py"))
    ckpts = [open_checkpoint(p) for p in paths]
    budget = dict(max_drop=100.0, max_output_error=0.1)
    auto = measured_policy(ckpts, task, kind="binary", centre="auto", **budget)
    plain = measured_policy(ckpts, task, kind="binary", centre="none", **budget)
    on_parent = measured_policy(
        ckpts, task, kind="binary", centre="base", parent=open_checkpoint(parent), **budget
    )
    # 2% fine-tunes: the mean cuts a layer's error ~35× for 2× its bytes; plain superposition
    # of 64-wide layers exceeds the budget
    assert set(auto.centres.values()) == {"mean"} and set(plain.centres.values()) == {"none"}
    assert set(on_parent.centres.values()) == {"base"}
    assert sorted(auto.superpose) == ["0.weight", "2.weight", "4.weight"] and plain.superpose == []
    x = next(iter(task.load_data(0, "calib")))[0]
    for result, base in ((auto, "auto"), (on_parent, str(parent))):
        out = tmp_path / f"{len(result.superpose)}-{base == 'auto'}.safetensors"
        merge(paths, out, MergeOptions(task=str(tmp_path / "task.py"), policy=result.policy(), base=base))
        sf = SuperposedFile(out)
        assert all(sf.header.tensors[n].centred for n in result.superpose)
        for k, path in enumerate(paths):
            want = _outputs(load_file(str(path)), x)
            got = _outputs(sf.state_dict(k), x)
            error = float((got.double() - want.double()).norm() / want.double().norm())
            assert error == pytest.approx(result.output_error[k], rel=1e-4)
            assert 0 < error <= 0.1


def test_merge_policy_measured_keeps_the_user_s_base(tmp_path):
    parent, paths = finetunes(tmp_path, frozen=False)
    (tmp_path / "task.py").write_text(MEASURED_TASK)
    common = [
        "--task",
        tmp_path / "task.py",
        "--policy",
        "measured",
        "--max-drop",
        "100",
        "--max-output-error",
        "0.1",
    ]
    common.append("--json")
    for base, centre in (("auto", "mean"), ("mean", "mean"), (parent, "base")):
        result = run("merge", *paths, "-o", tmp_path / "m.safetensors", "--force", "--base", base, *common)
        assert result.exit_code == 0, result.output
        rows = {t["name"]: t for t in json.loads(result.output)["tensors"]}
        assert {rows[n]["centre"] for n in ("0.weight", "2.weight", "4.weight")} == {centre}
        assert all(rows[n]["reason"] == "measured" for n in ("0.weight", "2.weight", "4.weight"))
    result = run("merge", *paths, "-o", tmp_path / "n.safetensors", "--base", "none", *common)
    rows = {t["name"]: t for t in json.loads(result.output)["tensors"]}
    assert rows["2.weight"]["role"] == "per_context"  # plain superposition measured over budget
    result = run("merge", *paths, "-o", tmp_path / "l.safetensors", "--base", "mean", "--link-base", *common)
    assert result.exit_code != 0 and "--link-base needs --base PATH" in result.output


def test_merge_policy_measured_says_who_chose_a_noisy_tensor(tmp_path):
    from tests.conftest import save_models

    paths = save_models([mlp(i, width=64) for i in range(3)], tmp_path)  # unrelated: no centre helps
    (tmp_path / "task.py").write_text(MEASURED_TASK)
    result = run(
        "merge", *paths, "-o", tmp_path / "m.safetensors", "--task", tmp_path / "task.py",
        "--policy", "measured", "--max-drop", "100", "--max-output-error", "10", "--json",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    rows = {t["name"]: t for t in report["tensors"]}
    assert rows["2.weight"]["role"] == "superposed" and rows["2.weight"]["centre"] == "none"
    said = "2.weight: superposed as --policy measured chose, but its predicted output error is"
    assert any(w.startswith(said) for w in report["warnings"])
    assert not any("as forced" in w for w in report["warnings"])


@pytest.mark.parametrize("linked", [False, True], ids=["default", "linked-parent"])
def test_analyze_recommends_on_the_centre_merge_would_use(tmp_path, linked):
    """analyze --max-drop measures its recommendation as a re-merge with `--policy measured`
    would: by default, fine-tunes on their mean (plain superposition of 64-wide layers fails);
    a file merged on a linked parent, on that parent (`--base PARENT --link-base`)."""
    from pspctl.analysis import analyze

    parent, paths = finetunes(tmp_path, frozen=False)
    (tmp_path / "task.py").write_text(MEASURED_TASK)
    out = tmp_path / "w.safetensors"
    on_parent = {"base": str(parent), "link_base": True} if linked else {}
    merge(paths, out, MergeOptions(task=str(tmp_path / "task.py"), **on_parent))
    report = analyze(out, originals=paths, max_drop=100.0, max_output_error=0.1)
    advice = report.recommendation
    assert advice is not None
    assert {advice["centres"][n] for n in ("0.weight", "2.weight", "4.weight")} == {
        "base" if linked else "mean"
    }
    assert sorted(advice["superpose"]) == ["0.weight", "2.weight", "4.weight"]
    assert all(0 < e <= 0.1 for e in advice["output_error"])
    flags = "--policy measured --max-drop 100 --max-output-error 0.1"
    flags += f" --base {parent} --link-base" if linked else ""
    assert advice["merge_flags"] == flags  # what the analyze text tells the user to merge with


def test_measured_policy_auto_skips_a_centre_that_saves_nothing(tmp_path):
    """3 complex inputs: the mean plus the complex sum take 3 copies' bytes, as much as keeping
    them; auto then measures the uncentred sum, which saves a copy."""
    from pspctl.checkpoints import open_checkpoint
    from pspctl.planning import measured_policy
    from pspctl.task import load_task

    _, paths = finetunes(tmp_path, K=3, frozen=False)
    (tmp_path / "task.py").write_text(MEASURED_TASK)
    ckpts = [open_checkpoint(p) for p in paths]
    task = load_task(str(tmp_path / "task.py"))
    result = measured_policy(
        ckpts, task, kind="complex", centre="auto", max_drop=100.0, max_output_error=10.0
    )
    assert set(result.centres.values()) == {"none"}
    assert sorted(result.superpose) == ["0.weight", "2.weight", "4.weight"] and result.bytes_saved > 0
    on_mean = measured_policy(
        ckpts, task, kind="complex", centre="mean", max_drop=100.0, max_output_error=10.0
    )
    assert on_mean.superpose == [] and on_mean.bytes_saved == 0  # nothing to save on the mean
