"""Issue 9: no command loses data, writes outside its target, or trusts a header it has not checked."""

from __future__ import annotations

import errno
import json
import os
import random
import zlib
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from benchmarks import fuzz_header
from pspctl.cli import app
from pspctl.outputs import TMP_SUFFIX, crc32, write_safetensors
from tests.conftest import MLP_TASK, mlp, save_models

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def merged(tmp_path, monkeypatch):
    """w.safetensors: 4 small MLPs, first layer superposed, the rest per context."""
    save_models([mlp(i) for i in range(4)], tmp_path)
    monkeypatch.chdir(tmp_path)
    result = run("merge", *(f"model{i}.pt" for i in range(4)), "--superpose", "0.weight", "-q")
    assert result.exit_code == 0, result.output
    return tmp_path / "w.safetensors"


def rewrite(src: Path, dst: Path, *, forge: bool = True, edit=None, tensors_edit=None) -> None:
    """Copy a superposed file with its header JSON edited; with `forge`, recompute the checksums
    so that only the schema and tensor checks can catch the edit."""
    with safe_open(str(src), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["pspctl.header"])
    if edit:
        edit(header)
    if tensors_edit:
        tensors_edit(tensors)
    meta["pspctl.header"] = json.dumps(header)
    if forge:
        meta["pspctl.checksums"] = json.dumps(
            {
                "header": f"{zlib.crc32(meta['pspctl.header'].encode()):08x}",
                "tensors": {n: crc32(t) for n, t in tensors.items()},
            }
        )
    write_safetensors(tensors, dst, meta)


# --- data loss -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink", "dotted"])
def test_extract_never_overwrites_its_input(merged, how):
    before = merged.read_bytes()
    target = {"same": merged, "symlink": merged.with_name("l.safetensors"), "hardlink": merged.with_name("h.safetensors"),
              "dotted": Path("./sub/../w.safetensors")}[how]  # fmt: skip
    Path("sub").mkdir()
    if how == "symlink":
        target.symlink_to(merged)
    if how == "hardlink":
        os.link(merged, target)
    result = run("extract", merged, "-c", "0", "-o", target, "--force")
    assert result.exit_code == 8, result.output
    assert "output is one of the inputs" in result.stderr
    assert merged.read_bytes() == before


def test_merge_and_tune_refuse_an_input_as_output_through_a_symlink(merged):
    Path("link.pt").symlink_to("model0.pt")
    before = Path("model0.pt").read_bytes()
    result = run("merge", "model0.pt", "model1.pt", "-o", "link.pt", "--force")
    assert result.exit_code == 8 and Path("model0.pt").read_bytes() == before


@pytest.mark.parametrize("label", ["../x", "/abs/x", ".hidden", "-rf", "a/b", "x\ny", ""])
def test_unsafe_labels_are_refused_when_merging(merged, label):
    result = run("merge", "model0.pt", "model1.pt", "-o", "v.safetensors", "--labels", f"{label},ok")
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith("error: ") and "label" in result.stderr
    assert not Path("v.safetensors").exists()


def test_labels_that_collide_ignoring_case_are_refused(merged):
    result = run("merge", "model0.pt", "model1.pt", "-o", "v.safetensors", "--labels", "Net,net")
    assert result.exit_code == 3 and "collide" in result.stderr


def test_default_labels_from_unsafe_file_names_are_made_safe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate([".hidden.pt", "-dash.pt"]):
        torch.save(mlp(i).state_dict(), name)
    result = run("merge", "-q", "--", ".hidden.pt", "-dash.pt")
    assert result.exit_code == 0, result.output
    assert json.loads(run("info", "--json").stdout)["labels"] == ["hidden", "dash"]


@pytest.mark.parametrize("label", ["../escaped", "/tmp/pspctl-escaped", "a/b"])
def test_a_file_with_an_escaping_label_is_refused_and_nothing_is_written(merged, tmp_path, label):
    def edit(h):
        h["labels"][0] = label
        h["inputs"][0]["label"] = label

    rewrite(merged, tmp_path / "evil.safetensors", edit=edit)
    for args in (["extract", "evil.safetensors", "-c", "all", "-o", "out"], ["info", "evil.safetensors"]):
        result = run(*args)
        assert result.exit_code == 5, result.output
        assert "corrupt pspctl header: labels.0" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "escaped.safetensors").exists()
    assert not Path("/tmp/pspctl-escaped.safetensors").exists()


def test_extract_all_is_all_or_nothing(merged, monkeypatch):
    from pspctl.fileformat import SuperposedFile

    real = SuperposedFile.state_dict

    def fails_on_the_third(self, context):
        if self.resolve_context(context) == 2:
            raise OSError(28, "No space left on device")
        return real(self, context)

    monkeypatch.setattr(SuperposedFile, "state_dict", fails_on_the_third)
    from pspctl.errors import OutputError
    from pspctl.extract import extract

    with pytest.raises(OutputError, match="out: cannot write: No space left on device"):
        extract(merged, "all", "out")
    assert not Path("out").exists()
    assert sorted(p.name for p in merged.parent.iterdir() if p.name.startswith(".")) == []


def test_extract_all_makes_missing_parents_and_a_failed_move_is_exit_8(merged, monkeypatch):
    result = run("extract", merged, "--context", "all", "-o", "new/sub")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in Path("new/sub").iterdir()) == [f"model{i}.safetensors" for i in range(4)]
    Path("mnt").mkdir()  # as if the root of another file system: no rename reaches it

    def cross_device(real):
        def move(src, dst):  # within the staging folder (each file's own atomic write) as usual
            if Path(dst).parent.name.endswith(TMP_SUFFIX):
                return real(src, dst)
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        return move

    for name in ("link", "replace", "rename"):
        monkeypatch.setattr(os, name, cross_device(getattr(os, name)))
    for force in ([], ["--force"]):
        result = run("extract", merged, "--context", "all", "-o", "mnt", *force)
        assert result.exit_code == 8, result.output
        assert result.output == "error: mnt/model0.safetensors: cannot write: Invalid cross-device link\n"
    assert list(Path("mnt").iterdir()) == []  # no empty file for a retry to call existing


def test_two_merges_to_one_output_one_wins_the_other_says_so(merged, monkeypatch):
    """The second writer finds the name taken when it publishes, though it was free when it began."""
    from pspctl import fileformat
    from pspctl.merge import MergeOptions, merge

    real = fileformat.write_safetensors
    racing = []

    def slow_writer(tensors, path, metadata):  # another merge finishes while this one writes
        real(tensors, path, metadata)
        if not racing:
            racing.append(1)
            merge(["model2.pt", "model3.pt"], "v.safetensors", MergeOptions())

    monkeypatch.setattr(fileformat, "write_safetensors", slow_writer)
    with pytest.raises(Exception, match="appeared while pspctl was writing it"):
        merge(["model0.pt", "model1.pt"], "v.safetensors", MergeOptions())
    from pspctl.fileformat import SuperposedFile

    assert SuperposedFile("v.safetensors").labels == ["model2", "model3"]  # the first one's file


# --- reproducible bytes, modes -------------------------------------------------------------------


def test_outputs_are_byte_reproducible(merged):
    assert run("merge", *(f"model{i}.pt" for i in range(4)), "--superpose", "0.weight", "-o", "again.safetensors", "-q").exit_code == 0  # fmt: skip
    assert Path("again.safetensors").read_bytes() == merged.read_bytes()
    for suffix in ("pt", "safetensors"):
        assert run("extract", "-c", "1", "-o", f"a.{suffix}").exit_code == 0
        assert run("extract", "-c", "1", "-o", f"b.{suffix}").exit_code == 0
        assert Path(f"a.{suffix}").read_bytes() == Path(f"b.{suffix}").read_bytes()


def test_outputs_follow_the_umask(merged):
    old = os.umask(0o022)
    try:
        assert run("extract", "-c", "0", "-o", "m.safetensors").exit_code == 0
        assert run("merge", "model0.pt", "model1.pt", "-o", "v.safetensors", "-q").exit_code == 0
    finally:
        os.umask(old)
    assert oct(Path("m.safetensors").stat().st_mode & 0o777) == "0o644"
    assert oct(Path("v.safetensors").stat().st_mode & 0o777) == "0o644"


# --- the header is checked before it is believed -------------------------------------------------


def _set(path, value):
    def edit(h):
        node = h
        for p in path[:-1]:
            node = node[p]
        if value is KeyError:
            del node[path[-1]]
        else:
            node[path[-1]] = value

    return edit


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_set(["num_contexts"], 2), "4 labels for 2 contexts"),
        (_set(["tensors", "0.weight", "fan_in"], KeyError), None),
        (_set(["tensors", "0.weight", "fan_in"], 7), "fan_in 7 does not fit shape [48, 16]"),
        (_set(["labels", 1], "model0"), "collide"),
        (_set(["labels"], ["a", "b", "c"]), "3 labels for 4 contexts"),
        (_set(["tensors", "4.weight", "shape"], [4, 47]), "stored shape [4, 4, 48], the header implies [4, 4, 47]"),
        (_set(["tensors", "2.weight", "dtype"], "float16"), "stored dtype float32, the header implies float16"),
        (_set(["tensors", "0.weight", "dtype"], "int64"), "superposed but its dtype is int64"),
        (_set(["format_version"], 1), "format_version 1 but the file says 2"),
        (_set(["kind"], "quantum"), "kind: Value error, 'quantum' is not one of"),
        (_set(["seed"], "0"), "seed: Input should be a valid integer"),
        (_set(["tensors", "0.weight", "reason"], {"a": 1}), "reason: Input should be a valid string"),
        (_set(["inputs", 0, "sha256"], "zz"), "sha256: String should match pattern"),
        (_set(["tensors", "ghost.weight"], {"role": "per_context", "dtype": "float32", "shape": [2]}), "lacks: stacked/ghost.weight"),
    ],
)  # fmt: skip
def test_a_forged_header_gets_one_line_and_exit_5(merged, tmp_path, edit, message):
    rewrite(merged, tmp_path / "bad.safetensors", edit=edit)
    for command in ("info", "extract"):
        args = (
            ["extract", "bad.safetensors", "-c", "all", "-o", "out"]
            if command == "extract"
            else ["info", "bad.safetensors"]
        )
        result = run(*args)
        assert result.exit_code == 5, result.output
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
        if message:
            assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_header_fields_are_ignored_as_the_spec_says(merged, tmp_path):
    rewrite(merged, tmp_path / "new.safetensors", edit=_set(["added_by_a_later_pspctl"], {"x": 1}))
    assert run("extract", "new.safetensors", "-c", "1", "-o", "a.safetensors").exit_code == 0
    assert run("extract", merged, "-c", "1", "-o", "b.safetensors").exit_code == 0
    assert Path("a.safetensors").read_bytes() == Path("b.safetensors").read_bytes()


def test_num_contexts_that_lies_is_caught_by_the_stored_shapes(merged, tmp_path):
    def edit(h):
        h["num_contexts"] = 2
        h["labels"] = h["labels"][:2]
        h["inputs"] = h["inputs"][:2]

    rewrite(merged, tmp_path / "bad.safetensors", edit=edit)
    result = run("extract", "bad.safetensors", "-c", "1", "-o", "m.safetensors")
    assert result.exit_code == 5 and "the header implies [2," in result.stderr


def test_unlisted_tensors_are_refused(merged, tmp_path):
    rewrite(
        merged, tmp_path / "bad.safetensors", tensors_edit=lambda t: t.update({"stacked/x": torch.ones(4)})
    )
    result = run("info", "bad.safetensors")
    assert result.exit_code == 5 and "tensors the header does not list: stacked/x" in result.stderr


def test_a_flipped_bit_in_a_tensor_is_caught_by_its_checksum(merged, tmp_path):
    data = bytearray(merged.read_bytes())
    data[-3] ^= 0x10
    (tmp_path / "bad.safetensors").write_bytes(bytes(data))
    assert run("info", "bad.safetensors").exit_code == 0  # the header is intact
    result = run("extract", "bad.safetensors", "-c", "all", "-o", "out")
    assert result.exit_code == 2 and "does not match its checksum: the file is corrupted" in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_header_edited_without_its_checksum_is_refused(merged, tmp_path):
    rewrite(merged, tmp_path / "bad.safetensors", forge=False, edit=_set(["seed"], 1))
    result = run("info", "bad.safetensors")
    assert result.exit_code == 5 and "does not match its checksum" in result.stderr


def test_files_without_checksums_still_read(merged, tmp_path):
    """Format v1 files written before checksums existed (the golden files are such) read as before."""
    with safe_open(str(merged), "pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    del meta["pspctl.checksums"]
    write_safetensors(tensors, tmp_path / "old.safetensors", meta)
    a = run("extract", "old.safetensors", "-c", "2", "-o", "a.safetensors")
    b = run("extract", merged, "-c", "2", "-o", "b.safetensors")
    assert a.exit_code == b.exit_code == 0
    assert Path("a.safetensors").read_bytes() == Path("b.safetensors").read_bytes()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_fuzzed_files_give_a_clean_error_or_the_same_output(fuzz_original, seed):
    """benchmarks/fuzz_header.py in small: a traceback, exit 1 or a silent difference fails."""
    original, reference, folder = fuzz_original
    family, verdict, detail = fuzz_header.check_one(original, reference, folder, random.Random(seed))
    assert verdict != "FAIL", f"{family}: {detail}"


@pytest.fixture(scope="module")
def fuzz_original(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "case").mkdir()
    original = fuzz_header.make_original(root)
    code, _, reference = fuzz_header.outcome(original, root / "ref")
    assert code == 0
    return original, reference, root / "case"


@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_analyze_never_writes_its_report_over_an_input(merged, flag):
    before = merged.read_bytes()
    os.link(merged, "hard.safetensors")
    result = run("analyze", merged, flag, "hard.safetensors")
    assert result.exit_code == 8 and "output is one of the inputs" in result.stderr
    assert merged.read_bytes() == before


def test_train_refuses_unsafe_labels_before_training(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    task = Path(__file__).resolve().parents[1] / "samples" / "digits_task.py"
    result = run(
        "train", "--task", task, "--contexts", "2", "--labels", "../x,b", "-o", "t.safetensors", "-q"
    )
    assert result.exit_code == 3, result.output
    assert "label '../x'" in result.stderr and not Path("t.safetensors").exists()


def test_merge_and_extract_make_an_outputs_missing_folders(merged):
    result = run("merge", *(f"model{i}.pt" for i in range(4)), "-o", "out/new/w.safetensors", "-q")
    assert result.exit_code == 0, result.output
    result = run("extract", "out/new/w.safetensors", "--context", "2", "-o", "models/2/m.safetensors")
    assert result.exit_code == 0, result.output
    original = torch.load("model2.pt", weights_only=True)
    back = load_file("models/2/m.safetensors")
    assert back.keys() == original.keys()
    assert torch.allclose(back["2.weight"], original["2.weight"])  # per context: exact
    Path("afile").write_text("not a folder")
    result = run("merge", *(f"model{i}.pt" for i in range(4)), "-o", "afile/w.safetensors", "-q")
    assert result.exit_code == 8 and result.output.endswith("afile: is a file, not a directory\n"), (
        result.output
    )


def test_no_output_replaces_a_file_the_command_reads_even_with_force(merged):
    """Side outputs (analyze --json/--plot, tune --metrics, train --metrics) and -o of tune,
    export and extract: never the superposed file, an original (recorded and found), the
    task file, whatever --force says."""
    Path("task.py").write_text(MLP_TASK)
    Path("s").mkdir()
    paths = save_models([mlp(i) for i in range(2)], Path("s"), ".safetensors")
    assert run("merge", *paths, "-o", "s.safetensors", "--superpose", "2.weight", "-q").exit_code == 0
    before = {p: p.read_bytes() for p in [merged, Path("task.py"), *Path().glob("model*.pt"), *paths]}
    attempts = [
        ["analyze", "--task", "task.py", "--json", "model0.pt", "-q"],  # found through the header
        ["analyze", "--task", "task.py", "--json", "task.py", "-q"],
        [
            "tune",
            "--task",
            "task.py",
            "--steps",
            1,
            "-o",
            "t.safetensors",
            "--metrics",
            "w.safetensors",
            "--force",
        ],
        ["tune", "s.safetensors", "--task", "task.py", "--steps", 1, "-o", "s/model1.safetensors", "--force"],
        ["export", "--task", "task.py", "--context", 0, "-o", "task.py", "--force"],
        ["extract", "--context", 2, "-o", "model2.pt", "--force"],  # a lossy copy over the exact model
        [
            "train",
            "--task",
            "task.py",
            "-k",
            2,
            "--steps",
            2,
            "-o",
            "x.safetensors",
            "--metrics",
            "task.py",
            "--force",
        ],
    ]
    for args in attempts:
        result = run(*args)
        assert result.exit_code == 8, (args, result.output)
        assert "output is one of the inputs" in result.output, result.output
    assert {p: p.read_bytes() for p in before} == before
    assert not Path("t.safetensors").exists() and not Path("x.safetensors").exists()
