"""Where a checkpoint's files are, and their sha256. Standard library only.

Free of torch so that the command line can start hashing a merge's inputs as soon as it has
parsed them, on the other core, while torch is imported (1.4 s on the CI machine): `prefetch`
starts the digests, and `sha256_file` takes a prefetched one when the file has not changed
since (same inode, size and modification time), else hashes it then.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path

from pspctl.errors import InputError, listed

__all__ = [
    "DIRECTORY_NAMES",
    "INDEX_SUFFIX",
    "PICKLE_SUFFIXES",
    "SUFFIXES",
    "TIMM_SUFFIX",
    "checkpoint_files",
    "forget_prefetched",
    "prefetch",
    "resolve",
    "sha256_checkpoint",
    "sha256_file",
    "shard_map",
]

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt"}
SUFFIXES = PICKLE_SUFFIXES | {".safetensors"}  # of a plain (unsharded) checkpoint file
TIMM_SUFFIX = ".pth.tar"  # timm's training checkpoints: a torch.save'd dict, despite the name
INDEX_SUFFIX = ".index.json"
# What a directory holds, in the order they are looked for (the Hugging Face names).
DIRECTORY_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
PREFETCH_WINDOW = 1 << 24  # bytes hashed per GIL release while the main thread imports torch


def _is_checkpoint_name(path: Path) -> bool:
    return path.suffix in SUFFIXES or path.name.endswith((INDEX_SUFFIX, TIMM_SUFFIX))


def resolve(path: str | Path) -> Path:
    """The file a checkpoint path names: the path itself, or for a directory the first of
    DIRECTORY_NAMES in it, else its only shard index, else its only checkpoint file.

    Raises:
        InputError: no such path, or a directory with no checkpoint or several.
    """
    path = Path(path)
    if path.is_dir():
        for name in DIRECTORY_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(p.name for p in path.iterdir() if p.is_file() and _is_checkpoint_name(p))
        indexes = [n for n in found if n.endswith(INDEX_SUFFIX)]  # e.g. `--max-shard-size` output
        if len(found) == 1 or len(indexes) == 1:
            return path / (indexes or found)[0]
        what = f"several checkpoints ({listed(found)})" if found else "no checkpoint"
        raise InputError(f"{path}: a directory with {what}; name the file")
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path


def shard_map(index: Path) -> dict[str, Path]:
    """A sharded checkpoint's weight_map: tensor name -> shard path, beside the index."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise TypeError("weight_map is not a non-empty object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{index}: not a checkpoint index ({type(e).__name__}: {e})") from None
    shards = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise InputError(f"{index}: shard {shard!r} of {name!r} is not a file name beside the index")
        shards[name] = index.parent / shard
    missing = sorted({p.name for p in shards.values() if not p.is_file()})
    if missing:
        raise InputError(f"{index}: shards missing: {listed(missing)}")
    return shards


def checkpoint_files(path: str | Path) -> list[Path]:
    """Every file the checkpoint at `path` is read from: the file, or the index and its shards."""
    file = resolve(path)
    if file.name.endswith(INDEX_SUFFIX):
        return [file, *sorted(set(shard_map(file).values()))]
    return [file]


def sha256_checkpoint(path: str | Path) -> str:
    """sha256 of a checkpoint file; for a sharded one, of its files' names and sha256s in order."""
    files = checkpoint_files(path)
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    return digest.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file: the one `prefetch` computed if the file is unchanged since (same
    inode, size, modification and change times), else computed now (`_hash_file`)."""
    try:
        key, stamp = _identity(path)
    except OSError:
        return _hash_file(path, chunk)  # raises the OSError where the caller expects it
    with _LOCK:
        entry = _PREFETCHED.pop(key, None)  # used once: a later call hashes afresh
    if entry is not None and entry[0] == stamp:
        try:
            return entry[1].result()
        except OSError:
            pass  # hashed again below, to raise here
    return _hash_file(path, chunk)


def _hash_file(path: Path, chunk: int) -> str:
    """sha256 of a file, read through memory-mapped windows of `chunk` bytes: hashed where the
    page cache holds it, with no copy (0.2 s instead of 0.23 s for 210 MB), and at most one
    window resident at a time. A file that cannot be mapped is read."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            for offset in range(0, size, chunk):
                length = min(chunk, size - offset)
                with mmap.mmap(f.fileno(), length, access=mmap.ACCESS_READ, offset=offset) as window:
                    digest.update(window)
        except (OSError, ValueError):  # not mappable (a pipe, some network file systems): read it
            digest = hashlib.sha256()
            f.seek(0)
            while block := f.read(chunk):
                digest.update(block)
    return digest.hexdigest()


Stamp = tuple[int, int, int, int]
_PREFETCHED: dict[str, tuple[Stamp, Future[str]]] = {}
_LOCK = threading.Lock()


def _identity(path: Path) -> tuple[str, Stamp]:
    st = os.stat(path)
    return os.path.realpath(path), (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def prefetch(paths: Iterable[str | Path]) -> None:
    """Start hashing the files of these checkpoints in a background thread, for `sha256_file`
    to take when the command asks. A daemon thread: a command that fails early does not wait
    for it. Paths that name no checkpoint are skipped (the command says so itself)."""
    todo: list[tuple[Path, Future[str]]] = []
    for path in paths:
        try:
            files = checkpoint_files(path)
        except (InputError, OSError):
            continue
        for file in files:
            try:
                key, stamp = _identity(file)
            except OSError:
                continue
            with _LOCK:
                if key not in _PREFETCHED:
                    _PREFETCHED[key] = (stamp, Future())
                    todo.append((file, _PREFETCHED[key][1]))
    if todo:
        threading.Thread(target=_hash_all, args=(todo,), name="pspctl-prefetch", daemon=True).start()


def _hash_all(todo: list[tuple[Path, Future[str]]]) -> None:
    for file, future in todo:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(_hash_file(file, PREFETCH_WINDOW))
            except BaseException as e:  # noqa: BLE001  handed to whoever asks for the digest
                future.set_exception(e)


def forget_prefetched() -> None:
    """Drop the digests nobody took (a command that ended early), so that a later command in
    the same process cannot take one whose file changed within the timestamps' resolution."""
    with _LOCK:
        _PREFETCHED.clear()


def record_path(path: str | Path, output: str | Path) -> str:
    """How a file records another it was made from: an absolute path as given, a relative one
    relative to the recording file's folder, so that the two can move together and be read
    from any working directory (`candidates`)."""
    p = Path(path)
    return str(p) if p.is_absolute() else _relative(p, output)


def record_task(spec: str | Path | None, output: str | Path) -> str | None:
    """A task as a file records it: a `.py` file as `record_path` says, a module name as given."""
    if spec is None or not str(spec).endswith(".py"):
        return None if spec is None else str(spec)
    return record_path(spec, output)


def _relative(path: Path, output: str | Path) -> str:
    return os.path.relpath(path.absolute(), Path(output).absolute().parent)


def candidates(recorded: str, beside: Path) -> list[Path]:
    """Where a recorded path may be now: relative to the recording file's folder `beside`
    (`record_path`), as recorded (earlier files recorded it relative to the working directory
    of the merge), then its basename beside the file."""
    p = Path(recorded)
    out = [p] if p.is_absolute() else [beside / p, p]
    out.append(beside / p.name)
    return list(dict.fromkeys(out))


def locate(recorded: str, beside: Path) -> Path | None:
    """The first of `candidates` that exists, or None."""
    return next((p for p in candidates(recorded, beside) if p.exists()), None)


def rebase(recorded: str, old: Path, new: str | Path) -> str:
    """A path `old` recorded, as `new` records it (a file made from `old`, e.g. by tune): where
    it is found now (`candidates`), recorded for `new`; as it was if it is not found."""
    found = locate(recorded, old.parent)
    return recorded if found is None or Path(recorded).is_absolute() else _relative(found, new)
