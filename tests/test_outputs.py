"""pspctl.outputs: nothing lost, nothing half-written, nothing replaced that was not asked for."""

from __future__ import annotations

import errno
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load, load_file, save

from pspctl.errors import OutputError
from pspctl.outputs import (
    TMP_SUFFIX,
    atomic_path,
    clean_stale,
    refuse_earlier,
    staged_folder,
    write_safetensors,
    write_safetensors_sharded,
)


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "w.safetensors"
    with pytest.raises(OutputError, match="appeared while pspctl was writing it"), atomic_path(target) as tmp:
        tmp.write_text("ours")
        target.write_text("theirs")  # another run finished first
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # our temp file is gone


def test_without_hard_links_the_name_is_claimed_exclusively(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        tmp.write_text("ours")
    assert target.read_text() == "ours"
    with pytest.raises(OutputError, match="appeared while"), atomic_path(tmp_path / "b.bin") as tmp:
        (tmp_path / "b.bin").write_text("theirs")
    assert (tmp_path / "b.bin").read_text() == "theirs"


def test_force_replaces_but_never_an_input(tmp_path):
    src = tmp_path / "in.bin"
    src.write_text("precious")
    link = tmp_path / "link.bin"
    link.symlink_to(src)
    hard = tmp_path / "hard.bin"
    os.link(src, hard)
    for target in (src, link, hard, tmp_path / "." / "in.bin"):
        with pytest.raises(OutputError, match="output is one of the inputs"):
            atomic_path(target, force=True, inputs=[src]).__enter__()
    assert src.read_text() == "precious"


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.bin") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.bin").stat().st_mode) == 0o644


def test_stale_leftovers_of_dead_runs_are_removed_and_live_ones_kept(tmp_path):
    target = tmp_path / "w.safetensors"
    dead = tmp_path / f".w.safetensors.999999999.abcd{TMP_SUFFIX}"  # no such pid
    live = tmp_path / f".w.safetensors.{os.getppid()}.abcd{TMP_SUFFIX}"
    other = tmp_path / f".x.safetensors.999999999.abcd{TMP_SUFFIX}"
    for p in (dead, live, other):
        p.write_text("partial")
    assert clean_stale(target) == [dead]
    assert live.exists() and other.exists()


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "models"
    with pytest.raises(RuntimeError), staged_folder(out, ["a.bin", "b.bin"]) as staging:
        (staging / "a.bin").write_text("a")
        raise RuntimeError("context 1 failed")
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_into_an_existing_folder_checks_every_name_first(tmp_path):
    out = tmp_path / "models"
    out.mkdir()
    (out / "b.bin").write_text("old b")
    with pytest.raises(OutputError, match="b.bin: already exists"):
        staged_folder(out, ["a.bin", "b.bin"]).__enter__()
    with staged_folder(out, ["a.bin", "b.bin"], force=True) as staging:
        (staging / "a.bin").write_text("a")
        (staging / "b.bin").write_text("b")
    assert sorted(p.name for p in out.iterdir()) == ["a.bin", "b.bin"]
    assert (out / "b.bin").read_text() == "b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def cross_device(*args, **kwargs):
    raise OSError(errno.EXDEV, "Invalid cross-device link")


def test_staging_is_inside_an_existing_folder_which_may_be_a_mount_point(tmp_path):
    out = tmp_path / "models"  # beside it may be another file system, where no rename reaches
    out.mkdir()
    with staged_folder(out, ["a.bin"]) as staging:
        assert staging.parent == out
        (staging / "a.bin").write_text("a")
    assert [p.name for p in out.iterdir()] == ["a.bin"]


@pytest.mark.parametrize("force", [False, True])
def test_a_move_that_fails_is_one_output_error_and_leaves_no_claim(tmp_path, monkeypatch, force):
    out = tmp_path / "models"
    out.mkdir()
    for name in ("link", "replace", "rename"):
        monkeypatch.setattr(os, name, cross_device)
    error = "{}: cannot write: Invalid cross-device link"
    with (
        pytest.raises(OutputError, match=error.format("a.bin")),
        staged_folder(out, ["a.bin"], force=force) as tmp,
    ):
        (tmp / "a.bin").write_text("a")
    with (
        pytest.raises(OutputError, match=error.format("b.bin")),
        atomic_path(out / "b.bin", force=force) as tmp,
    ):
        tmp.write_text("b")
    with pytest.raises(OutputError, match=error.format("hf")), staged_folder(out, ["hf"], force=force) as tmp:
        (tmp / "hf").mkdir()
    assert list(out.iterdir()) == []  # no empty file or folder that a retry would find


def test_missing_parents_are_made_only_for_the_final_move(tmp_path, monkeypatch):
    out = tmp_path / "a" / "b" / "models"
    with pytest.raises(RuntimeError), staged_folder(out, ["x.bin"]):
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []
    with staged_folder(out, ["x.bin"]) as staging:
        assert not (tmp_path / "a").exists()
        (staging / "x.bin").write_text("x")
    assert (out / "x.bin").read_text() == "x"
    monkeypatch.setattr(os, "rename", cross_device)
    with (
        pytest.raises(OutputError, match="c/models: cannot write"),
        staged_folder(tmp_path / "c" / "models", ["x.bin"]),
    ):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # c/, made for the move, is gone


def test_written_safetensors_match_the_library_and_are_reproducible(tmp_path):
    tensors = {
        "b": torch.randn(3, 5, dtype=torch.float64),
        "a": torch.arange(7, dtype=torch.int8),
        "h": torch.randn(2, 3).to(torch.bfloat16),
        "z": torch.zeros(4, 0),
        "s": torch.tensor(3.5),
        "t": torch.randn(6, 4).t(),  # not contiguous
    }
    meta = {"format": "pt", "k2": "2", "k1": "1"}
    write_safetensors(tensors, tmp_path / "x.safetensors", meta)
    write_safetensors(
        dict(reversed(tensors.items())), tmp_path / "y.safetensors", dict(reversed(meta.items()))
    )
    assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "y.safetensors").read_bytes()
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    # The library's own serialisation of the same dict decodes to the same tensors.
    theirs = load(save({k: v.contiguous() for k, v in tensors.items()}, meta))
    assert all(torch.equal(theirs[k], back[k]) and theirs[k].dtype == back[k].dtype for k in tensors)


def test_a_files_missing_parents_are_made_and_removed_again_if_the_write_fails(tmp_path):
    target = tmp_path / "a" / "b" / "x.bin"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("failed")
    assert list(tmp_path.iterdir()) == []  # neither the file nor a/b
    with atomic_path(target) as tmp:
        tmp.write_text("x")
    assert target.read_text() == "x"
    tensors = {f"t{i}": torch.full((256,), float(i)) for i in range(3)}
    with pytest.raises(RuntimeError):  # refused once all shards are staged
        write_safetensors_sharded(
            tensors, tmp_path / "c" / "w.safetensors", max_shard_size=1200, verify=_refuse
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    written = write_safetensors_sharded(tensors, tmp_path / "c" / "w.safetensors", max_shard_size=1200)
    assert len(written) == 4 and all(p.is_file() for p in written)


def test_a_parent_that_is_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "f").write_text("a file")
    with pytest.raises(OutputError, match="f: is a file, not a directory"):
        refuse_earlier(tmp_path / "f" / "sub" / "x.bin", force=True)
    with pytest.raises(OutputError, match="is a file"), atomic_path(tmp_path / "f" / "x.bin"):
        pytest.fail("the body must not run")


def _refuse(path):
    assert path.is_file()
    raise RuntimeError("refused")


def _sharded(folder, count):
    names = [f"w-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for n in names:
        (folder / n).write_text("old shard")
    index = {"metadata": {}, "weight_map": {f"t{i}": n for i, n in enumerate(names)}}
    (folder / "w.safetensors.index.json").write_text(json.dumps(index))
    return names


def test_a_folder_write_replaces_a_checkpoint_in_the_other_layout_whole(tmp_path):
    """Writing w.safetensors into a folder holding w's index and shards (or the reverse):
    refused as existing; with --force the old layout's files go, so no reader finds them."""
    folder = tmp_path / "model"
    folder.mkdir()
    old = _sharded(folder, 2)
    (folder / "config.json").write_text("{}")
    with pytest.raises(OutputError, match="w.safetensors.index.json: already exists"):
        staged_folder(folder, ["w.safetensors"]).__enter__()
    with staged_folder(folder, ["w.safetensors"], force=True) as staging:
        (staging / "w.safetensors").write_text("new")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "w.safetensors"]
    new = [f"w-{i + 1:05d}-of-00003.safetensors" for i in range(3)]
    with staged_folder(folder, [*new, "w.safetensors.index.json"], force=True) as staging:
        for n in new:
            (staging / n).write_text("new shard")
        (staging / "w.safetensors.index.json").write_text("{}")
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["config.json", *new, "w.safetensors.index.json"]
    )
    assert not set(old) & {p.name for p in folder.iterdir()}
