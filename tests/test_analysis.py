"""pspctl.analysis against independent computations: norms, hooks done by hand, unfold, pruning counts."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pspctl.analysis import analyze, measured_policy
from pspctl.analysis.function import Capture, layer_sums
from pspctl.analysis.pruning import same_budget_state
from pspctl.checkpoints import open_checkpoint
from pspctl.contexts import Kind, make_contexts
from pspctl.errors import MismatchError, TaskError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.policy import Policy, predicted_errors
from pspctl.superpose import bind, unbind
from pspctl.task import load_task
from tests.conftest import mlp, save_models

TASK = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(nn.Linear(16, 48), nn.ReLU(), nn.Linear(48, 48), nn.ReLU(), nn.Linear(48, 4))

def load_data(context, split):
    g = torch.Generator().manual_seed(100 * context + len(split))
    yield torch.randn(96, 16, generator=g), torch.randint(0, 4, (96,), generator=g)
"""


@pytest.fixture
def merged(tmp_path: Path) -> tuple[Path, list[Path], Path]:
    """3 tiny MLPs merged with binary contexts: 0.weight and 2.weight superposed, the rest per context."""
    task = tmp_path / "task.py"
    task.write_text(TASK)
    paths = save_models([mlp(i) for i in range(3)], tmp_path)
    out = tmp_path / "w.safetensors"
    policy = Policy(superpose=("0.weight", "2.weight"))
    merge(paths, out, MergeOptions(base="none", kind="binary", seed=1, policy=policy, task=str(task)))
    return out, paths, task


def test_weight_space_error_matches_direct_norms(merged):
    out, paths, _ = merged
    report = analyze(out)
    sf = SuperposedFile(out)
    originals = [torch.load(p, weights_only=True) for p in paths]
    by_name = {w.name: w for w in report.weights}
    for name in ("0.weight", "2.weight"):
        norms = [float(o[name].double().norm()) for o in originals]
        for k in range(3):
            direct = float((sf.retrieve(name, k).double() - originals[k][name].double()).norm()) / norms[k]
            expected = math.sqrt(sum(n**2 for s, n in enumerate(norms) if s != k)) / norms[k]
            assert by_name[name].error[k] == pytest.approx(direct, rel=1e-6)
            assert by_name[name].expected[k] == pytest.approx(expected, rel=1e-6)
            assert 0.7 < direct / expected < 1.3  # and the expectation is a good one
    for name in ("0.bias", "2.bias", "4.weight", "4.bias"):
        assert by_name[name].role == "per_context"
        assert by_name[name].error == [0.0, 0.0, 0.0] and by_name[name].expected == [0.0, 0.0, 0.0]


def test_the_by_design_note_names_only_tensors_superposed_without_a_base(merged, tmp_path):
    """sqrt(v(K-1)) is the weight-space error of plain superposition; a centred tensor's is
    its deltas' share, orders of magnitude smaller, and the note must not claim otherwise."""
    out, paths, _ = merged
    assert "weight-space error is about sqrt(v(K-1)) = 1.41 by design;" in " ".join(analyze(out).notes)
    for second, expect in (("mean", None), ("none", " for the tensors superposed without a base")):
        centres = (("0.weight", "mean"), ("2.weight", second))
        policy = Policy(superpose=("0.weight", "2.weight"), centres=centres)
        centred = tmp_path / f"c{second}.safetensors"
        merge(paths, centred, MergeOptions(base="auto", seed=1, policy=policy))
        notes = " ".join(analyze(centred).notes)
        metas = SuperposedFile(centred).header.tensors
        assert [metas[n].centred for n in ("0.weight", "2.weight")] == [True, second == "mean"]
        if expect is None:
            assert "by design" not in notes
        else:
            assert f"= 1.41 by design{expect};" in notes


def test_function_space_matches_hand_computation(merged):
    out, paths, task_path = merged
    report = analyze(out, max_samples=64)
    assert report.inputs == "calib"
    task = load_task(task_path)
    sf = SuperposedFile(out)
    for k in range(3):
        x = next(iter(task.load_data(k, "calib")))[0][:64]
        orig = mlp(k).requires_grad_(False)
        h = F.relu(orig[0](x))  # the input of layer 2 in the original model
        W, W_hat = orig[2].weight.detach(), sf.retrieve("2.weight", k)
        direct = float((h @ (W_hat - W).T).norm() / (h @ W.T).norm())
        row = next(r for r in report.layers if r.name == "2.weight" and r.context == k)
        assert row.measured == pytest.approx(direct, rel=1e-5)
        assert row.method == "linear" and row.fan_in == 48
        eta = ((h @ W.T).abs() / (h.norm(dim=1, keepdim=True) * W.norm(dim=1))).mean()
        assert row.eta_mean == pytest.approx(float(eta), rel=1e-5)

        retrieved = task.build_model()
        retrieved.load_state_dict(sf.state_dict(k))
        with torch.no_grad():
            y, y_hat = orig(x), retrieved(x)
        summary = report.contexts[k]
        assert summary.output_error == pytest.approx(float((y_hat - y).norm() / y.norm()), rel=1e-5)
        assert summary.retrieved_metric == pytest.approx(task.metric(retrieved, k)["accuracy"])
        assert summary.original_metric == pytest.approx(task.metric(orig, k)["accuracy"])
        assert summary.winner in ("psp", "pruning", "tie")


def test_same_budget_baseline_keeps_the_files_bytes(merged):
    out, paths, _ = merged
    sf = SuperposedFile(out)
    report = analyze(out)
    # The budget: every tensor the file stores, contexts included, as safetensors lays them out.
    stored = sum(sf.raw(n).nbytes for n in sf._handles)
    assert report.stored_bytes == stored
    for k in range(3):
        state = mlp(k).state_dict()
        pruned, density = same_budget_state(state, stored / 3)
        kept_bytes = sum(int((t != 0).sum()) * t.element_size() for t in pruned.values())
        assert kept_bytes <= stored / 3 and kept_bytes == pytest.approx(
            stored / 3, abs=8
        )  # one value of slack
        assert density == pytest.approx(kept_bytes / 4 / report.model_values)
        assert torch.equal(pruned["0.bias"], state["0.bias"])  # 1-d tensors are kept whole
        assert report.contexts[k].same_budget_density == density
    for p in report.pruning:
        assert p.achieved == pytest.approx(p.sparsity, abs=1e-3)
        assert len(p.metric) == 3 and all(m is not None for m in p.metric)


def test_same_budget_density_is_per_context(tmp_path):
    """An original with an all-zero hidden layer keeps fewer values than the budget allows."""
    (tmp_path / "task.py").write_text(TASK)
    models = [mlp(i) for i in range(3)]
    with torch.no_grad():
        models[1][2].weight.zero_()
    paths = save_models(models, tmp_path)
    out = tmp_path / "w.safetensors"
    merge(
        paths,
        out,
        MergeOptions(base="none", kind="binary", seed=1, policy=Policy(superpose=("0.weight", "2.weight"))),
    )
    report = analyze(out, task=tmp_path / "task.py")
    state = models[1].state_dict()
    # Every nonzero value fits in the budget, so the baseline keeps exactly those (and the 1-d tensors).
    nonzero = sum(int((t != 0).sum()) if t.dim() >= 2 else t.numel() for t in state.values())
    assert report.contexts[1].same_budget_density == pytest.approx(nonzero / report.model_values, rel=1e-12)
    for k in (0, 2):
        full = same_budget_state(models[k].state_dict(), report.stored_bytes / 3)[1]
        assert report.contexts[k].same_budget_density == full > report.contexts[1].same_budget_density + 0.05
    assert "same_budget_density" not in report.to_dict()  # per context only
    assert [c["same_budget_density"] for c in report.to_dict()["contexts"]] == [
        c.same_budget_density for c in report.contexts
    ]


def _low_rank(N: int, M: int, gen: torch.Generator) -> torch.Tensor:
    """Rank-4 plus a little noise, like trained weights: inputs in its row space can align well."""
    return torch.randn(N, 4, generator=gen) @ torch.randn(4, M, generator=gen) + 0.1 * torch.randn(
        N, M, generator=gen
    )


def _aligned_inputs(W: torch.Tensor, samples: int, align: float, gen: torch.Generator) -> torch.Tensor:
    """Inputs whose alignment with W's rows grows with `align`: noise plus a mix of the rows."""
    noise = torch.randn(samples, W.shape[1], generator=gen)
    signal = torch.randn(samples, W.shape[0], generator=gen) @ W
    signal = signal / signal.norm(dim=1, keepdim=True) * noise.norm(dim=1, keepdim=True)
    return noise + align * signal


@pytest.mark.parametrize("kind", [k.value for k in Kind])
def test_function_space_error_follows_proposition_2(kind):
    """Measured ‖Ŵx−Wx‖/‖Wx‖ against sqrt(v(K-1)/M)/η_rms, for η_rms from ≈1/√M to ≈0.4.

    Proposition 2 is an expectation over the contexts. With low-rank weights one draw of
    contexts fluctuates by ~15%, so the RMS over 6 context seeds must be within 10% of the
    prediction, and every single draw within 35%.
    """
    K, N, M = 4, 64, 256
    gen = torch.Generator().manual_seed(7)
    weights = [_low_rank(N, M, gen) for _ in range(K)]
    v = Kind(kind).variance_factor
    draws = [make_contexts(kind, K, M, seed=seed, name="w") for seed in range(6)]
    draws = [(ctx, bind(weights, ctx)) for ctx in draws]
    etas = []
    for align in (0.0, 1.0, 8.0):
        for k in range(K):
            x = _aligned_inputs(weights[k], 256, align, gen)
            cap = Capture(nn.Linear(M, N), "weight", [((x,), {})])
            others = sum(w.square().sum(1) for s, w in enumerate(weights) if s != k)
            w_sq = [float(w.square().sum()) for w in weights]

            def predict(eta: float, k: int = k, w_sq: list[float] = w_sq) -> float:
                return predicted_errors(kind, M, eta, w_sq, w_sq)[k]

            measured, predicted = [], []
            for ctx, W_sup in draws:
                got = layer_sums(cap, weights[k], unbind(W_sup, ctx, k), others).finish(v, M, predict)
                assert got["measured"] == pytest.approx(got["predicted"], rel=0.35)
                measured.append(got["measured"])
                predicted.append(got["predicted_row_norms"])
            rms = math.sqrt(sum(m * m for m in measured) / len(measured))
            assert rms == pytest.approx(got["predicted"], rel=0.10)
            assert rms == pytest.approx(predicted[0], rel=0.10)
            etas.append(got["eta_rms"])
    assert min(etas) < 1.5 / math.sqrt(M) and max(etas) > 0.3  # the test did span the range


def test_conv_layer_against_unfold():
    """Grouped conv: η and the error from `unfold` patches agree with the ones-kernel shortcut."""
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    W = conv.weight.detach()
    W_hat = W + 0.3 * torch.randn(W.shape, generator=gen)
    x = torch.randn(5, 4, 6, 6, generator=gen)
    got = layer_sums(Capture(conv, "weight", [((x,), {})]), W, W_hat, None).finish(
        1.0, 18, lambda eta: math.sqrt(2 / 18) / eta
    )
    y, y_hat = F.conv2d(x, W, padding=1, groups=2), F.conv2d(x, W_hat, padding=1, groups=2)
    assert got["measured"] == pytest.approx(float((y_hat - y).norm() / y.norm()), rel=1e-5)
    patches = F.unfold(x, 3, padding=1).reshape(5, 2, 18, 36)  # [B, groups, M, positions]
    cos = []
    energy = 0.0
    for i in range(6):
        g = i // 3
        p = patches[:, g]  # [B, M, P]
        dots = torch.einsum("m,bmp->bp", W[i].flatten(), p)
        pn = p.norm(dim=1)
        valid = pn > 0
        cos.append(dots.abs()[valid] / (pn[valid] * W[i].norm()))
        energy += float((W[i].norm() ** 2 * pn**2).sum())
    assert got["eta_mean"] == pytest.approx(float(torch.cat(cos).mean()), rel=1e-4)
    assert got["eta_rms"] == pytest.approx(math.sqrt(float(y.square().sum()) / energy), rel=1e-4)


def test_without_originals_or_task_says_so(merged, tmp_path):
    out, paths, task = merged
    moved = tmp_path / "moved"
    moved.mkdir()
    for p in paths:
        p.rename(moved / p.name)
    report = analyze(out)
    assert any("originals not found" in n and "weight-space error skipped" in n for n in report.notes)
    assert report.weights == [] and report.layers == []
    assert all(c.retrieved_metric is not None and c.output_error is None for c in report.contexts)
    with pytest.raises(MismatchError, match="does not match the sha256 recorded for context 0"):
        analyze(out, originals=[moved / paths[1].name, *(moved / p.name for p in paths[1:])])


def test_random_probes_without_data(merged, tmp_path):
    out, _, _ = merged
    probe_task = tmp_path / "probe_task.py"
    probe_task.write_text(
        TASK.split("def load_data")[0] + "\ndef example_inputs():\n    return (torch.zeros(2, 16),)\n"
    )
    report = analyze(out, task=probe_task)
    assert report.inputs == "probe" and all(r.inputs == "probe" for r in report.layers)
    first = next(r for r in report.layers if r.name == "0.weight")
    # Gaussian probes into the first layer: η_rms ≈ 1/√M, so no attenuation beyond sqrt(K-1).
    assert first.eta_rms == pytest.approx(1 / math.sqrt(16), rel=0.25)
    assert first.measured == pytest.approx(math.sqrt(2), rel=0.25)


def test_bad_inputs_raise_before_anything(merged, tmp_path):
    out, paths, _ = merged
    wide = tmp_path / "wide.py"
    wide.write_text(TASK.replace("48", "32"))
    with pytest.raises(MismatchError, match=r"does not fit the task's model: other shape: 0\.weight"):
        analyze(out, task=wide)
    empty = tmp_path / "empty.py"
    empty.write_text(TASK.split("def load_data")[0] + "\ndef load_data(context, split):\n    return []\n")
    with pytest.raises(TaskError, match="returned no batches"):
        analyze(out, task=empty)
    no_build = tmp_path / "nobuild.py"
    no_build.write_text("x = 1\n")
    with pytest.raises(TaskError, match="no build_model"):
        analyze(out, task=no_build)


def test_measured_policy_budget_extremes(merged):
    _, paths, task_path = merged
    task = load_task(task_path)
    ckpts = [open_checkpoint(p) for p in paths]
    loose = measured_policy(ckpts, task, kind="binary", max_drop=100.0)
    assert sorted(loose.superpose) == ["0.weight", "2.weight", "4.weight"] and loose.keep == []
    strict = measured_policy(ckpts, task, kind="binary", max_drop=100.0, max_output_error=1e-9)
    assert strict.superpose == [] and sorted(strict.keep) == ["0.weight", "2.weight", "4.weight"]
    assert all(d == 0 for d in strict.drop)
    kept = measured_policy(ckpts, task, kind="binary", max_drop=100.0, base=Policy(keep=("4.weight",)))
    assert "4.weight" not in kept.superpose + kept.keep  # --keep is respected, not a candidate
    policy = loose.policy()
    assert policy.origin == "measured" and sorted(policy.superpose) == ["0.weight", "2.weight", "4.weight"]
