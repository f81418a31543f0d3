"""ONNX export: every kind, per-context and multi-context, checked in onnxruntime against PyTorch.

The library validates its own graphs; these tests check them again independently, on inputs
the library never saw (batch 1 and an odd batch), against the model rebuilt from the file.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from pspctl.contexts import Kind
from pspctl.errors import ContextError, InputError, MismatchError, OutputError, TaskError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.onnx_export import AtolError, TraceError, convert, export_contexts, export_multi
from pspctl.onnx_export import api as export_api
from pspctl.onnx_export.validate import session
from pspctl.policy import Policy, Role
from samples import digits_task
from samples.train import checkpoint_path
from tests.conftest import cnn, mlp, save_models

HIDDEN = Policy(superpose=("2.weight",))  # the samples' 256x256 hidden layer, whatever it saves

KINDS = [k.value for k in Kind]
MLP_IN, CNN_IN = (16,), (3, 4, 4)


def task_of(build, shape, load_data=None) -> SimpleNamespace:
    return SimpleNamespace(
        source="test-task",
        build_model=build,
        example_inputs=lambda: (torch.randn(4, *shape, generator=torch.Generator().manual_seed(0)),),
        load_data=load_data,
    )


def merged(
    tmp_path: Path, models: list[nn.Module], kind: str, name: str = "w", base: str = "none", policy=None
) -> Path:
    paths = save_models(models, tmp_path)
    out = tmp_path / f"{name}.safetensors"
    policy = policy or Policy(superpose=("*",))
    merge(paths, out, MergeOptions(base=base, kind=kind, seed=1, policy=policy))
    return out


def reference(build, file: Path, k: int, x: torch.Tensor) -> np.ndarray:
    model = build()
    model.load_state_dict(SuperposedFile(file).state_dict(k))
    with torch.no_grad():
        return model.eval()(x).numpy()


def fresh_inputs(shape: tuple[int, ...]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(42)
    return [torch.randn(1, *shape, generator=gen), torch.randn(7, *shape, generator=gen)]


def assert_every_context(graph: Path, build, file: Path, shape: tuple[int, ...], K: int = 3) -> None:
    """The multi-context graph's outputs for every context, on fresh inputs, against the model
    rebuilt from the file; each flagged valid."""
    sess = session(graph)
    for x in fresh_inputs(shape):
        for k in range(K):
            got, valid = sess.run(None, {"context": np.array(k), "input": x.numpy()})
            np.testing.assert_allclose(got, reference(build, file, k, x), atol=1e-5, rtol=1e-4)
            assert bool(valid)


def assert_nothing_left(folder: Path, before: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == before


BUILDERS = {"mlp": (mlp, MLP_IN), "cnn": (cnn, CNN_IN)}


@pytest.fixture(scope="module")
def multi_graphs(tmp_path_factory):
    """(superposed file, multi-context graph, report) per (model, kind), exported once per module."""
    cache: dict[tuple[str, str, str], tuple[Path, Path, object]] = {}

    def get(model: str, kind: str, base: str = "none"):
        if (model, kind, base) not in cache:
            build, shape = BUILDERS[model]
            folder = tmp_path_factory.mktemp(f"{model}-{kind}-{base}")
            file = merged(folder, [build(i) for i in range(3)], kind, base=base)
            out = folder / "multi.onnx"
            report = export_multi(file, task_of(lambda: build(0), shape), out, measure_per_context=False)
            cache[model, kind, base] = (file, out, report)
        return cache[model, kind, base]

    return get


@pytest.mark.parametrize("base", ["none", "mean"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("model", ["mlp", "cnn"])
def test_multi_context_graph_matches_torch_for_every_context(multi_graphs, model, kind, base):
    build, shape = BUILDERS[model]
    file, out, report = multi_graphs(model, kind, base)
    if base == "mean":  # a based file: y = [B | S][x ; c_k ⊙ x], B stored once
        assert any(SuperposedFile(file).base(n) is not None for n in SuperposedFile(file).names())
    assert report.passed and [c.context for c in report.checks] == [0, 1, 2]
    assert report.files == {str(out): out.stat().st_size}

    assert_every_context(out, lambda: build(0), file, shape)
    # Out of range: clamped to the nearest context and flagged, never an error or garbage.
    sess = session(out)
    x = fresh_inputs(shape)[1].numpy()
    for bad, nearest in [(-1, 0), (3, 2), (10**6, 2)]:
        got, valid = sess.run(None, {"context": np.array(bad), "input": x})
        assert not bool(valid)
        np.testing.assert_array_equal(got, sess.run(None, {"context": np.array(nearest), "input": x})[0])


@pytest.mark.parametrize("kind", KINDS)
def test_multi_graph_binds_linear_on_the_input_side(multi_graphs, kind):
    _, out, _ = multi_graphs("mlp", kind)
    graph = onnx.load(str(out)).graph
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    wide = 2 if Kind(kind).is_complex else 1  # [Re W, −Im W]
    assert shapes["model.2.bound_weight"] == [48, 48 * wide]
    # Stored once: nothing holds K copies of a hidden weight (K·48·48 elements).
    weights = [s for name, s in shapes.items() if ".contexts." not in name]
    assert max(int(np.prod(s)) for s in weights) < 3 * 48 * 48
    ops = {n.op_type for n in graph.node}
    if kind == "onepower":  # one phase per weight; cos(k[φ, φ] + [0, π/2]) from the integer input
        assert shapes["model.2.trig.phases"] == [2 * 48]
        assert {"Cast", "Cos"} <= ops and "Sin" not in ops
    if kind == "complex":  # [cos φ_k, −sin φ_k] stored as one table: no trig per call
        assert shapes["model.2.trig.table"] == [3, 2 * 48] and not {"Cos", "Sin"} & ops
    if kind == "binary":
        assert shapes["model.2.contexts.signs"] == [3, 48] and not {"Cos", "Sin"} & ops
    if kind == "rotation":  # C_kᵀ gathered and multiplied with no Transpose per call
        assert shapes["model.2.contexts.rotations"] == [3, 48, 48] and "Transpose" not in ops


@pytest.mark.parametrize("kind", KINDS)
def test_per_context_graph_of_cnn_matches_torch(tmp_path, kind):
    file = merged(tmp_path, [cnn(i) for i in range(3)], kind)
    report = export_contexts(file, task_of(lambda: cnn(0), CNN_IN), "model1", tmp_path / "one.onnx")
    assert report.passed and [(c.context, c.label) for c in report.checks] == [(1, "model1")]
    sess = session(tmp_path / "one.onnx")
    for x in fresh_inputs(CNN_IN):
        (got,) = sess.run(None, {"input": x.numpy()})
        np.testing.assert_allclose(got, reference(lambda: cnn(0), file, 1, x), atol=1e-5, rtol=1e-4)
    # BatchNorm statistics differ per context: a graph for another context must differ.
    x = fresh_inputs(CNN_IN)[1]
    assert not np.allclose(reference(lambda: cnn(0), file, 0, x), got, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_bundled_samples_export_both_ways(tmp_path, kind):
    paths = [checkpoint_path(k) for k in range(4)]
    file = tmp_path / "w.safetensors"
    merge(paths, file, MergeOptions(base="none", kind=kind, labels=["a", "b", "c", "d"], policy=HIDDEN))
    task = SimpleNamespace(
        source="samples/digits_task.py", build_model=digits_task.build_model,
        example_inputs=digits_task.example_inputs, load_data=digits_task.load_data,
    )  # fmt: skip
    multi = export_multi(file, task, tmp_path / "multi.onnx")
    assert multi.passed and multi.inputs_from == "load_data(k, 'test')" and len(multi.checks) == 4
    one = export_contexts(file, task, "c", tmp_path / "c.onnx")
    assert one.passed
    # K per-context graphs vs the measured one: equal sizes; the multi graph stores W once,
    # but rotation contexts (K·M² floats, as in the .safetensors file) outweigh a 256-wide W.
    assert multi.per_context_bytes == 4 * one.total_bytes
    assert (multi.total_bytes < multi.per_context_bytes) == (kind != "rotation")
    # The per-context graph and the multi graph at the same context agree.
    x = next(digits_task.load_data(2, "test"))[0].numpy()
    a = session(tmp_path / "c.onnx").run(None, {"input": x})[0]
    b = session(tmp_path / "multi.onnx").run(None, {"context": np.array(2), "input": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_all_contexts_named_after_labels_with_progress_per_graph(tmp_path):
    file = merged(tmp_path, [mlp(i) for i in range(3)], "binary")
    calls = []
    task = task_of(lambda: mlp(0), MLP_IN)
    report = export_contexts(file, task, "all", tmp_path / "out", progress=lambda *a: calls.append(a))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "model0.onnx",
        "model1.onnx",
        "model2.onnx",
    ]
    assert [c.context for c in report.checks] == [0, 1, 2] and len(report.files) == 3
    assert calls == [(1, 3, "model0"), (2, 3, "model1"), (3, 3, "model2")]
    calls.clear()
    export_multi(file, task, tmp_path / "m.onnx", progress=lambda *a: calls.append(a))
    assert [c[:2] for c in calls] == [(1, 5), (2, 5), (3, 5), (4, 5), (5, 5)]
    assert [c[2] for c in calls[1:4]] == ["model0", "model1", "model2"]


def test_graphs_go_into_missing_parent_folders_and_a_failed_move_leaves_nothing(tmp_path, monkeypatch):
    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    task = task_of(lambda: mlp(0), MLP_IN)
    export_contexts(file, task, "all", tmp_path / "onnx" / "vit")  # made if missing, parents too
    assert sorted(p.name for p in (tmp_path / "onnx" / "vit").iterdir()) == ["model0.onnx", "model1.onnx"]
    before = {p.name for p in tmp_path.iterdir()}

    def cross_device(*args):  # the output folder is the root of another file system
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    for name in ("link", "replace"):
        monkeypatch.setattr(os, name, cross_device)
    for force in (False, True):
        with pytest.raises(OutputError, match="m.onnx: cannot write: Invalid cross-device link"):
            export_contexts(file, task, 0, tmp_path / "m.onnx", force=force)
    assert_nothing_left(tmp_path, before)


def test_large_weights_use_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(convert, "EXTERNAL_DATA_BYTES", 0)
    file = merged(tmp_path, [mlp(i) for i in range(3)], "complex")
    out = tmp_path / "multi.onnx"
    report = export_multi(file, task_of(lambda: mlp(0), MLP_IN), out, measure_per_context=False)
    data = tmp_path / "multi.onnx.data"
    external = [
        i.name for i in onnx.load(str(out), load_external_data=False).graph.initializer
        if i.data_location == onnx.TensorProto.EXTERNAL
    ]  # fmt: skip
    assert data.is_file() and "model.2.bound_weight" in external
    assert report.files[str(out)] == out.stat().st_size + data.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pspctl-export")]


def test_whole_models_the_exporter_cannot_branch_are_served_per_tensor(tmp_path, monkeypatch):
    """Nothing superposed: K whole models as the branches of one If. Where the exporter cannot
    trace that (BertForMaskedLM inside torch.cond), the graph serves each tensor on its own."""
    file = merged(tmp_path, [mlp(i) for i in range(3)], "binary", policy=Policy(keep=("*",)))
    real = export_api.to_onnx

    def no_whole_branches(wrapper, *args, **kwargs):
        if wrapper.copies is not None:
            raise TraceError("the ONNX exporter cannot trace this model: UncapturedHigherOrderOpError")
        return real(wrapper, *args, **kwargs)

    monkeypatch.setattr(export_api, "to_onnx", no_whole_branches)
    out = tmp_path / "multi.onnx"
    report = export_multi(file, task_of(lambda: mlp(0), MLP_IN), out, measure_per_context=False)
    assert any("could not be traced as the branches of one If" in n for n in report.notes)
    assert set(report.layers) != set(SuperposedFile(file).names())  # not K whole models
    assert {"all-K Gemm", "gather"} & set(report.layers.values())
    assert_every_context(out, lambda: mlp(0), file, MLP_IN)


# --- bad input: one clear error, and no graph left behind -------------------------------


def test_task_without_example_inputs(tmp_path):
    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    before = {p.name for p in tmp_path.iterdir()}
    task = task_of(lambda: mlp(0), MLP_IN)
    task.example_inputs = None
    with pytest.raises(TaskError, match=r"has no example_inputs\(\) function"):
        export_multi(file, task, tmp_path / "m.onnx")
    assert_nothing_left(tmp_path, before)


def test_weights_that_do_not_fit_list_the_keys(tmp_path):
    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    with pytest.raises(MismatchError) as e:
        export_contexts(file, task_of(lambda: cnn(0), CNN_IN), 0, tmp_path / "m.onnx")
    assert str(e.value) == (
        f"{file} does not fit the task's model: missing: 1.weight, 1.bias, "
        "1.running_mean, 1.running_var, 1.num_batches_tracked (+4 more); not in the model: 2.weight, "
        "2.bias, 4.weight, 4.bias; other shape: 0.weight [48, 16] (model: [8, 3, 3, 3]), "
        "0.bias [48] (model: [8])"
    )
    wide = task_of(lambda: mlp(0, width=8), MLP_IN)
    with pytest.raises(MismatchError, match=r"0\.weight \[48, 16\] \(model: \[8, 16\]\)"):
        export_multi(file, wide, tmp_path / "m.onnx")


def test_unknown_context(tmp_path):
    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    with pytest.raises(ContextError, match="out of range"):
        export_contexts(file, task_of(lambda: mlp(0), MLP_IN), 2, tmp_path / "m.onnx")
    with pytest.raises(ContextError, match="unknown context 'nope'"):
        export_contexts(file, task_of(lambda: mlp(0), MLP_IN), "nope", tmp_path / "m.onnx")


class Untraceable(nn.Sequential):
    def forward(self, x):
        out = super().forward(x)
        if out.sum() > 0:  # data-dependent control flow: torch.export cannot trace it
            return out
        return -out


def test_untraceable_model_gives_the_exporters_reason(tmp_path):
    def build():
        return Untraceable(*mlp(0))

    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(TraceError, match="cannot trace this model: .*data-dependent") as e:
        export_contexts(file, task_of(build, MLP_IN), 0, tmp_path / "m.onnx")
    message = str(e.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 700
    assert "GuardOnDataDependentSymNode: Could not guard" in message  # the class, not <class '...'>
    assert "test_onnx_export.py:" in message and "in forward: if out.sum() > 0:" in message
    assert_nothing_left(tmp_path, before)


class BatchAsNumber(nn.Sequential):
    def forward(self, x):
        return super().forward(x) + torch.zeros(len(x), 1)  # len(): the batch becomes a constant


@pytest.mark.parametrize("multi", [False, True])
def test_a_forward_that_fixes_the_batch_is_refused(tmp_path, multi):
    """The exporter silently traces such a forward at the example's batch; the graph would
    refuse every other batch size, so export names the cause instead of writing it."""

    def build():
        return BatchAsNumber(*mlp(0))

    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    before = {p.name for p in tmp_path.iterdir()}
    with pytest.raises(TraceError, match=r"fixed the batch of input_?0? at 4: .*len\(x\)"):
        if multi:
            export_multi(file, task_of(build, MLP_IN), tmp_path / "m.onnx")
        else:
            export_contexts(file, task_of(build, MLP_IN), 0, tmp_path / "m.onnx")
    assert_nothing_left(tmp_path, before)


def test_output_directory_that_is_a_file(tmp_path):
    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    (tmp_path / "out").write_text("not a directory")
    with pytest.raises(OutputError, match="is a file; --context all needs a directory"):
        export_contexts(file, task_of(lambda: mlp(0), MLP_IN), "all", tmp_path / "out")
    with pytest.raises(OutputError, match="already exists"):
        export_multi(file, task_of(lambda: mlp(0), MLP_IN), tmp_path / "out")


def test_validation_failure_keeps_no_graph(tmp_path, monkeypatch):
    file = merged(tmp_path, [mlp(i) for i in range(2)], "rotation")
    before = {p.name for p in tmp_path.iterdir()}
    real = export_api.torch_outputs
    # A reference off by 1e-3 in one element must fail atol 1e-4 even though the graph is right.
    monkeypatch.setattr(
        export_api, "torch_outputs", lambda m, x: [o + np.where(o == o.flat[0], 1e-3, 0) for o in real(m, x)]
    )
    with pytest.raises(AtolError, match=r"2 output\(s\) differ from PyTorch.*no graph written") as e:
        export_contexts(file, task_of(lambda: mlp(0), MLP_IN), "all", tmp_path / "dir")
    assert [c.passed for c in e.value.report.checks] == [False, False]
    assert e.value.report.checks[0].max_abs == pytest.approx(1e-3, rel=1e-2)
    assert_nothing_left(tmp_path, before)


@pytest.mark.slow
def test_latency_benchmark_runs(capsys):
    from benchmarks import export_latency

    rows = export_latency.main(["--models", "digits", "--kinds", "binary", "--runs", "3", "--warmup", "1"])
    assert [(r["model"], r["base"], r["batch"]) for r in rows] == [
        ("digits", b, n) for b in ("none", "mean") for n in (1, 64)
    ]
    assert all(r["ratio"] > 0 and r["multi_bytes"] < r["per_context_total_bytes"] for r in rows)
    assert all(r["floor_ratio"] > 0 for r in rows)  # the floor graph ran (and matched context 1's graph)
    assert all(r["extra_nodes"] > 0 and r["dispatch_ratio"] > 0 for r in rows)
    assert all(r["pass"] == (r["ratio"] <= 1.15 * r["bound"]) for r in rows)
    assert rows[0]["bound"] == 1.0 and rows[2]["bound"] == rows[2]["weights_read_ratio"] > 1  # none, mean
    # binary reads W once plus 256 signs: (85002 + 256) / 85002 weights
    assert rows[0]["weights_read_ratio"] == pytest.approx((85002 + 256) / 85002)
    assert "| digits | binary | none | 64 |" in capsys.readouterr().out


def test_weights_read_counts_both_parts_of_complex_weights(tmp_path):
    from benchmarks.export_latency import weights_read

    for kind, extra in [("complex", 65536 + 256), ("rotation", 256 * 256), ("binary", 256)]:
        merge(
            [checkpoint_path(k) for k in range(4)],
            tmp_path / f"{kind}.safetensors",
            MergeOptions(base="none", kind=kind, policy=HIDDEN),
        )
        # only the 256x256 hidden layer is superposed; 85002 weights in all
        assert weights_read(SuperposedFile(tmp_path / f"{kind}.safetensors")) == pytest.approx(
            (85002 + extra) / 85002
        )


class TwoHeads(nn.Module):
    """Two inputs, two outputs: graph names become input_0/input_1 and output_0/output_1."""

    def __init__(self):
        super().__init__()
        self.body = mlp(0)
        self.side = nn.Linear(16, 4)

    def forward(self, x, y):
        return self.body(x), self.side(y)


def test_several_inputs_and_outputs_with_a_batch_of_one(tmp_path):
    models = []
    for i in range(2):
        torch.manual_seed(i)
        models.append(TwoHeads())
    file = merged(tmp_path, models, "binary")
    task = SimpleNamespace(
        source="two-heads", build_model=TwoHeads, load_data=None,
        example_inputs=lambda: (torch.randn(1, 16), torch.randn(1, 16)),  # traced at batch 2
    )  # fmt: skip
    export_multi(file, task, tmp_path / "m.onnx", measure_per_context=False)
    sess = session(tmp_path / "m.onnx")
    assert [i.name for i in sess.get_inputs()] == ["context", "input_0", "input_1"]
    assert [o.name for o in sess.get_outputs()] == ["output_0", "output_1", "context_valid"]
    x, y = torch.randn(5, 16), torch.randn(5, 16)
    ref = TwoHeads()
    ref.load_state_dict(SuperposedFile(file).state_dict(1))
    with torch.no_grad():
        want = [t.numpy() for t in ref.eval()(x, y)]
    got = sess.run(None, {"context": np.array(1), "input_0": x.numpy(), "input_1": y.numpy()})
    for g, w in zip(got[:2], want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("batch", "variant"), [(1, "all-K Gemm"), (64, "gather")])
def test_small_per_context_linears_run_as_one_gemm_over_all_contexts(tmp_path, batch, variant):
    """K = 3 at batch 1: the first and last Linears (kept per context) are one Gemm over the K
    copies with k's slice selected; tuned for batch 64, they are gathered. Both exact."""
    file = merged(tmp_path, [mlp(i) for i in range(3)], "binary", policy=HIDDEN)
    out = tmp_path / "multi.onnx"
    report = export_multi(file, task_of(lambda: mlp(0), MLP_IN), out, batch=batch, measure_per_context=False)
    assert report.passed and [c.context for c in report.checks] == [0, 1, 2]
    assert report.layers["2.weight"] == "input side"
    served = {n: v for n, v in report.layers.items() if n.startswith(("0", "4"))}
    if variant == "all-K Gemm":
        assert served == {"0": variant, "4": variant}
        shapes = {i.name: list(i.dims) for i in onnx.load(str(out)).graph.initializer}
        assert shapes["model.0.weight_all"] == [3 * 48, 16] and shapes["model.4.weight_all"] == [3 * 4, 48]
    else:
        assert served == {f"{i}.{p}": variant for i in (0, 4) for p in ("weight", "bias")}
    assert_every_context(out, lambda: mlp(0), file, MLP_IN)


class PointwiseNet(nn.Module):
    """A 1×1 conv (stride 2, zero padding 1: exact on the input side), a 3×3 conv (eq. 8's
    context varies over the window: retrieved), a Linear subclass that keeps Linear's forward
    and one that does not."""

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    class Plain(nn.Linear):
        pass

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.point = nn.Conv2d(3, 8, 1, stride=2, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.plain = PointwiseNet.Plain(8 * 3 * 3, 16)
        self.scaled = PointwiseNet.Scaled(16, 5)

    def forward(self, x):
        x = torch.relu(self.conv(torch.relu(self.point(x))))
        return self.scaled(torch.relu(self.plain(x.flatten(1))))


@pytest.mark.parametrize("base", ["none", "mean"])
@pytest.mark.parametrize("kind", KINDS)
def test_pointwise_convs_and_plain_linear_subclasses_bind_on_the_input_side(tmp_path, kind, base):
    file = merged(tmp_path, [PointwiseNet(i) for i in range(3)], kind, base=base)
    out = tmp_path / "multi.onnx"
    task = task_of(lambda: PointwiseNet(0), (3, 4, 4))
    report = export_multi(file, task, out, measure_per_context=False)
    assert report.passed and [c.context for c in report.checks] == [0, 1, 2]
    layers = report.layers
    assert layers["point.weight"] == layers["plain.weight"] == "input side"
    assert layers["conv.weight"] == layers["scaled.weight"] == "weight side"
    assert_every_context(out, lambda: PointwiseNet(0), file, (3, 4, 4))


@pytest.mark.parametrize("base", ["none", "mean"])
def test_multi_graph_of_a_file_with_nothing_superposed_picks_whole_branches(tmp_path, base):
    """Nothing superposed: K whole graphs behind an If tree, each reading its own constants
    (moved into its branch, where onnxruntime pre-packs them), no Gather of weights."""
    file = merged(tmp_path, [cnn(i) for i in range(3)], "rotation", base=base, policy=Policy(keep=("*",)))
    assert not SuperposedFile(file).names(Role.SUPERPOSED)
    task = task_of(lambda: cnn(0), CNN_IN)
    report = export_multi(file, task, tmp_path / "multi.onnx")
    assert set(report.layers.values()) == {"per-context branch"}
    graph = onnx.load(str(tmp_path / "multi.onnx"))
    ops = [n.op_type for n in graph.graph.node]
    assert "If" in ops and "Gather" not in ops
    branches = [a.g for n in graph.graph.node if n.op_type == "If" for a in n.attribute]
    inner = [
        t for g in branches for n in g.node if n.op_type == "If" for a in n.attribute for t in a.g.initializer
    ]
    inner += [t for g in branches for t in g.initializer]
    # every context's weights and biases (BatchNorm folded into them) sit in its branch; the
    # main graph keeps only scalars
    layers = [m for m in cnn(0).modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    assert len(inner) == 3 * 2 * len(layers)
    assert all(int(np.prod(t.dims)) <= 2 for t in graph.graph.initializer)
    sess = session(tmp_path / "multi.onnx")
    x = torch.randn(5, *CNN_IN, generator=torch.Generator().manual_seed(7))
    for k in range(3):
        out, valid = sess.run(None, {"context": np.array(k), "input": x.numpy()})
        original = cnn(k).eval()
        with torch.no_grad():
            assert np.allclose(out, original(x).numpy(), atol=1e-5) and bool(valid)
    assert not bool(sess.run(None, {"context": np.array(3), "input": x.numpy()})[1])


def test_a_large_per_context_linear_runs_behind_an_if_tree(tmp_path):
    """A 256×256 Linear kept per context (256 KiB) is K Linears behind If nodes, each branch
    holding its own weight; the small head is still one all-K Gemm (K = 3, batch 1). Every
    context exact."""

    def net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(16, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4))

    file = merged(tmp_path, [net(i) for i in range(3)], "binary", policy=Policy(superpose=("0.weight",)))
    out = tmp_path / "multi.onnx"
    report = export_multi(file, task_of(lambda: net(0), MLP_IN), out, measure_per_context=False)
    assert report.layers["2"] == "per-context branch" and report.layers["0.weight"] == "input side"
    assert report.layers["4"] == "all-K Gemm"
    graph = onnx.load(str(out))
    assert "If" in [n.op_type for n in graph.graph.node]
    assert not any(list(t.dims) == [256, 256] for t in graph.graph.initializer)  # all in branches
    assert_every_context(out, lambda: net(0), file, MLP_IN)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files_export_as_float32_graphs(tmp_path, dtype):
    """onnxruntime's CPU provider has no bfloat16 kernels, and float16 rounding fails the
    tolerances: the graphs compute in float32. Per-context graphs match the extracted model
    (its half-precision weights upcast); the multi-context graph retrieves in float32."""
    models = [mlp(i).to(dtype) for i in range(3)]
    file = merged(tmp_path, models, "binary", base="mean")
    task = task_of(lambda: mlp(0).to(dtype), MLP_IN)
    report = export_contexts(file, task, "all", tmp_path / "out")
    assert report.passed and report.notes == [f"{str(dtype)[6:]} weights run as float32 in the graphs"]
    sf = SuperposedFile(file)
    x = fresh_inputs(MLP_IN)[1]
    multi = export_multi(file, task, tmp_path / "m.onnx", measure_per_context=False)
    assert multi.passed and "retrieved in float32 inside it" in multi.notes[0]
    for k in range(3):
        model = mlp(0)  # float32, with the extracted (rounded) half-precision weights
        model.load_state_dict({n: t.float() for n, t in sf.state_dict(k).items()})
        with torch.no_grad():
            want = model.eval()(x).numpy()
        got = session(tmp_path / "out" / f"model{k}.onnx").run(None, {"input": x.numpy()})[0]
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        for name in sf.names(role="superposed"):  # the multi graph: retrieved in float32
            model.get_parameter(name).data = sf.retrieve(name, k, dtype=torch.float32)
        with torch.no_grad():
            want = model(x).numpy()
        got, valid = session(tmp_path / "m.onnx").run(None, {"context": np.array(k), "input": x.numpy()})
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
        assert bool(valid)


def test_an_opset_the_exporter_cannot_write_is_refused_and_others_are_kept(tmp_path):
    """The exporter falls back to its own opset where it cannot convert; the graph must have
    the opset asked for (and the report says), or nothing is written."""
    file = merged(tmp_path, [mlp(i) for i in range(2)], "binary")
    task = task_of(lambda: mlp(0), MLP_IN)
    with pytest.raises(InputError, match=r"^--opset 7: torch's ONNX exporter could not write this model"):
        export_contexts(file, task, 0, tmp_path / "old.onnx", opset=7)
    assert not (tmp_path / "old.onnx").exists()
    report = export_contexts(file, task, 0, tmp_path / "new.onnx", opset=19)
    graph = onnx.load(str(tmp_path / "new.onnx"))
    assert report.opset == 19 and [o.version for o in graph.opset_import if o.domain == ""] == [19]
