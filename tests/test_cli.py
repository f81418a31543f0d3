"""The CLI end to end with typer's CliRunner: exit codes and the text a user sees."""

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from pspctl.cli import app
from pspctl.fileformat import SuperposedFile
from tests.conftest import mlp, save_models

runner = CliRunner()


def run(*args, cwd=None):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    save_models([mlp(i, width=256) for i in range(3)], tmp_path)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_version_is_the_installed_one():
    from importlib.metadata import version

    import pspctl

    result = run("--version")
    assert result.exit_code == 0
    assert result.output == f"pspctl {pspctl.__version__}\n"
    assert pspctl.__version__ == version("pspctl")  # pyproject reads it from pspctl/__init__.py


def test_policy_flags_default_to_policy_defaults():
    import inspect

    from pspctl.cli import core, train
    from pspctl.cli.core import policy_from_flags
    from pspctl.policy import SHAPE_RULES, Policy

    def defaults(command):
        params = inspect.signature(command).parameters
        return tuple(
            params[n].default for n in ("max_interference", "min_share", "max_error", "eta") if n in params
        )

    # merge's flags default to Policy()'s, train's shape rules to SHAPE_RULES' (no error budget)
    assert policy_from_flags(*defaults(core.merge)[:2], None, None, max_error=defaults(core.merge)[2], eta=defaults(core.merge)[3]) == Policy()  # fmt: skip
    assert defaults(train.train_command)[:2] == (SHAPE_RULES.max_interference, SHAPE_RULES.min_share)
    assert policy_from_flags(0.1, 0.2, ["a*"], ["b*"]) == Policy(0.1, 0.2, ("a*",), ("b*",))


def test_merge_info_extract_happy_path(workdir):
    result = run("merge", "model0.pt", "model1.pt", "model2.pt", "--kind", "complex", "--seed", "3", "-q")
    assert result.exit_code == 0, result.output
    assert "3 models, complex contexts" in result.output
    assert "storage ratio" in result.output and "2.weight" in result.output
    sf = SuperposedFile("w.safetensors")
    assert sf.header.seed == 3 and sf.header.recipe["kind"] == "complex"

    info = run("info")
    assert info.exit_code == 0 and "kind complex, seed 3, 3 contexts" in info.output

    result = run("extract", "--context", "2", "-o", "m2.pt")
    assert result.exit_code == 0 and "wrote m2.pt" in result.output
    model = mlp(0, width=256)
    model.load_state_dict(torch.load("m2.pt", weights_only=True))
    assert torch.equal(model.state_dict()["0.weight"], torch.load("model2.pt", weights_only=True)["0.weight"])

    result = run("extract", "--context", "all", "-o", "out", "-q")
    assert result.exit_code == 0 and sorted(p.name for p in (workdir / "out").iterdir()) == [
        "model0.safetensors", "model1.safetensors", "model2.safetensors",
    ]  # fmt: skip

    from pspctl.extract import extract

    ticks = []
    extract("w.safetensors", "all", "again", progress=lambda *t: ticks.append(t))
    assert ticks == [(1, 3, "model0"), (2, 3, "model1"), (3, 3, "model2")]
    ticks.clear()
    extract("w.safetensors", "model1", "m1.safetensors", progress=lambda *t: ticks.append(t))
    assert ticks == [(1, 1, "model1")]


def test_json_outputs(workdir):
    result = run("merge", "model0.pt", "model1.pt", "--base", "none", "--max-error", "1", "--json")
    data = json.loads(result.output)
    assert data["num_contexts"] == 2 and data["output_bytes"] == (workdir / "w.safetensors").stat().st_size
    roles = {t["name"]: t["role"] for t in data["tensors"]}
    assert roles["2.weight"] == "superposed" and roles["0.weight"] == "per_context"
    assert data["storage_ratio"] == pytest.approx(data["input_bytes"] / data["output_bytes"])
    info = json.loads(run("info", "--json").output)
    assert info["format_version"] == 2 and info["tensors"]["2.weight"]["role"] == "superposed"
    assert info["inputs"][1]["path"] == "model1.pt" and len(info["inputs"][1]["sha256"]) == 64


def test_keep_and_superpose_globs(workdir):
    result = run("merge", "model0.pt", "model1.pt", "--superpose", "*", "--keep", "2.*", "--json")
    roles = {t["name"]: (t["role"], t["reason"]) for t in json.loads(result.output)["tensors"]}
    assert roles["0.weight"] == ("superposed", "--superpose")
    assert roles["2.weight"] == ("superposed", "--superpose")  # --superpose wins over --keep
    assert roles["0.bias"][0] == "per_context"
    result = run("merge", "model0.pt", "model1.pt", "--keep", "2.*", "--json", "--force")
    roles = {t["name"]: t["reason"] for t in json.loads(result.output)["tensors"]}
    assert roles["2.weight"] == "--keep"


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["merge", "model0.pt"], 3, "merge needs at least 2 inputs, got 1"),
        (["merge", "model0.pt", "missing.pt"], 2, "missing.pt: no such file"),
        (["merge", "model0.pt", "model1.pt", "--kind", "quantum"], 2, "Invalid value for '--kind': Value error, 'quantum' is not one of"),
        (["merge", "model0.pt", "model1.pt", "-o", "model0.pt", "--force"], 8, "output is one of the inputs"),
        (["merge", "model0.pt", "model1.pt", "--kind", "rotation", "--superpose", "*", "--max-rotation-fan-in", "100"],
         7, "rotation fan-in 256 exceeds the limit 100"),
        (["info", "model0.pt"], 5, "model0.pt: a PyTorch checkpoint, not a pspctl superposed file"),
        (["merge", "model0.pt", "model1.pt", "-o", "w.pt"], 8, "w.pt: a superposed file is a safetensors file"),
        (["info", "plain.safetensors"], 5, "a plain safetensors file, not a pspctl superposed file"),
        (["merge", "model0.pt", "notes.pt"], 2, "notes.pt: not a PyTorch checkpoint"),
        (["merge", "model0.pt", "truncated.safetensors"], 2, "truncated.safetensors: not a readable safetensors file"),
        (["merge", "model0.pt", "small.pt"], 3, "inputs do not match: 0.weight: shape [8, 16] in small.pt vs [256, 16]"),
        (["extract", "--context", "0"], 2, "w.safetensors: no such file"),
    ],
)  # fmt: skip
def test_bad_input_gives_one_line_and_an_exit_code(workdir, args, code, message):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, "plain.safetensors")
    (workdir / "truncated.safetensors").write_bytes((workdir / "plain.safetensors").read_bytes()[:-3])
    (workdir / "notes.pt").write_text("these are my notes")
    torch.save(mlp(0, width=8).state_dict(), "small.pt")
    before = sorted(p.name for p in workdir.iterdir())
    result = run(*args)
    assert result.exit_code == code, result.output
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert sorted(p.name for p in workdir.iterdir()) == before  # nothing written
    assert not (workdir / "w.safetensors").exists()


def test_context_errors_and_existing_outputs(workdir):
    assert run("merge", "model0.pt", "model1.pt", "-q").exit_code == 0
    result = run("extract", "--context", "7", "-o", "x.pt")
    assert result.exit_code == 6 and "context 7 out of range" in result.output
    result = run("extract", "--context", "nope", "-o", "x.pt")
    assert result.exit_code == 6 and "unknown context 'nope'; labels are model0, model1" in result.output
    assert not (workdir / "x.pt").exists()
    result = run("merge", "model0.pt", "model1.pt", "-q")
    assert result.exit_code == 8 and "already exists (pass --force to overwrite)" in result.output


def test_pickled_module_refused_without_trust_pickle(workdir):
    torch.save(mlp(5, width=256), "whole.pt")
    result = run("merge", "whole.pt", "model1.pt")
    assert result.exit_code == 4 and "--trust-pickle" in result.output
    result = run("merge", "whole.pt", "model1.pt", "--trust-pickle", "-q")
    assert result.exit_code == 0, result.output


def test_nonfinite_refused(workdir):
    sd = torch.load("model1.pt", weights_only=True)
    sd["2.weight"][3, 3] = float("inf")
    torch.save(sd, "inf.pt")
    result = run("merge", "model0.pt", "inf.pt")
    assert result.exit_code == 7 and "NaN/Inf" in result.output
    assert sorted(p.name for p in workdir.iterdir() if not p.name.startswith("model")) == ["inf.pt"]


def test_python_dash_m_and_help_are_fast_to_import():
    out = subprocess.run(
        [sys.executable, "-m", "pspctl", "--help"], capture_output=True, text=True, check=True
    )
    assert "merge" in out.stdout and "extract" in out.stdout
    # --help must not import torch (typer + rich only).
    code = "import sys, pspctl.cli; print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    )


TASK = """
import torch
from tests.conftest import mlp

def build_model():
    return mlp(0, width=8)

def load_data(context, split):
    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(context))
    yield x, (x[:, context] > 0).long()
"""


def test_tune_trust_pickle_loads_pickled_originals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.py").write_text(TASK)
    for k in range(2):
        torch.save(mlp(k, width=8), f"whole{k}.pt")  # whole modules: pickled code
    result = run("merge", "whole0.pt", "whole1.pt", "--trust-pickle", "--task", "task.py", "-q")
    assert result.exit_code == 0, result.output
    result = run("tune", "--steps", "2", "-q")  # distills from the originals: refused
    assert result.exit_code == 4 and "whole0.pt: loading it would execute pickled code" in result.stderr
    assert "pass --trust-pickle" in result.stderr and not (tmp_path / "w.tuned.safetensors").exists()
    result = run("tune", "--steps", "2", "-q", "--trust-pickle", "--json")
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.stdout)["objective"] == "distill" and (tmp_path / "w.tuned.safetensors").is_file()
    )


@pytest.mark.parametrize(
    "args",
    [
        ["info", "emptydir"],
        ["extract", "emptydir", "--context", "0"],
        ["export", "emptydir", "--multi", "-o", "m.onnx"],
        ["analyze", "emptydir"],
        ["tune", "emptydir", "--task", "task.py"],
    ],
)
def test_a_directory_is_not_a_superposed_file(tmp_path, monkeypatch, args):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "emptydir").mkdir()
    result = run(*args)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == "error: emptydir: is a directory, not a superposed file\n"


def test_train_labels_must_match_contexts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "task.py").write_text(TASK)
    result = run("train", "--task", "task.py", "--contexts", "5", "--labels", "a,b", "-q")
    assert result.exit_code == 3 and result.stdout == ""
    assert result.stderr == "error: --labels gives 2 labels for --contexts 5\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["task.py"]


def test_superpose_labels_must_match_contexts():
    from pspctl.errors import MismatchError
    from pspctl.nn import superpose

    with pytest.raises(MismatchError, match=r"^2 labels for 5 contexts$"):
        superpose(mlp(0, width=8), 5, labels=["a", "b"])


@pytest.mark.parametrize("flags", [[], ["--superpose", "*"], ["--kind", "rotation", "--superpose", "*"]])
def test_zero_size_tensors_are_kept_per_context(tmp_path, monkeypatch, flags):
    monkeypatch.chdir(tmp_path)
    for k in range(2):
        state = mlp(k, width=8).state_dict()
        state["empty"], state["empty_rows"] = torch.zeros(4, 0), torch.zeros(0, 4)
        torch.save(state, f"m{k}.pt")
    result = run("merge", "m0.pt", "m1.pt", *flags, "--json")
    assert result.exit_code == 0, result.output
    rows = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
    for name in ("empty", "empty_rows"):
        assert (rows[name]["role"], rows[name]["reason"], rows[name]["interference"]) == (
            "per_context",
            "empty",
            None,
        )
    assert run("extract", "--context", "1", "-o", "m1-back.pt").exit_code == 0
    back = torch.load("m1-back.pt", weights_only=True)
    assert back["empty"].shape == (4, 0) and back["empty_rows"].shape == (0, 4)
    assert run("analyze", "-q").exit_code == 0  # its weight statistics handle them too


def test_measured_policy_leaves_zero_size_tensors_alone(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = TASK.replace(
        "def build_model():\n    return mlp(0, width=8)",
        "class Empty(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.w = torch.nn.Parameter(torch.zeros(4, 0))\n"
        "    def forward(self, x):\n"
        "        return x\n\n"
        "def build_model():\n    return torch.nn.Sequential(*mlp(0, width=8), Empty())",
    )
    (tmp_path / "task.py").write_text(task)
    for k in range(2):
        torch.save({**mlp(k, width=8).state_dict(), "5.w": torch.zeros(4, 0)}, f"m{k}.pt")
    args = ["merge", "m0.pt", "m1.pt", "--task", "task.py", "--policy", "measured", "--max-drop", "100"]
    for extra in ([], ["--superpose", "*"]):
        result = run(*args, *extra, "--json", "--force")
        assert result.exit_code == 0, result.output
        rows = {t["name"]: t for t in json.loads(result.stdout)["tensors"]}
        assert (rows["5.w"]["role"], rows["5.w"]["reason"]) == ("per_context", "empty")


def test_a_pattern_that_matches_no_tensor_warns(tmp_path, monkeypatch):
    """A typo in --keep would leave the tensor it meant to the policy, silently."""
    save_models([mlp(i) for i in range(3)], tmp_path)
    monkeypatch.chdir(tmp_path)
    args = ["merge", "model0.pt", "model1.pt", "model2.pt", "--base", "none", "--superpose", "2.weight"]
    result = runner.invoke(app, [*args, "--keep", "2.weigth", "--fan-in-axis", "nothing*=0", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [w for w in report["warnings"] if "matches no tensor" in w] == [
        "--keep '2.weigth' matches no tensor; names look like 0.weight, 0.bias, 2.weight",
        "--fan-in-axis 'nothing*=0' matches no tensor; names look like 0.weight, 0.bias, 2.weight",
    ]
    assert [t["role"] for t in report["tensors"] if t["name"] == "2.weight"] == ["superposed"]
    result = runner.invoke(app, [*args, "--keep", "4.*", "-o", "ok.safetensors", "-q"])
    assert result.exit_code == 0 and "matches no tensor" not in result.stderr, result.output


def test_a_superposed_sum_that_overflows_its_dtype_is_refused(tmp_path, monkeypatch):
    """Four float16 tensors near 1.2e4 each sum past float16's 6.55e4: stored, every context
    would read Inf. Refused (exit 7, nothing written); float32 storage holds the sum."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    base = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) * 1.2e4
    for i in range(4):
        noise = torch.randn(64, 64, generator=torch.Generator().manual_seed(i + 1))
        save_file({"w": (base + 100 * noise).half()}, f"h{i}.safetensors")
    args = ["merge", *(f"h{i}.safetensors" for i in range(4)), "--base", "none", "--superpose", "*", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 7, result.output
    assert (
        "w: its superposed sum overflows float16 in" in result.output and "--dtype float32" in result.output
    )
    assert not (tmp_path / "w.safetensors").exists()
    assert runner.invoke(app, [*args, "--dtype", "float32"]).exit_code == 0
    assert torch.isfinite(SuperposedFile("w.safetensors").superposed("w")).all()


def test_two_models_centred_say_why_nothing_is_superposed(tmp_path, monkeypatch):
    """K = 2 centred on their mean stores mean + sum, two copies: the reason names the error
    of the option that would save bytes (plain), or that none would (--base mean)."""
    from safetensors.torch import save_file

    monkeypatch.chdir(tmp_path)
    base = torch.randn(128, 96, generator=torch.Generator().manual_seed(0))
    for i in range(2):
        noise = torch.randn(128, 96, generator=torch.Generator().manual_seed(i + 1))
        save_file({"a.weight": base + 0.05 * noise}, f"m{i}.safetensors")
    for flags, reason in (
        (["--base", "auto"], "over the budget"),
        (["--base", "mean"], "superposing saves no bytes"),
    ):
        result = runner.invoke(
            app, ["merge", "m0.safetensors", "m1.safetensors", *flags, "--json", "--force"]
        )
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        (tensor,) = report["tensors"]
        assert tensor["role"] == "per_context" and reason in tensor["reason"], tensor
        assert any("with 2 models, centring on their mean" in n for n in report["notes"]), report["notes"]
        if reason == "over the budget":  # plain superposition's error, not the mean's (0.024)
            assert float(tensor["reason"].split()[1].rstrip(":")) > 0.2
