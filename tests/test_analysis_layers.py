"""`analyze` end to end on models that are not MLPs: a CNN with BatchNorm (the conv path) and a
model whose superposed weights live in modules that are neither Linear nor Conv (the generic
path). Every number is checked against plain torch on inputs captured with our own hooks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pspctl.analysis import analyze
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.policy import Policy, Role
from pspctl.task import load_task

K = 3

CNN_TASK = """
import torch
from torch import nn

def build_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 5)
    )

def load_data(context, split):
    g = torch.Generator().manual_seed(10 * context + len(split))
    for _ in range(2):
        yield torch.randn(6, 3, 4, 4, generator=g), torch.randint(0, 5, (6,), generator=g)
"""

GENERIC_TASK = """
import torch
import torch.nn.functional as F
from torch import nn

class Gate(nn.Module):
    # A weight used through F.linear and a nonlinearity: not an nn.Linear.
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(12, 16) / 4)

    def forward(self, x):
        return torch.tanh(F.linear(x, self.weight))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = Gate()
        self.bil = nn.Bilinear(12, 16, 6)  # a 3-d weight [6, 12, 16] and two inputs
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.bil(self.gate(x), x)))

def build_model():
    return Net()

def load_data(context, split):
    g = torch.Generator().manual_seed(10 * context + len(split))
    for _ in range(2):
        yield torch.randn(8, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
"""


def _setup(tmp_path: Path, text: str, kind: str) -> tuple[Path, list[Path], object]:
    """K random inits (seeds 0..K-1) saved and merged with every ≥2-d tensor superposed."""
    (tmp_path / "task.py").write_text(text)
    task = load_task(tmp_path / "task.py")
    paths = []
    for k in range(K):
        torch.manual_seed(k)
        model = task.build_model()
        model.train()
        with torch.no_grad():  # non-trivial BatchNorm running statistics, different per model
            model(*next(iter(task.load_data(k, "train")))[:1])
        paths.append(tmp_path / f"model{k}.pt")
        torch.save(model.state_dict(), paths[-1])
    out = tmp_path / "w.safetensors"
    merge(
        paths,
        out,
        MergeOptions(base="none", kind=kind, seed=3, policy=Policy(superpose=("*",)), task=str(task.source)),
    )
    return out, paths, task


def _calib(task, k: int) -> Tensor:
    """What analyze runs on: the context's calib batches, concatenated."""
    return torch.cat([x for x, _ in task.load_data(k, "calib")])


def _models(task, sf: SuperposedFile, path: Path, k: int) -> tuple[nn.Module, nn.Module]:
    orig, ret = task.build_model(), task.build_model()
    orig.load_state_dict(torch.load(path, weights_only=True))
    ret.load_state_dict(sf.state_dict(k))
    return orig.eval(), ret.eval()


def _inputs_of(model: nn.Module, module_names: list[str], x: Tensor) -> dict[str, tuple]:
    """The positional inputs of each named submodule during model(x), by our own hooks."""
    seen: dict[str, tuple] = {}

    def hook(module: nn.Module, args: tuple, _out: object) -> None:  # None: leave the output alone
        seen[names[module]] = args

    names = {model.get_submodule(n): n for n in module_names}
    handles = [m.register_forward_hook(hook) for m in names]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _row(report, name: str, k: int):
    return next(r for r in report.layers if r.name == name and r.context == k)


def _check_end_to_end_and_per_context(report, sf: SuperposedFile, task, paths: list[Path]) -> None:
    for k in range(K):
        orig, ret = _models(task, sf, paths[k], k)
        x = _calib(task, k)
        with torch.no_grad():
            direct = _rel(ret(x), orig(x))
        assert direct > 1e-3  # superposition did change the output, so the comparison means something
        assert report.contexts[k].output_error == pytest.approx(direct, rel=1e-5)
    per_context = [n for n in sf.names() if sf.header.tensors[n].role == Role.PER_CONTEXT]
    by_name = {w.name: w for w in report.weights}
    floating = [n for n in per_context if getattr(torch, sf.header.tensors[n].dtype).is_floating_point]
    assert floating and all(by_name[n].error == [0.0] * K for n in floating)
    assert all(by_name[n].role == "per_context" for n in floating)


@pytest.mark.parametrize("kind", ["binary", "complex", "rotation"])
def test_cnn_end_to_end(tmp_path, kind):
    out, paths, task = _setup(tmp_path, CNN_TASK, kind)
    sf = SuperposedFile(out)
    assert sf.names(Role.SUPERPOSED) == ["0.weight", "4.weight"]
    # The BatchNorm statistics and biases stay per context; the int counter too (stored once
    # when equal in every model, as BatchNorm's untrained scale and the counter are here).
    assert {"1.running_mean", "1.weight", "0.bias", "1.num_batches_tracked"} <= set(
        sf.names(Role.PER_CONTEXT) + sf.names(Role.SHARED)
    )
    report = analyze(out, max_samples=64)
    assert report.inputs == "calib"
    for k in range(K):
        orig, _ = _models(task, sf, paths[k], k)
        seen = _inputs_of(orig, ["0", "4"], _calib(task, k))
        (x,) = seen["0"]
        W, W_hat = orig[0].weight.detach(), sf.retrieve("0.weight", k).float()
        y, y_hat = F.conv2d(x, W, padding=1), F.conv2d(x, W_hat, padding=1)
        conv = _row(report, "0.weight", k)
        assert conv.method == "conv" and conv.fan_in == 27 and conv.inputs == "calib"
        assert conv.measured == pytest.approx(_rel(y_hat, y), rel=1e-5)
        (h,) = seen["4"]  # after BatchNorm (running stats), ReLU and Flatten
        W, W_hat = orig[4].weight.detach(), sf.retrieve("4.weight", k).float()
        lin = _row(report, "4.weight", k)
        assert lin.method == "linear" and lin.fan_in == 128
        assert lin.measured == pytest.approx(_rel(F.linear(h, W_hat), F.linear(h, W)), rel=1e-5)
    _check_end_to_end_and_per_context(report, sf, task, paths)
    assert "1.num_batches_tracked" not in {w.name for w in report.weights}  # not floating: no error


def test_generic_fallback_for_other_modules(tmp_path):
    out, paths, task = _setup(tmp_path, GENERIC_TASK, "binary")
    sf = SuperposedFile(out)
    assert sf.names(Role.SUPERPOSED) == ["gate.weight", "bil.weight", "head.weight"]
    report = analyze(out, max_samples=64)
    for k in range(K):
        orig, _ = _models(task, sf, paths[k], k)
        seen = _inputs_of(orig, ["gate", "bil", "head"], _calib(task, k))
        (x,) = seen["gate"]
        W, W_hat = orig.gate.weight.detach(), sf.retrieve("gate.weight", k).float()
        gate = _row(report, "gate.weight", k)
        # The whole module's output, nonlinearity included.
        assert gate.measured == pytest.approx(
            _rel(torch.tanh(F.linear(x, W_hat)), torch.tanh(F.linear(x, W))), rel=1e-5
        )
        h, x2 = seen["bil"]
        W, W_hat, b = orig.bil.weight.detach(), sf.retrieve("bil.weight", k).float(), orig.bil.bias.detach()
        bil = _row(report, "bil.weight", k)
        # The module is called as is, so its bias is in both outputs (unlike the Linear/Conv paths).
        assert bil.measured == pytest.approx(
            _rel(F.bilinear(h, x2, W_hat, b), F.bilinear(h, x2, W, b)), rel=1e-5
        )
        assert bil.fan_in == 12 * 16
        for row in (gate, bil):
            assert row.method == "generic" and row.inputs == "calib" and row.measured > 1e-3
            # No prediction without a per-row dot product to define η.
            assert row.eta_mean is None and row.eta_rms is None and row.predicted is None
        assert _row(report, "head.weight", k).method == "linear"
    _check_end_to_end_and_per_context(report, sf, task, paths)
