"""Writing outputs so that nothing is lost: every file pspctl writes goes through here.

- An output never replaces one of the command's inputs, whatever path names it (a symlink,
  a hard link, `./x` for `x`), even with --force.
- It is written under a temporary name beside the target, `.<name>.<pid>.<random>.pspctl-tmp`,
  and appears by a rename only when complete. Without --force the rename never replaces a file
  that appeared meanwhile (another run): `link` then `unlink`, which fails on an existing name.
- A folder of outputs (`--context all`) is staged whole and moved into place on success, so a
  failure leaves nothing, not even an empty folder. Staging is on the outputs' file system:
  inside the folder if it exists (it may be a mount point), else beside it; missing parent
  folders are made only for the final move. A single file's (or a sharded one's) missing
  parent folders are made before it is written, and removed again if the write fails.
- A move that fails (another file system, say) is an OutputError naming the output, and
  leaves no claim of its name behind.
- Leftovers of killed runs carry the output's name and the dead run's pid; the next write of
  the same output removes them.
- Files follow the umask, like any file the user creates.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import Tensor

from pspctl import interrupts
from pspctl.digests import INDEX_SUFFIX
from pspctl.errors import WRITE_ERRNOS, InputError, OutputError, cannot_write

__all__ = [
    "atomic_path",
    "crc32",
    "index_path",
    "parse_size",
    "refuse_existing",
    "refuse_inputs",
    "staged_folder",
    "write_safetensors",
    "write_safetensors_sharded",
]

TMP_SUFFIX = ".pspctl-tmp"


def refuse_existing(path: str | Path, *, force: bool) -> None:
    """Raise OutputError if `path` exists and `force` is off: check before doing the work."""
    if Path(path).exists() and not force:
        raise OutputError(f"{path}: already exists (pass --force to overwrite)")


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # either does not exist
        return False


def refuse_inputs(output: str | Path, inputs: Iterable[str | Path]) -> None:
    """Raise OutputError if `output` is (by any path) one of `inputs`; --force does not change this."""
    output = Path(output)
    for source in inputs:
        if _same(output, Path(source)):
            raise OutputError(f"{output}: output is one of the inputs ({source}); write it elsewhere")


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}{TMP_SUFFIX}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove leftovers of killed pspctl runs writing `path`; returns what was removed."""
    removed = []
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for item in path.parent.iterdir():
            name = item.name
            if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
                continue
            pid = name[len(prefix) :].split(".")[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink()
                removed.append(item)
    return removed


def _uninterrupted(clean_up: Callable[[Path], None], path: Path) -> None:
    """`clean_up(path)` whatever Ctrl-C comes: one during it is raised after it, and one that
    lands as it starts (before the hold) is raised after it is done again, in full."""
    try:
        with interrupts.held():
            clean_up(path)
    except KeyboardInterrupt:
        clean_up(path)
        raise


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def _staged(path: Path) -> bool:
    """Whether `path` is in a staging folder (`staged_folder`): not an output until that moves."""
    return any(p.name.endswith(TMP_SUFFIX) for p in path.absolute().parents)


def _appeared(path: Path) -> OutputError:
    return OutputError(f"{path}: appeared while pspctl was writing it (another run?); nothing replaced")


def _publish(tmp: Path, path: Path, *, force: bool) -> None:
    """Give `tmp` the name `path`; without `force`, never replace a file that exists by now.

    Raises:
        OutputError: `path` appeared meanwhile, or the move failed (e.g. across file systems).
    """
    try:
        _rename(tmp, path, force=force)
    except OSError as e:
        raise cannot_write(path, e) from e


def _rename(tmp: Path, path: Path, *, force: bool) -> None:
    if force:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise _appeared(path) from None
    except OSError as e:
        if e.errno not in (
            errno.EPERM,
            errno.ENOTSUP,
            errno.EOPNOTSUPP,
            errno.EXDEV,
            errno.EMLINK,
            errno.ENOSYS,
        ):
            raise
        # No hard links here (some network and FAT file systems): claim the name exclusively, then
        # rename over our own empty claim.
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise _appeared(path) from None
        try:
            os.replace(tmp, path)
        except BaseException:  # give the name back: an empty claim would read as an output
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
    else:
        os.unlink(tmp)


def _publish_folder(tmp: Path, path: Path) -> None:
    """Give the folder `tmp` the name `path`, which must not exist (not even with --force):
    claimed by an exclusive mkdir, then replaced by the rename."""
    try:
        os.mkdir(path)
    except FileExistsError:
        raise _appeared(path) from None
    try:
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.rmdir(path)  # our empty claim
        raise cannot_write(path, e) from e


def _check_target(path: Path, *, force: bool, inputs: Sequence[str | Path]) -> None:
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    refuse_inputs(path, inputs)
    refuse_existing(path, force=force)


def earlier_output(path: str | Path) -> list[Path]:
    """The files of an output already at `path`: the file itself, and for a sharded output
    (the Hugging Face layout) its index and the shards the index names."""
    path = Path(path)
    index = index_path(path)
    found = [p for p in (path, index) if p.is_file()]
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
            shards = set()  # not an index we can read: only the index itself is known to be ours
        # Only shards named as this writer names `path`'s (w-00001-of-00003.safetensors): an
        # index is data, and may list any file.
        ours = re.compile(rf"{re.escape(path.stem)}-\d{{5}}-of-\d{{5}}{re.escape(path.suffix)}")
        found += [
            path.parent / s
            for s in sorted(n for n in shards if isinstance(n, str) and ours.fullmatch(n))
            if (path.parent / s).is_file()
        ]
    return found


def refuse_earlier(path: str | Path, *, force: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse a `path` where an output already is, plain or sharded: without `force`, any;
    with it, one that is (part of) an input — a sharded input's index, say, which would be
    left beside the new file for readers to open.

    Raises:
        OutputError: naming the file found, or a parent folder that is a file.
    """
    _existing_parent(Path(path).absolute())  # a parent that is a file: refused before any work
    found = earlier_output(path)
    for p in found:
        refuse_inputs(p, inputs)
    if found and not force:
        raise OutputError(f"{found[0]}: already exists (pass --force to overwrite)")


def _remove_earlier(earlier: Sequence[Path], keep: Sequence[Path], inputs: Sequence[str | Path]) -> None:
    """After a forced write: remove what is left of the output it replaced (the old index and
    shards of a sharded one, the old file of a plain one), so that no reader finds it; never
    one of `inputs`."""
    for p in set(earlier) - set(keep):
        if any(_same(p, Path(i)) for i in inputs):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)


@contextlib.contextmanager
def atomic_path(
    path: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = (), output: bool = True
) -> Iterator[Path]:
    """Yield a temporary path beside `path`; it becomes `path` only if the body succeeds.

    Missing parent folders are made (mkdir -p), and removed again if the body fails.
    `output`: a file the user asked for, named if a Ctrl-C comes as it is moved into place
    (`pspctl.interrupts.written`); not so the trust store, or a file staged in a folder.

    Raises:
        OutputError: `path` is a directory, one of `inputs`, exists without `force` (now or
            when the body is done), or one of its parents is a file.
    """
    path = Path(path)
    _check_target(path, force=force, inputs=inputs)
    refuse_earlier(path, force=force, inputs=inputs)  # a sharded output of the same name counts too
    with _parents_made(path):
        clean_stale(path)
        tmp = _tmp_name(path)
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # 0666 less the umask
            yield tmp
            earlier = earlier_output(path)
            with interrupts.publishing(*([path] if output and not _staged(path) else [])):
                _publish(tmp, path, force=force)
                _remove_earlier(earlier, [path], inputs)
        except OSError as e:  # a full disk, a read-only folder: name the output, not our temp file
            raise _write_error(path, e) from e
        finally:
            _uninterrupted(_unlink, tmp)


@contextlib.contextmanager
def staged_folder(
    folder: str | Path, names: Sequence[str], *, force: bool = False, inputs: Sequence[str | Path] = ()
) -> Iterator[Path]:
    """Yield an empty staging folder on `folder`'s file system; on success its files move into
    `folder` (made if missing, with its missing parents). On failure nothing appears, not even
    `folder`.

    Args:
        names: the files the body will write, checked before any work is done.

    Raises:
        OutputError: `folder` or one of its parents is a file, a target is refused as in
            `atomic_path`, or a move fails.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: is a file; --context all needs a directory")
    for name in names:
        _check_target(folder / name, force=force, inputs=inputs)
    # A checkpoint written into a folder that holds one of the same name in the other layout
    # (model.safetensors beside model.safetensors.index.json and its shards, or shards of
    # another count): refused as existing, or with --force its files are removed after the
    # move, so that no reader finds the old weights beside the new ones.
    unsharded = {folder / _unsharded(n) for n in names}
    for path in sorted(unsharded):
        refuse_earlier(path, force=force, inputs=inputs)
    absolute = folder.resolve()
    # Inside the folder if it exists: beside it may be another file system (a mount point),
    # where no rename reaches. A folder to be made is on the nearest existing one's.
    beside = absolute / names[0] if absolute.is_dir() else _existing_parent(absolute) / absolute.name
    clean_stale(beside)
    staging = _tmp_name(beside)
    try:
        staging.mkdir(mode=0o777)
        yield staging
        with interrupts.publishing(*(folder / n for n in names)):
            _publish_staged(staging, folder, absolute, unsharded, names, force=force, inputs=inputs)
    except OSError as e:  # name the one output, or the folder of several
        raise _write_error(folder / names[0] if len(names) == 1 else folder, e) from e
    finally:
        _uninterrupted(_rmtree, staging)


def _publish_staged(
    staging: Path,
    folder: Path,
    absolute: Path,
    unsharded: Iterable[Path],
    names: Sequence[str],
    *,
    force: bool,
    inputs: Sequence[str | Path],
) -> None:
    if not folder.exists():
        try:
            moved = _rename_folder(staging, absolute)
        except OSError as e:  # another file system, say: one line, exit 8
            raise cannot_write(folder, e) from e
        if moved:
            return
    for item in sorted(staging.iterdir()):  # check all before moving any
        _check_target(folder / item.name, force=force, inputs=inputs)
    earlier = [p for path in sorted(unsharded) for p in earlier_output(path)]
    for item in sorted(staging.iterdir()):
        if item.is_dir():  # a folder of files (an HF model folder per context): claim, then move
            _publish_folder(item, folder / item.name)
        else:
            _publish(item, folder / item.name, force=force)
    _remove_earlier(earlier, [folder / n for n in names], inputs)


def _unsharded(name: str) -> str:
    """The checkpoint name a file of an output belongs to: `w.safetensors` for its index
    `w.safetensors.index.json` and its shards `w-00001-of-00003.safetensors`; else `name`."""
    if name.endswith(INDEX_SUFFIX):
        return name.removesuffix(INDEX_SUFFIX)
    shard = re.fullmatch(r"(.+)-\d{5}-of-\d{5}(\.[^.]+)", name)
    return shard[1] + shard[2] if shard else name


def _existing_parent(path: Path) -> Path:
    """The nearest existing folder above the absolute `path`.

    Raises:
        OutputError: the nearest existing one is a file.
    """
    parent = next(p for p in path.parents if p.exists())  # the root exists
    if not parent.is_dir():
        raise OutputError(f"{parent}: is a file, not a directory")
    return parent


def _rename_folder(staging: Path, folder: Path) -> bool:
    """Move `staging` to the absolute `folder`, making its missing parents (mkdir -p) only now;
    False if `folder` appeared meanwhile (its files are then moved one by one). If the move
    fails, the parents it made are removed again and the OSError raised."""
    try:
        with _parents_made(folder):
            os.rename(staging, folder)
    except OSError:
        if folder.exists():
            return False
        raise
    return True


@contextlib.contextmanager
def _parents_made(path: Path) -> Iterator[None]:
    """Make the missing folders above `path` (mkdir -p); if the body raises, remove those
    made here again (what another run made meanwhile, or filled, stays).

    Raises:
        OutputError: one of them is a file.
    """
    _existing_parent(path.absolute())
    made = []
    try:
        for parent in reversed([p for p in path.parents if not p.exists()]):
            with contextlib.suppress(FileExistsError):  # made meanwhile: not ours to remove
                os.mkdir(parent)
                made.append(parent)
        yield
    except BaseException:
        with interrupts.held():
            for parent in reversed(made):
                with contextlib.suppress(OSError):
                    os.rmdir(parent)
        raise


def _write_error(path: Path, exc: OSError) -> Exception:
    """OutputError naming `path` for a full disk, a read-only folder or a denied write; else `exc`."""
    return cannot_write(path, exc) if exc.errno in WRITE_ERRNOS else exc


# --- safetensors, written by hand -------------------------------------------------------------
# safetensors' own writer keeps the metadata in a Rust HashMap, so the same inputs give
# different bytes each run, and it writes through a temporary file of its own (a nameless
# `.tmpXXXXXX` left by a killed run, mode 0600). The format is small (docs/format.md links its
# spec): an 8-byte little-endian header length, the JSON header, then the raw tensors. We write
# it with sorted keys into our own temporary file, and every file is read back with
# `safetensors.safe_open` (the library remains the only parser).

ST_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}  # fmt: skip


def _raw(tensor: Tensor) -> memoryview:
    """The tensor's bytes in storage order (little-endian on every platform torch runs on)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")  # type: ignore[arg-type]


def crc32(tensor: Tensor) -> str:
    """CRC-32 of a tensor's bytes, as 8 hex digits: detects corruption, not tampering."""
    return f"{zlib.crc32(_raw(tensor)):08x}"


def write_safetensors(
    tensors: Mapping[str, Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write `tensors` to `path` as a safetensors file, byte for byte reproducible.

    Tensors are laid out by decreasing item size then name, so each starts aligned to its
    item size; the JSON header has sorted keys and is padded with spaces to 8 bytes.
    """
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    entries: dict[str, Any] = {}
    offset = 0
    for name in order:
        t = tensors[name]
        if t.dtype not in ST_CODES:
            raise OutputError(f"{name}: dtype {t.dtype} cannot be stored in safetensors")
        size = t.numel() * t.element_size()
        entries[name] = {
            "dtype": ST_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    if metadata:
        entries["__metadata__"] = dict(metadata)
    header = json.dumps(entries, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name in order:
            start = f.tell()
            f.write(_raw(tensors[name]))
            _start_writeback(f, start)
        f.flush()
        os.fsync(f.fileno())


WRITEBACK_MIN = 1 << 22  # bytes: smaller tensors are left to the final fsync


def _start_writeback(f: BinaryIO, start: int) -> None:
    """Start writing to disk the bytes written since `start`, while the next are written, so
    that the final fsync has little left to wait for (0.25 → 0.02 s for 400 MB,
    `benchmarks/merge_speed.py`). On Linux, POSIX_FADV_DONTNEED writes dirty pages back
    without waiting and drops only clean ones: the pages just written stay cached. Elsewhere,
    nothing."""
    end = f.tell()
    if end - start < WRITEBACK_MIN or not hasattr(os, "posix_fadvise"):
        return
    f.flush()
    with contextlib.suppress(OSError):  # advice only: a file system may not take it
        os.posix_fadvise(f.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)


# --- sharded safetensors, the Hugging Face layout -----------------------------------------------
# `name.safetensors` with a size limit becomes `name-00001-of-0000N.safetensors` … and the index
# `name.safetensors.index.json` ({"metadata": {"total_size": …}, "weight_map": {tensor: shard}}),
# all beside each other, published together or not at all.

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS.update({"KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30, "TIB": 1 << 40})


def parse_size(text: str | int) -> int:
    """Bytes from a size such as `2GB`, `500MB`, `5GiB` or `1000000` (decimal units as in
    Hugging Face's `max_shard_size`; `KiB`/`MiB`/`GiB` are binary).

    Raises:
        InputError: not a positive size (a bad argument, exit 2).
    """
    found = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    value, unit = (float(found[1]), found[2] or "") if found else (0.0, "")
    if value * _UNITS[unit] < 1:
        raise InputError(f"--max-shard-size {text!r} is not a size; use e.g. 2GB, 500MB or 5GiB")
    return int(value * _UNITS[unit])


def index_path(path: str | Path) -> Path:
    """Where the index of a sharded `path` goes: `w.safetensors` -> `w.safetensors.index.json`."""
    path = Path(path)
    return path.with_name(path.name + INDEX_SUFFIX)


def shard_name(path: str | Path, i: int, count: int) -> str:
    """The i-th (0-based) of `count` shard names of `path`: `w-00001-of-00003.safetensors`."""
    path = Path(path)
    return f"{path.stem}-{i + 1:05d}-of-{count:05d}{path.suffix}"


def plan_shards(nbytes_of: Mapping[str, int], max_shard_size: int) -> list[list[str]]:
    """Tensor names (with their sizes in bytes) grouped into shards in their given order, each
    shard up to `max_shard_size` bytes (a larger tensor gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in nbytes_of.items():
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_safetensors_sharded(
    tensors: Mapping[str, Tensor],
    path: str | Path,
    metadata: Mapping[str, str] | None = None,
    *,
    max_shard_size: int | str,
    shard_metadata: Callable[[Mapping[str, Tensor]], Mapping[str, str]] | None = None,
    force: bool = False,
    inputs: Sequence[str | Path] = (),
    verify: Callable[[Path], object] | None = None,
) -> list[Path]:
    """Write `tensors` as safetensors shards of at most `max_shard_size` bytes each, plus their
    index, atomically as a whole; or, if they fit in one shard, as one plain file at `path`.

    Args:
        path: the unsharded name, `<dir>/<name>.safetensors`; shards and index go beside it.
        metadata: the `__metadata__` of every shard, and the index's `metadata` (with `total_size`).
        shard_metadata: more metadata for one shard, from its tensors (e.g. their checksums).
        verify: called with the staged index (or file) before anything is published; raises to
            refuse it.

    Returns:
        The files written, the index last.

    Raises:
        OutputError: a target is refused as in `atomic_path`, or the size is not one.
    """
    path = Path(path)
    groups = plan_shards(
        {n: t.numel() * t.element_size() for n, t in tensors.items()}, parse_size(max_shard_size)
    )
    if len(groups) == 1:
        with atomic_path(path, force=force, inputs=inputs) as tmp:
            write_safetensors(tensors, tmp, {**(metadata or {}), **_shard_meta(shard_metadata, tensors)})
            if verify is not None:
                verify(tmp)
        return [path]
    names = [shard_name(path, i, len(groups)) for i in range(len(groups))]
    targets = [path.parent / n for n in [*names, index_path(path).name]]
    for target in targets:
        _check_target(target, force=force, inputs=inputs)
    refuse_earlier(path, force=force, inputs=inputs)  # a plain output, or shards of another count
    with _parents_made(path):  # removed again if anything below fails
        clean_stale(path)
        staging = _tmp_name(path)  # a folder beside the outputs, on their file system
        published: list[Path] = []
        complete = False  # a Ctrl-C held during the moves is raised after them
        try:
            staging.mkdir(mode=0o777)
            weight_map, total = {}, 0
            for name, group in zip(names, groups, strict=True):
                part = {n: tensors[n] for n in group}
                write_safetensors(
                    part, staging / name, {**(metadata or {}), **_shard_meta(shard_metadata, part)}
                )
                weight_map.update(dict.fromkeys(group, name))
                total += sum(t.numel() * t.element_size() for t in part.values())
            index = {
                "metadata": {**(metadata or {}), "total_size": total},
                "weight_map": dict(sorted(weight_map.items())),
            }
            staged_index = staging / targets[-1].name
            with open(staged_index, "w") as f:
                json.dump(index, f, indent=2, sort_keys=True, ensure_ascii=False)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            if verify is not None:
                verify(staged_index)
            for target in targets:  # all checked before any is moved; the index, which readers open, last
                _check_target(target, force=force, inputs=inputs)
            earlier = earlier_output(path)
            with interrupts.publishing(targets[-1]):  # the index names them all
                for target in targets:
                    _publish(staging / target.name, target, force=force)
                    published.append(target)
                _remove_earlier(earlier, targets, inputs)
                complete = True
        except BaseException as e:
            if not force and not complete:  # take back what this run published: all or nothing
                with interrupts.held():
                    for target in published:
                        with contextlib.suppress(OSError):
                            os.unlink(target)
            if isinstance(e, OSError):
                raise _write_error(path, e) from e
            raise
        finally:
            _uninterrupted(_rmtree, staging)
    return targets


def _shard_meta(
    make: Callable[[Mapping[str, Tensor]], Mapping[str, str]] | None, tensors: Mapping[str, Tensor]
) -> Mapping[str, str]:
    return {} if make is None else make(tensors)
