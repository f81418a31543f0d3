import pytest
import torch
from safetensors.torch import save_file

from pspctl.checkpoints import open_checkpoint, save_state_dict
from pspctl.errors import InputError, OutputError, UnsafeCheckpointError


def test_nested_and_wrapped_state_dicts_are_unwrapped(tmp_path):
    sd = {"module.a.weight": torch.ones(2, 2), "module.a.bias": torch.zeros(2)}
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "x.pt")
    ckpt = open_checkpoint(tmp_path / "x.pt")
    assert ckpt.names == ["a.weight", "a.bias"]
    assert torch.equal(ckpt["a.weight"], torch.ones(2, 2))
    assert ckpt.notes == ["unwrapped 'state_dict'", "stripped prefix 'module.'"]
    torch.save({"model": {"_orig_mod.w": torch.ones(1)}}, tmp_path / "y.pth")
    assert open_checkpoint(tmp_path / "y.pth").names == ["w"]
    # The PyTorch tutorials' layout, and DeepSpeed's model states.
    for key in ("model_state_dict", "module"):
        torch.save({key: {"w": torch.ones(1)}, "optimizer_state_dict": {}, "epoch": 3}, tmp_path / "z.pt")
        ckpt = open_checkpoint(tmp_path / "z.pt")
        assert ckpt.names == ["w"] and ckpt.notes == [f"unwrapped '{key}'"]


def test_safetensors_are_read_lazily_with_shapes_up_front(tmp_path):
    save_file({"w": torch.randn(3, 4).half(), "n": torch.tensor([5])}, str(tmp_path / "m.safetensors"))
    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    assert ckpt.infos["w"].shape == (3, 4) and ckpt.infos["w"].dtype == "float16"
    assert ckpt.infos["n"].dtype == "int64"
    assert ckpt["w"].dtype == torch.float16


def save_as_if_on_gpu(state: dict, path) -> None:
    """torch.save with every storage tagged "cuda:0", as a checkpoint saved from a GPU is."""
    import torch.serialization as ser

    ser.register_package(-1000, lambda storage: "cuda:0", lambda obj, location: None)
    try:
        torch.save(state, path)
    finally:
        ser._package_registry[:] = [p for p in ser._package_registry if p[0] != -1000]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading on a machine without CUDA")
def test_checkpoints_saved_on_a_gpu_load_and_merge_on_cpu(tmp_path):
    from pspctl.fileformat import SuperposedFile
    from pspctl.merge import MergeOptions, merge

    states = [torch.nn.Linear(64, 8).state_dict() for _ in range(2)]
    for i, state in enumerate(states):
        save_as_if_on_gpu(state, tmp_path / f"m{i}.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # the tag is real: torch alone refuses it here
        torch.load(tmp_path / "m0.pt", weights_only=True)
    merge([tmp_path / "m0.pt", tmp_path / "m1.pt"], tmp_path / "w.safetensors", MergeOptions())
    for i, state in enumerate(states):
        got = SuperposedFile(tmp_path / "w.safetensors").state_dict(i)
        assert torch.equal(got["bias"], state["bias"])  # kept per context: exact
        assert got["weight"].device.type == "cpu" and got["weight"].shape == (8, 64)


class Exploit:
    def __reduce__(self):
        import os

        return (os.system, ("touch EXPLOITED",))


def test_malicious_pickle_never_executes_without_trust(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"w": torch.ones(1), "evil": Exploit()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="execute pickled code"):
        open_checkpoint(tmp_path / "evil.pt")
    assert not (tmp_path / "EXPLOITED").exists()
    # Legacy (non-zip) pickles take the same path.
    torch.save({"evil": Exploit()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    with pytest.raises(UnsafeCheckpointError):
        open_checkpoint(tmp_path / "legacy.pt")
    assert not (tmp_path / "EXPLOITED").exists()


def test_pickled_module_needs_trust_pickle(tmp_path):
    model = torch.nn.Linear(3, 2)
    torch.save(model, tmp_path / "m.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"torch\.nn\.modules\.linear\.Linear.*--trust-pickle"):
        open_checkpoint(tmp_path / "m.pt")
    ckpt = open_checkpoint(tmp_path / "m.pt", trust_pickle=True)
    assert torch.equal(ckpt["weight"], model.weight.detach())


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("junk.pt", b"hello, not a checkpoint", "not a PyTorch checkpoint"),
        ("junk.safetensors", b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}", "not a readable safetensors"),
        ("notes.txt", b"text", "unknown checkpoint type"),
    ],
)
def test_non_checkpoints_are_refused(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(InputError, match=message):
        open_checkpoint(tmp_path / name)


def test_truncated_files_are_refused(tmp_path):
    save_file({"w": torch.randn(64, 64)}, str(tmp_path / "t.safetensors"))
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "t.pt")
    for name in ("t.safetensors", "t.pt"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
        with pytest.raises(InputError, match="truncated|not a readable"):
            open_checkpoint(tmp_path / name)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        open_checkpoint(tmp_path / "nope.pt")


def test_non_state_dict_pickle_is_refused(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(InputError, match="no state_dict"):
        open_checkpoint(tmp_path / "list.pt")
    torch.save({"a": 1, "w": torch.ones(1)}, tmp_path / "d.pt")
    with pytest.raises(InputError, match="not tensors"):
        open_checkpoint(tmp_path / "d.pt")


def test_save_is_atomic_and_refuses_overwrite(tmp_path):
    sd = {"w": torch.ones(2)}
    save_state_dict(sd, tmp_path / "o.safetensors")
    with pytest.raises(OutputError, match="already exists"):
        save_state_dict(sd, tmp_path / "o.safetensors")
    save_state_dict({"w": torch.zeros(2)}, tmp_path / "o.safetensors", force=True)
    assert torch.equal(open_checkpoint(tmp_path / "o.safetensors")["w"], torch.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.safetensors"]  # no temp files left
    (tmp_path / "models").mkdir()
    for name in ("models", "o.npz"):
        with pytest.raises(
            OutputError, match="is a directory" if name == "models" else "unknown output type"
        ):
            save_state_dict(sd, tmp_path / name, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "o.safetensors"]


@pytest.mark.parametrize("size", [0, 5, (1 << 12) * 3 + 17])
def test_sha256_file_hashes_through_mapped_windows_or_by_reading(tmp_path, monkeypatch, size):
    import hashlib
    import mmap

    from pspctl.digests import sha256_file

    data = bytes(range(256)) * (size // 256) + bytes(size % 256)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    expected = hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk=1 << 12) == expected  # several windows, the last one partial

    def unmappable(*args, **kwargs):
        raise OSError("mmap: not supported here")

    monkeypatch.setattr(mmap, "mmap", unmappable)
    assert sha256_file(path, chunk=1 << 12) == expected
