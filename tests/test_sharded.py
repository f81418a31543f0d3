"""Sharded checkpoints, as Hugging Face saves large models: an index naming each tensor's shard."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pspctl.checkpoints import open_checkpoint
from pspctl.digests import checkpoint_files, sha256_checkpoint
from pspctl.errors import InputError, OutputError
from pspctl.fileformat import SuperposedFile
from pspctl.merge import MergeOptions, merge
from tests.conftest import mlp

INDEX = {"safetensors": "model.safetensors.index.json", "bin": "pytorch_model.bin.index.json"}


def save_sharded(state: dict, folder: Path, fmt: str = "safetensors", shards: int = 2) -> Path:
    """`state` split round-robin over `shards` files in `folder`, with the index beside them."""
    folder.mkdir()
    names = list(state)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.{fmt}"
        part = {n: state[n].contiguous() for n in names[i::shards]}
        if fmt == "safetensors":
            save_file(part, str(folder / shard))
        else:
            torch.save(part, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (folder / INDEX[fmt]).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_sharded_checkpoint_reads_as_the_whole_state_dict(tmp_path, fmt):
    state = mlp(0).state_dict()
    folder = save_sharded(state, tmp_path / "ft-a", fmt)
    for path in (folder, folder / INDEX[fmt]):  # the directory, or its index
        ckpt = open_checkpoint(path)
        assert sorted(ckpt.names) == sorted(state)
        for name, tensor in state.items():
            assert ckpt.infos[name].shape == tuple(tensor.shape)
            assert torch.equal(ckpt[name], tensor)
        assert ckpt.notes == ["2 shards"]
    assert [f.name for f in checkpoint_files(folder)] == [
        INDEX[fmt],
        f"model-00001-of-00002.{fmt}",
        f"model-00002-of-00002.{fmt}",
    ]


def test_merging_sharded_checkpoints_equals_merging_the_single_files(tmp_path):
    states = [mlp(i).state_dict() for i in range(3)]
    folders, files = [], []
    for i, state in enumerate(states):
        folders.append(save_sharded(state, tmp_path / f"ft-{i}", "safetensors" if i % 2 == 0 else "bin"))
        files.append(tmp_path / f"ft-{i}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(files[-1]))
    merge(folders, tmp_path / "sharded.safetensors", MergeOptions(kind="complex"))
    merge(files, tmp_path / "single.safetensors", MergeOptions(kind="complex"))
    sharded, single = (load_file(str(tmp_path / f"{n}.safetensors")) for n in ("sharded", "single"))
    assert sharded.keys() == single.keys()
    assert all(torch.equal(sharded[k], single[k]) for k in single)
    sf = SuperposedFile(tmp_path / "sharded.safetensors")
    assert sf.labels == ["ft-0", "ft-1", "ft-2"]  # the directories' names
    assert [i["sha256"] for i in sf.header.inputs] == [sha256_checkpoint(f) for f in folders]
    for k, state in enumerate(states):
        assert torch.equal(sf.state_dict(k)["0.bias"], state["0.bias"])  # per context: bit-exact


def test_the_digest_covers_every_shard(tmp_path):
    state = mlp(0).state_dict()
    folder = save_sharded(state, tmp_path / "ft", "safetensors")
    before = sha256_checkpoint(folder)
    assert sha256_checkpoint(folder / INDEX["safetensors"]) == before
    changed = load_file(str(folder / "model-00002-of-00002.safetensors"))
    changed = {k: v + 1 for k, v in changed.items()}
    save_file(changed, str(folder / "model-00002-of-00002.safetensors"))
    assert sha256_checkpoint(folder) != before


def test_merge_never_writes_over_a_shard(tmp_path):
    a = save_sharded(mlp(0).state_dict(), tmp_path / "a")
    b = save_sharded(mlp(1).state_dict(), tmp_path / "b")
    shard = a / "model-00001-of-00002.safetensors"
    content = shard.read_bytes()
    with pytest.raises(OutputError, match="output is one of the inputs"):
        merge([a, b], shard, MergeOptions(force=True))
    assert shard.read_bytes() == content


def _break(folder: Path, how: str) -> None:
    index = folder / INDEX["safetensors"]
    data = json.loads(index.read_text())
    if how == "missing shard":
        (folder / "model-00002-of-00002.safetensors").unlink()
    elif how == "tensor not in its shard":
        data["weight_map"]["extra.weight"] = "model-00001-of-00002.safetensors"
    elif how == "shard outside the folder":
        data["weight_map"]["0.weight"] = "../elsewhere.safetensors"
    elif how == "not json":
        index.write_text("{not json")
        return
    index.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (
            "missing shard",
            r"model\.safetensors\.index\.json: shards missing: model-00002-of-00002\.safetensors",
        ),
        (
            "tensor not in its shard",
            r"the index names tensors its shards lack: extra\.weight \(in model-00001",
        ),
        (
            "shard outside the folder",
            r"shard '\.\./elsewhere\.safetensors' of '0\.weight' is not a file name",
        ),
        ("not json", r"model\.safetensors\.index\.json: not a checkpoint index \(JSONDecodeError"),
    ],
)
def test_broken_shard_indexes_are_one_clear_error(tmp_path, how, message):
    folder = save_sharded(mlp(0).state_dict(), tmp_path / "ft")
    _break(folder, how)
    with pytest.raises(InputError, match=message):
        open_checkpoint(folder)


def test_directories_must_name_one_checkpoint(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "README.md").write_text("no weights here")
    with pytest.raises(InputError, match="empty: a directory with no checkpoint; name the file"):
        open_checkpoint(empty)
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.pt", "b.pt"):
        torch.save(mlp(0).state_dict(), two / name)
    with pytest.raises(InputError, match=r"two: a directory with several checkpoints \(a\.pt, b\.pt\)"):
        open_checkpoint(two)
    (two / "b.pt").unlink()
    assert open_checkpoint(two).names == list(mlp(0).state_dict())  # the only one
