"""Sharded outputs (--max-shard-size): safetensors shards and an index, the Hugging Face layout."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pspctl.checkpoints import open_checkpoint
from pspctl.cli import app
from pspctl.digests import sha256_checkpoint
from pspctl.errors import InputError, OutputError
from pspctl.extract import extract
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from pspctl.outputs import TMP_SUFFIX, parse_size, write_safetensors_sharded
from pspctl.policy import Role
from tests.conftest import mlp

runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "size"),
    [("2GB", 2 * 10**9), ("500MB", 500 * 10**6), ("5GiB", 5 << 30), ("1.5kb", 1500), ("4096", 4096)],
)
def test_sizes_read_as_hugging_face_writes_them(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GB", "-1MB", "2XB", "0"])
def test_a_size_that_is_none_is_refused(text):
    with pytest.raises(InputError, match="is not a size"):
        parse_size(text)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"t{i}": torch.randn(10, 10, generator=g) for i in range(5)}  # 400 bytes each


def test_shards_fill_in_order_up_to_the_size_and_read_back_through_the_index(tmp_path):
    state = tensors()
    written = write_safetensors_sharded(
        state, tmp_path / "m.safetensors", {"format": "pt"}, max_shard_size=900
    )
    names = [f"m-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert [p.name for p in written] == [*names, "m.safetensors.index.json"]
    index = json.loads((tmp_path / "m.safetensors.index.json").read_text())
    assert index["metadata"] == {"format": "pt", "total_size": 2000}
    assert index["weight_map"] == {
        "t0": names[0],
        "t1": names[0],
        "t2": names[1],
        "t3": names[1],
        "t4": names[2],
    }
    ckpt = open_checkpoint(tmp_path)  # the folder, as for a Hugging Face model
    for name, t in state.items():
        assert torch.equal(ckpt[name], t)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*names, "m.safetensors.index.json"])


def test_what_fits_in_one_shard_is_one_plain_file(tmp_path):
    written = write_safetensors_sharded(tensors(), tmp_path / "m.safetensors", max_shard_size="1MB")
    assert written == [tmp_path / "m.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_a_failed_sharded_write_leaves_nothing(tmp_path):
    def refuse(index: Path) -> None:
        raise OutputError("refused")

    with pytest.raises(OutputError, match="refused"):
        write_safetensors_sharded(tensors(), tmp_path / "m.safetensors", max_shard_size=500, verify=refuse)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_shard_is_refused_before_anything_is_written(tmp_path):
    (tmp_path / "m-00002-of-00003.safetensors").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        write_safetensors_sharded(tensors(), tmp_path / "m.safetensors", max_shard_size=900)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-00002-of-00003.safetensors"]
    assert not any(p.name.endswith(TMP_SUFFIX) for p in tmp_path.iterdir())


@pytest.fixture
def merged(mlp_paths, tmp_path) -> tuple[SuperposedFile, Path]:
    """The same merge written whole and sharded (returns the whole one and the sharded index)."""
    whole = tmp_path / "whole" / "w.safetensors"
    whole.parent.mkdir()
    merge(mlp_paths, whole, MergeOptions(base="mean"))
    folder = tmp_path / "sharded"
    folder.mkdir()
    report = merge(mlp_paths, folder / "w.safetensors", MergeOptions(base="mean", max_shard_size=5000))
    assert report.output == str(folder / "w.safetensors.index.json")
    return SuperposedFile(whole), folder


def test_a_sharded_superposed_file_reads_as_the_whole_one(merged):
    whole, folder = merged
    shards = sorted(folder.glob("w-*-of-*.safetensors"))
    assert len(shards) > 2
    for path in (folder, folder / "w.safetensors.index.json"):
        sharded = SuperposedFile(path)
        assert sharded.header.tensors == whole.header.tensors
        assert sharded.nbytes() == sum(p.stat().st_size for p in folder.iterdir())
        for k in range(whole.num_contexts):
            for name, t in whole.state_dict(k).items():
                assert torch.equal(sharded.state_dict(k)[name], t)
    for shard in shards:  # each shard carries the header and its own tensors' checksums
        with safe_open(str(shard), framework="pt") as f:
            meta = f.metadata()
            assert (
                meta["pspctl.header"]
                == json.loads((folder / "w.safetensors.index.json").read_text())["metadata"]["pspctl.header"]
            )
            assert sorted(json.loads(meta["pspctl.checksums"])["tensors"]) == sorted(f.keys())


def test_a_corrupted_shard_is_caught_by_its_checksums(merged):
    _, folder = merged
    shard = sorted(folder.glob("w-*-of-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    file = SuperposedFile(folder)
    with pytest.raises(InputError, match="does not match its checksum"):
        for k in range(file.num_contexts):
            file.state_dict(k)


def test_a_missing_shard_is_named(merged):
    _, folder = merged
    shard = sorted(folder.glob("w-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(InputError, match=f"shard {shard.name} is missing"):
        SuperposedFile(folder)


def test_extract_reads_a_sharded_file_and_writes_sharded_models(merged, tmp_path):
    whole, folder = merged
    written = extract(folder, "all", tmp_path / "out", max_shard_size=3000)
    assert written[-1].name.endswith(".safetensors.index.json")
    for k, label in enumerate(whole.labels):
        ckpt = open_checkpoint(tmp_path / "out" / f"{label}.safetensors.index.json")
        for name, t in whole.state_dict(k).items():
            assert torch.equal(ckpt[name], t)


def test_the_cli_merges_and_reads_back_sharded_files(mlp_paths, tmp_path):
    out = tmp_path / "w.safetensors"
    result = runner.invoke(
        app, ["merge", *map(str, mlp_paths), "-o", str(out), "--max-shard-size", "5KB", "-q"]
    )
    assert result.exit_code == 0, result.output
    index = tmp_path / "w.safetensors.index.json"
    assert index.is_file() and not out.exists()
    result = runner.invoke(app, ["info", str(index)])
    assert result.exit_code == 0, result.output
    assert "3 contexts" in result.output
    one = tmp_path / "one.safetensors"
    result = runner.invoke(app, ["extract", str(index), "-c", "1", "-o", str(one)])
    assert result.exit_code == 0, result.output
    original = open_checkpoint(mlp_paths[1])
    superposed = SuperposedFile(index)
    extracted = open_checkpoint(one)
    for name in original.names:  # per-context tensors come back exact, superposed ones close
        assert torch.equal(extracted[name], superposed.state_dict(1)[name])
    result = runner.invoke(app, ["merge", *map(str, mlp_paths), "-o", str(out), "--max-shard-size", "5KB"])
    assert result.exit_code != 0 and "already exists" in result.output
    result = runner.invoke(app, ["merge", *map(str, mlp_paths), "-o", str(out), "--max-shard-size", "lots"])
    assert result.exit_code != 0 and "is not a size" in result.output


def test_nn_load_reads_a_sharded_file(merged):
    from pspctl.nn import load

    whole, folder = merged
    model = load(folder, mlp(0))
    reference = load(whole.path, mlp(0))
    x = torch.randn(2, 16)
    for k in range(whole.num_contexts):
        model.set_context(k)
        reference.set_context(k)
        assert torch.equal(model(x), reference(x))


def test_tune_reads_and_writes_sharded_files(tmp_path, monkeypatch):
    from tests.test_training import _all, make_originals, write_task

    monkeypatch.chdir(tmp_path)
    task = write_task(tmp_path)
    paths = make_originals(tmp_path, task)
    (tmp_path / "in").mkdir()
    merge(
        paths,
        "in/w.safetensors",
        MergeOptions(base="none", task=str(task), policy=_all(), max_shard_size=2000),
    )
    args = ["tune", "in", "--steps", "2", "-o", "out/t.safetensors", "--max-shard-size", "200", "-q"]
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    tuned, merged = SuperposedFile("out"), SuperposedFile("in")
    assert len(tuned.files) > 2 and tuned.header.history[-1]["step"] == "tune"
    assert tuned.header.history[-1]["input_sha256"] == sha256_checkpoint(merged.path)
    assert tuned.header.tensors.keys() == merged.header.tensors.keys()
    changed = [n for n in tuned.names() if not torch.equal(tuned.stacked(n) if n not in tuned.names(
        Role.SUPERPOSED) else tuned.superposed(n), merged.stacked(n) if n not in merged.names(Role.SUPERPOSED)
        else merged.superposed(n))]  # fmt: skip
    assert changed  # it trained


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_forced_write_leaves_nothing_of_the_output_it_replaced(tmp_path):
    """3 shards → 2 shards → one plain file → 3 shards again, each with --force: what is left
    is exactly the last output, so no reader finds an old index or an old plain file first."""
    state, path = tensors(), tmp_path / "m.safetensors"
    write_safetensors_sharded(state, path, {"format": "pt"}, max_shard_size=900)
    assert len(_files(tmp_path)) == 4
    written = write_safetensors_sharded(state, path, {"format": "pt"}, max_shard_size=1300, force=True)
    assert _files(tmp_path) == sorted(p.name for p in written) and len(written) == 3
    write_safetensors_sharded(state, path, {"format": "pt"}, max_shard_size=10**6, force=True)
    assert _files(tmp_path) == ["m.safetensors"]
    written = write_safetensors_sharded(state, path, {"format": "pt"}, max_shard_size=900, force=True)
    assert _files(tmp_path) == sorted(p.name for p in written) and len(written) == 4
    reread = open_checkpoint(path.with_name("m.safetensors.index.json"))
    assert all(torch.equal(reread[n], t) for n, t in state.items())


def test_an_output_of_the_other_form_is_refused_without_force(tmp_path):
    """A plain file where a sharded one would go, or the reverse, is an existing output too."""
    state, path = tensors(), tmp_path / "m.safetensors"
    write_safetensors_sharded(state, path, {"format": "pt"}, max_shard_size=10**6)
    with pytest.raises(OutputError, match=r"m\.safetensors: already exists"):
        write_safetensors_sharded(state, path, {"format": "pt"}, max_shard_size=900)
    assert _files(tmp_path) == ["m.safetensors"]
    (tmp_path / "b").mkdir()
    other = tmp_path / "b" / "m.safetensors"
    write_safetensors_sharded(state, other, {"format": "pt"}, max_shard_size=900)
    before = _files(other.parent)
    with pytest.raises(OutputError, match=r"index\.json: already exists"):
        write_safetensors_sharded(state, other, {"format": "pt"}, max_shard_size=10**6)
    assert _files(other.parent) == before


def test_merge_over_a_sharded_merge_with_force_leaves_one_file_that_reads(mlp_paths, tmp_path):
    out = tmp_path / "w.safetensors"
    merge(mlp_paths, out, MergeOptions(base="none", max_shard_size=20_000))
    assert (tmp_path / "w.safetensors.index.json").exists()
    with pytest.raises(OutputError, match="already exists"):
        merge(mlp_paths, out, MergeOptions(base="none", kind="complex"))
    merge(mlp_paths, out, MergeOptions(base="none", kind="complex", force=True))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("w")] == ["w.safetensors"]
    assert SuperposedFile(tmp_path).kind.value == "complex"  # the folder's one file, not a stale index


def test_tune_names_its_default_output_after_the_superposed_file(tmp_path):
    from pspctl.training import default_output

    (tmp_path / "w.safetensors").write_bytes(b"")
    assert default_output(tmp_path / "w.safetensors") == tmp_path / "w.tuned.safetensors"
    sharded = tmp_path / "s"
    sharded.mkdir()
    (sharded / "m.safetensors.index.json").write_text("{}")
    assert default_output(sharded / "m.safetensors.index.json") == sharded / "m.tuned.safetensors"
    # a folder: beside it, not inside (a second file there would make the folder ambiguous)
    assert default_output(sharded) == tmp_path / "s.tuned.safetensors"


def test_a_forced_write_removes_only_shards_named_as_its_own(tmp_path):
    """An index is data: a forced write over one that lists other files (a user's, one outside
    the folder) deletes none of them, only `m-NNNNN-of-NNNNN.safetensors` shards; and one
    whose listed shard is an input is refused even with --force, nothing touched."""
    state, path = tensors(), tmp_path / "m.safetensors"
    (tmp_path / "mine.txt").write_text("keep me")
    (tmp_path / "m-00001-of-00002.safetensors").write_text("an old shard")
    index = {
        "metadata": {},
        "weight_map": {"a": "mine.txt", "b": "../outside", "c": "m-00001-of-00002.safetensors"},
    }
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps(index))
    before = _files(tmp_path)
    with pytest.raises(OutputError, match="one of the inputs"):
        write_safetensors_sharded(
            state, path, {"format": "pt"}, max_shard_size=10**6, force=True,
            inputs=[tmp_path / "m-00001-of-00002.safetensors"],
        )  # fmt: skip
    assert _files(tmp_path) == before
    write_safetensors_sharded(state, path, {"format": "pt"}, max_shard_size=10**6, force=True)
    assert _files(tmp_path) == ["m.safetensors", "mine.txt"]
    assert (tmp_path / "mine.txt").read_text() == "keep me"


def test_merge_into_a_sharded_input_s_place_is_refused_even_with_force(tmp_path):
    """-o where a sharded input's index is: writing a plain file beside the input's index would
    leave readers of that folder the input, not the merge (and the index is not ours to delete)."""
    states = [mlp(i).state_dict() for i in range(3)]
    folder = tmp_path / "ft0"
    folder.mkdir()
    write_safetensors_sharded(
        states[0], folder / "model.safetensors", {"format": "pt"}, max_shard_size=20_000
    )
    others = []
    for k in (1, 2):
        torch.save(states[k], tmp_path / f"m{k}.pt")
        others.append(tmp_path / f"m{k}.pt")
    before = _files(folder)
    with pytest.raises(OutputError, match="one of the inputs"):
        merge([folder, *others], folder / "model.safetensors", MergeOptions(base="none", force=True))
    assert _files(folder) == before
