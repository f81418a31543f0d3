"""The superposed file: one `.safetensors` with a versioned pspctl header. See docs/format.md.

Tensor names in the file, for an original tensor `name`:
    superposed/<name>  the superposed weight (complex kinds: real and imaginary parts stacked last)
    stacked/<name>     a per-context tensor, the K originals stacked on a new dim 0
    contexts/<name>    the contexts of a superposed tensor, in `ContextSet.stored()` form
"""

from __future__ import annotations

import contextlib
import copy
import json
import operator
import weakref
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pspctl.checkpoints import ST_DTYPES, Checkpoint, checkpoint_names, open_checkpoint
from pspctl.contexts import ContextSet, Kind
from pspctl.digests import INDEX_SUFFIX, PICKLE_SUFFIXES, locate, sha256_checkpoint
from pspctl.dtypes import torch_dtype
from pspctl.errors import ContextError, FormatError, InputError, MismatchError, OutputError
from pspctl.header import (
    BASE,
    CONTEXTS,
    FILES,
    FORMAT_VERSION,
    SHARED,
    STACKED,
    SUPERPOSED,
    Header,
    TensorMeta,
    check_header,
    check_tensors,
    needed_version,
    parse_header,
    stored_names,
)
from pspctl.outputs import (
    atomic_path,
    crc32,
    refuse_earlier,
    write_safetensors,
    write_safetensors_sharded,
)
from pspctl.policy import Role
from pspctl.superpose import unbind

__all__ = [
    "FORMAT_VERSION",
    "Header",
    "SuperposedFile",
    "SuperposedWriter",
    "open_superposed",
    "TensorMeta",
    "check_output",
    "pack",
    "write_superposed",
]

FORMAT_NAME = "pspctl"
CHECKSUMS = "pspctl.checksums"  # metadata key: CRC-32 of the header text and of every tensor
READS = {str(v) for v in range(1, FORMAT_VERSION + 1)}  # the format versions this pspctl reads
METADATA_KEYS = {"format", "pspctl.format_version", "pspctl.header", CHECKSUMS}


def pack(superposed: Tensor, dtype: torch.dtype) -> Tensor:
    """The stored form of a superposed tensor: complex becomes a trailing (real, imag) pair."""
    if superposed.is_complex():
        superposed = torch.view_as_real(superposed)
    return superposed.to(dtype).contiguous()


def check_output(path: str | Path, *, force: bool, inputs: Sequence[str | Path] = ()) -> None:
    """Refuse, before any work, an output path a superposed file must not be written to.

    Raises:
        OutputError: the name does not end in .safetensors, or an output is there already
            (the file, or a sharded one's index), without `force`; or one that is part of
            `inputs`, even with it.
    """
    _check_name(Path(path))
    refuse_earlier(path, force=force, inputs=inputs)


def _check_name(path: Path) -> None:
    if path.suffix != ".safetensors":
        raise OutputError(f"{path}: a superposed file is a safetensors file; name it *.safetensors")


def write_superposed(
    path: Path,
    tensors: Mapping[str, Tensor],
    header: Header,
    *,
    force: bool = False,
    inputs: Sequence[str | Path] = (),
    crcs: Mapping[str, str] | None = None,
    max_shard_size: int | str | None = None,
) -> list[Path]:
    """Write tensors (already named superposed/…, stacked/…, contexts/…) and header atomically.

    The same tensors and header give the same bytes. `inputs` are files the output must not be.
    `crcs`: the tensors' CRC-32s if already computed (`crc32` of each), else computed here.
    `max_shard_size`: write shards of at most this size and their index (the Hugging Face
    layout, `outputs.write_safetensors_sharded`); each shard carries the header and the
    checksums of its own tensors, the index the header. Returns the files written.
    """
    from pspctl import __version__

    header.pspctl_version = header.pspctl_version or __version__
    header.format_version = needed_version(header)
    text = header.to_json()
    sums = {n: crc32(t) if crcs is None else crcs[n] for n, t in sorted(tensors.items())}
    metadata = {
        "format": FORMAT_NAME,
        "pspctl.format_version": str(header.format_version),
        "pspctl.header": text,
    }

    def checksummed(part: Mapping[str, Tensor]) -> dict[str, str]:
        checksums = {"header": _crc_text(text), "tensors": {n: sums[n] for n in sorted(part)}}
        return {CHECKSUMS: json.dumps(checksums, sort_keys=True, separators=(",", ":"))}

    _check_name(path)  # atomic_path refuses an existing file
    if max_shard_size is not None:
        return write_safetensors_sharded(
            tensors, path, metadata, max_shard_size=max_shard_size, shard_metadata=checksummed,
            force=force, inputs=inputs, verify=SuperposedFile,
        )  # fmt: skip
    metadata.update(checksummed(tensors))
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        write_safetensors(tensors, tmp, metadata)
        # Write, then verify the header, the records and the tensor list, as any reader will. The
        # tensors' bytes are not read back: their CRCs were taken from the very buffers written
        # (a re-read would come from the page cache, not the disk), and every read checks them.
        SuperposedFile(tmp)
    return [path]


def _crc_text(text: str) -> str:
    return f"{zlib.crc32(text.encode()):08x}"


def _checksums(path: Path, meta: Mapping[str, str]) -> dict[str, str]:
    """The per-tensor checksums, after checking the header's; {} for files written without them."""
    if CHECKSUMS not in meta:
        return {}
    try:
        sums = json.loads(meta[CHECKSUMS])
        header_sum, tensor_sums = sums["header"], sums["tensors"]
        if not isinstance(header_sum, str) or not isinstance(tensor_sums, dict):
            raise TypeError("not a {header, tensors} object")
    except (ValueError, KeyError, TypeError) as e:
        raise FormatError(f"{path}: corrupt {CHECKSUMS} entry ({e})") from None
    if header_sum != _crc_text(meta["pspctl.header"]):
        raise FormatError(
            f"{path}: the pspctl header does not match its checksum: the file was corrupted or edited"
        )
    return {str(k): str(v) for k, v in tensor_sums.items()}


class _Stored:
    """Reading a superposed file's tensors back, for the file on disk and for one being written.

    Subclasses give `kind`, `num_contexts`, `metas` and `raw(stored name)`; everything else,
    model k's tensors above all, is computed here once for both.
    """

    kind: Kind
    num_contexts: int
    metas: dict[str, TensorMeta]
    _last: tuple[str, Tensor, ContextSet] | None = None  # the last superposed tensor read

    def raw(self, stored_name: str) -> Tensor:
        raise NotImplementedError

    def names(self, role: Role | None = None) -> list[str]:
        """Original tensor names in their original order, optionally of one role."""
        return [n for n, m in self.metas.items() if role is None or m.role == role]

    def shapes(self) -> dict[str, list[int]]:
        """The original shape of every tensor, by name, tied aliases included."""
        out = {name: meta.shape for name, meta in self.metas.items()}
        out.update({alias: self.metas[name].shape for alias, name in self.tied.items()})
        return out

    tied: dict[str, str] = {}  # noqa: RUF012  (format v2) alias -> the stored tensor it shares

    def contexts(self, name: str) -> ContextSet:
        return self._superposed_and_contexts(name)[1]

    def superposed(self, name: str) -> Tensor:
        """The superposed tensor in float32 (complex64 for the complex kinds), original shape."""
        return self._superposed_and_contexts(name)[0]

    def _superposed_and_contexts(self, name: str) -> tuple[Tensor, ContextSet]:
        # Kept for the next call: analysis and nn read one tensor's K views in a row.
        if self._last is None or self._last[0] != name:
            stored = self.raw(SUPERPOSED + name).float()
            value = torch.view_as_complex(stored) if self.kind.is_complex else stored
            ctx = ContextSet.from_stored(
                self.kind, self.num_contexts, self.metas[name].fan_in, self.raw(CONTEXTS + name)
            )
            self._last = (name, value, ctx)
        return self._last[1], self._last[2]

    def stacked(self, name: str) -> Tensor:
        """The K per-context tensors of `name`, stacked on dim 0 (a shared one K times, as a view)."""
        if self.metas[name].role == Role.SHARED:
            one = self.raw(SHARED + name)
            return one.unsqueeze(0).expand(self.num_contexts, *one.shape)
        return self.raw(STACKED + name)

    def base(self, name: str) -> Tensor | None:
        """The base a superposed tensor is centred on (original dtype), or None if it is not."""
        return self.raw(BASE + name) if self.metas[name].centred else None

    def retrieve(
        self, name: str, k: int, *, superposed: Tensor | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Model k's tensor, in its original dtype: exact for per-context and shared tensors,
        B + Ŵ_k for centred ones (Ŵ_k retrieved from the superposed deltas), Ŵ_k otherwise.

        Args:
            superposed: use this in place of the stored superposed tensor (e.g. pruned).
            dtype: retrieve in this dtype, and return it (not rounded to the original dtype:
                what a graph computing in float32 retrieves from half-precision storage).
        """
        meta = self.metas[name]
        if meta.role == Role.SHARED:
            return self.raw(SHARED + name).clone()
        if meta.role != Role.SUPERPOSED:
            return self.stacked(name)[k].clone()
        value = self.superposed(name) if superposed is None else superposed
        base = self.base(name)
        if dtype is not None:
            value, base = value.to(dtype), None if base is None else base.to(dtype)
        weight = unbind(value, self.contexts(name), k, meta.fan_in_axis, base=base)
        return weight.to(dtype or torch_dtype(meta.dtype))

    def stored_bytes(self, name: str) -> int:
        """Bytes the file spends on original tensor `name` (a linked base costs none)."""
        return sum(self.raw(n).nbytes for n in stored_names(name, self.metas[name], linked=self.linked))

    linked = False  # whether the base is linked rather than stored


class SuperposedWriter(_Stored):
    """A superposed file being built in memory: the only code that knows the stored names and
    packing. `retrieve` reads back exactly what `write` will store.

    Args:
        kind, num_contexts: of the file.
    """

    def __init__(self, kind: Kind | str, num_contexts: int, *, linked: bool = False):
        self.kind, self.num_contexts = Kind(kind), num_contexts
        self.linked = linked
        self.metas = {}
        self.tensors: dict[str, Tensor] = {}
        # CRC-32s are taken in a thread as tensors arrive (zlib releases the GIL), overlapping
        # the reading and binding of the next tensor instead of adding a pass at the end.
        self._crcs: dict[str, Future[str]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pspctl-crc")
        self._ahead: dict[int, tuple[weakref.ref[Tensor], int, Future[str]]] = {}

    def raw(self, stored_name: str) -> Tensor:
        return self.tensors[stored_name]

    def add_superposed(
        self,
        name: str,
        meta: TensorMeta,
        superposed: Tensor,
        ctx: ContextSet,
        dtype: torch.dtype,
        base: Tensor | None = None,
    ) -> int:
        """Store a bound tensor in `dtype` (complex: a trailing (real, imag) pair), and the base
        it is centred on (`meta.centred`; kept in memory but not written if the base is linked).
        Returns the bytes it takes in the file."""
        tensors = {SUPERPOSED + name: pack(superposed, dtype), CONTEXTS + name: ctx.stored()}
        if meta.centred:
            if base is None:
                raise ValueError(f"{name}: a centred tensor needs its base")
            tensors[BASE + name] = base.to(torch_dtype(meta.dtype)).contiguous()
        self._add(name, meta, tensors)
        return self.stored_bytes(name)

    def add_per_context(self, name: str, meta: TensorMeta, stacked: Tensor) -> int:
        """Store the K tensors of `name`, stacked on dim 0; returns their bytes."""
        return self._add(name, meta, {STACKED + name: stacked.contiguous()})

    def add_shared(self, name: str, meta: TensorMeta, tensor: Tensor) -> int:
        """Store a tensor equal in every input once; returns its bytes."""
        return self._add(name, meta, {SHARED + name: tensor.contiguous()})

    def add_file(self, name: str, data: bytes) -> None:
        """Store a small non-weight file (an HF folder's config, tokenizer…) as `files/<name>`;
        the header's `hf.files` must list it."""
        empty = torch.zeros(0, dtype=torch.uint8)
        tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else empty
        self.tensors[FILES + name] = tensor
        self._crcs[FILES + name] = self._pool.submit(crc32, tensor)

    def checksum_ahead(self, tensor: Tensor) -> None:
        """Start the CRC-32 of a tensor that may be stored later (as this very object): merge
        checksums what it binds while it reads the inputs, not all at once when it writes."""
        self._ahead[id(tensor)] = (weakref.ref(tensor), tensor._version, self._pool.submit(crc32, tensor))

    def _crc(self, tensor: Tensor) -> Future[str]:
        """The tensor's CRC-32: the one started ahead if it is this object, unchanged since
        (torch counts a tensor's in-place changes in `_version`), else computed now."""
        ref, version, future = self._ahead.pop(id(tensor), (None, None, None))
        if ref is not None and ref() is tensor and version == tensor._version and future is not None:
            return future
        return self._pool.submit(crc32, tensor)

    def _add(self, name: str, meta: TensorMeta, tensors: dict[str, Tensor]) -> int:
        self.metas[name] = meta
        self.tensors.update(tensors)
        self._crcs.update({n: self._crc(t) for n, t in tensors.items()})
        self._last = None
        return sum(t.nbytes for t in tensors.values())

    def write(
        self,
        path: str | Path,
        header: Header,
        *,
        force: bool = False,
        inputs: Sequence[str | Path] = (),
        max_shard_size: int | str | None = None,
    ) -> list[Path]:
        """Write the file (or its shards and index, see `write_superposed`): `header` as
        given, with this writer's tensor records. Returns the files written."""
        header.tensors = dict(self.metas)
        stored = {n: t for n, t in self.tensors.items() if not (self.linked and n.startswith(BASE))}
        crcs = {n: self._crcs[n].result() for n in stored}
        return write_superposed(
            Path(path), stored, header, force=force, inputs=inputs, crcs=crcs, max_shard_size=max_shard_size
        )


class SuperposedFile(_Stored):
    """A pspctl file opened lazily: the header now, tensors when asked.

    Raises:
        InputError: missing, truncated or corrupt file.
        FormatError: a plain safetensors file, or an unknown format version.
    """

    def __init__(self, path: str | Path, *, base: str | Path | None = None):
        self.path = _superposed_file(Path(path))
        self.base_given = None if base is None else Path(base)  # --base PATH, the linked base
        self._base: Checkpoint | None = None
        self._verified: set[str] = set()
        self._handles: dict[str, object] = {}  # stored name -> the safe_open handle of its file
        self._checksums: dict[str, str] = {}
        if self.path.name.endswith(INDEX_SUFFIX):
            meta, stored = self._open_index()
        else:
            meta, stored = self._open_file(self.path)
            self.files = [self.path]
        version = meta["pspctl.format_version"]
        try:
            self.header = parse_header(meta["pspctl.header"])
            check_header(self.header, version)
            check_tensors(self.header, stored)
        except FormatError as e:
            raise FormatError(f"{self.path}: {e}") from None
        if self._checksums and set(self._checksums) != set(stored):
            raise FormatError(f"{self.path}: the checksums do not list the stored tensors")
        self.metas = self.header.tensors
        self.kind, self.num_contexts = Kind(self.header.kind), self.header.num_contexts
        self.linked = bool(self.header.base and self.header.base["linked"])
        self.tied = dict(self.header.tied)
        if base is not None and not self.header.base:
            raise MismatchError(
                f"{self.path}: --base given, but this file's tensors are not centred on a base"
            )

    def _open_file(self, path: Path) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
        """Open one safetensors file of this superposed file (the file, or a shard): its checked
        metadata and its stored tensors' shapes and dtypes; its handle and checksums are kept."""
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            meta = handle.metadata() or {}
            stored = {}
            for n in handle.keys():
                piece = handle.get_slice(n)
                stored[n] = (list(piece.get_shape()), ST_DTYPES.get(piece.get_dtype(), piece.get_dtype()))
        except SafetensorError as e:
            if path.suffix in PICKLE_SUFFIXES:
                raise FormatError(
                    f"{path}: a PyTorch checkpoint, not a pspctl superposed file (pspctl merge makes one)"
                ) from None
            raise InputError(f"{path}: not a readable safetensors file ({e})") from None
        _check_metadata(path, meta)
        checksums = _checksums(path, meta)
        if checksums and set(checksums) != set(stored):
            raise FormatError(f"{path}: the checksums do not list the stored tensors")
        self._checksums.update(checksums)
        self._handles.update(dict.fromkeys(stored, handle))
        return meta, stored

    def _open_index(self) -> tuple[dict[str, str], dict[str, tuple[list[int], str]]]:
        """Open a sharded superposed file by its index: every shard carries the index's header
        and the checksums of its own tensors, and holds exactly the tensors the index maps to it."""
        index = self.path
        try:
            data = json.loads(index.read_text())
            meta, weight_map = data["metadata"], data["weight_map"]
            if not isinstance(meta, dict) or not isinstance(weight_map, dict):
                raise TypeError("metadata and weight_map must be objects")
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{index}: not a readable shard index ({type(e).__name__}: {e})") from None
        meta = {k: v for k, v in meta.items() if k != "total_size"}
        _check_metadata(index, meta)
        shards: dict[str, list[str]] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or Path(shard).name != shard:
                raise InputError(f"{index}: shard {shard!r} of {name!r} is not a file name beside the index")
            shards.setdefault(shard, []).append(name)
        stored: dict[str, tuple[list[int], str]] = {}
        self.files = [index]
        for shard in sorted(shards):
            path = index.parent / shard
            if not path.is_file():
                raise InputError(f"{index}: shard {shard} is missing")
            shard_meta, held = self._open_file(path)
            if shard_meta["pspctl.header"] != meta["pspctl.header"]:
                raise FormatError(
                    f"{path}: its pspctl header differs from the index's: a shard of another file?"
                )
            if set(held) != set(shards[shard]):
                raise FormatError(f"{path}: holds other tensors than {index.name} maps to it")
            stored.update(held)
            self.files.append(path)
        return meta, stored

    saved_names: dict[str, str] = {}  # noqa: RUF012  a renamed view's names -> the file's

    def renamed(self, names: Mapping[str, str]) -> SuperposedFile:
        """This file with its tensors under other names (`names`: the file's -> the new ones),
        for a model that names its weights otherwise than its checkpoints (`hf.checkpoint_names`).
        The view reads the same file; `saved_names` maps its names back."""
        view = copy.copy(self)
        view.header = replace(
            self.header,
            tensors={names.get(n, n): m for n, m in self.header.tensors.items()},
            tied={names.get(a, a): names.get(n, n) for a, n in self.header.tied.items()},
        )
        view.metas, view.tied, view._last = view.header.tensors, dict(view.header.tied), None
        kept = {n: s for n, s in self.saved_names.items() if n not in names}
        view.saved_names = kept | {new: self.saved_name(n) for n, new in names.items()}
        return view

    def named_as(self, model: torch.nn.Module) -> SuperposedFile:
        """This file under `model`'s names: a `renamed` view where transformers names the
        model's weights otherwise than its checkpoints (`checkpoint_names`), else itself."""
        names = checkpoint_names(model, self.shapes())
        return self.renamed(names) if names else self

    def saved_name(self, name: str) -> str:
        """The file's own name for `name` (the same unless this is a `renamed` view)."""
        return self.saved_names.get(name, name)

    def raw(self, stored_name: str) -> Tensor:
        if self.saved_names:  # a renamed view: every stored name is <role>/<tensor name>
            role, _, name = stored_name.partition("/")
            stored_name = f"{role}/{self.saved_name(name)}"
        if self.linked and stored_name.startswith(BASE):
            return self.linked_base()[stored_name[len(BASE) :]]
        return self._raw(stored_name)

    def linked_base_location(self) -> Path | None:
        """Where the linked base is: --base, else its recorded path (as `candidates` tries
        it); None if it is nowhere, or the file has no linked base. Hashes nothing."""
        if not self.linked:
            return None
        if self.base_given is not None:
            return self.base_given if self.base_given.exists() else None
        return locate((self.header.base or {})["path"], self.path.parent)

    def linked_base(self) -> Checkpoint:
        """The linked base checkpoint, found at --base or at its recorded path (as given, then
        beside this file), checked against its recorded sha256.

        Raises:
            InputError: not found. MismatchError: another sha256.
        """
        if self._base is None:
            record = self.header.base or {}
            recorded = Path(record["path"])
            found = self.linked_base_location()
            if found is None:
                raise InputError(
                    f"{self.path}: its linked base {recorded} is not there; pass --base PATH to the parent checkpoint"
                )
            digest = sha256_checkpoint(found)
            if digest != record["sha256"]:
                raise MismatchError(
                    f"{found}: sha256 {digest}, but {self.path.name} was merged on a base with sha256 "
                    f"{record['sha256']}; pass the base it was merged on"
                )
            self._base = open_checkpoint(found, strip_prefix=self.header.recipe.get("strip_prefix"))
        return self._base

    @property
    def labels(self) -> list[str]:
        return self.header.labels

    def resolve_context(self, spec: int | str) -> int:
        """A 0-based index from an index or a label. Labels win over digits."""
        if isinstance(spec, str) and spec in self.labels:
            return self.labels.index(spec)
        if isinstance(spec, str):
            try:
                k = int(spec)
            except ValueError:
                raise ContextError(f"unknown context {spec!r}; labels are {', '.join(self.labels)}") from None
        else:  # an integer: int, numpy's, a 0-d integer tensor; int() would truncate 1.7 to 1
            index = None
            with contextlib.suppress(TypeError):
                index = None if isinstance(spec, bool) else operator.index(spec)
            if index is None:
                raise ContextError(f"context {spec!r}: give an index (an integer) or a label (str)")
            k = index
        if not 0 <= k < self.num_contexts:
            raise ContextError(
                f"context {k} out of range: this file holds contexts 0..{self.num_contexts - 1}"
            )
        return k

    def _raw(self, stored_name: str) -> Tensor:
        """A stored tensor as it is in the file, its checksum verified on first read.

        Raises:
            InputError: unreadable, or its bytes differ from the checksum written with it.
        """
        try:
            tensor = self._handles[stored_name].get_tensor(stored_name)  # type: ignore[attr-defined]
        except SafetensorError as e:
            raise InputError(f"{self.path}: cannot read {stored_name!r} ({e})") from None
        if stored_name not in self._verified and self._checksums:
            if crc32(tensor) != self._checksums[stored_name]:
                raise InputError(
                    f"{self.path}: tensor {stored_name!r} does not match its checksum: the file is corrupted"
                )
            self._verified.add(stored_name)
        return tensor

    def file(self, name: str) -> bytes:
        """A non-weight file stored with the model (`hf.files`, `stored`), its checksum verified:
        `name`, or `header.variant_name(name, k)` for context k's own version (v3)."""
        return self._raw(FILES + name).numpy().tobytes()

    def stored_files(self) -> dict[str, bytes]:
        """Every non-weight file stored with the model, by its name under `files/`
        (per-context versions included): what a rewrite of the file carries over."""
        return {n[len(FILES) :]: self.file(n[len(FILES) :]) for n in self._handles if n.startswith(FILES)}

    def state_dict(self, context: int | str) -> dict[str, Tensor]:
        """Model `context` as a plain state_dict with the inputs' keys, shapes and dtypes."""
        k = self.resolve_context(context)
        state = {name: self.retrieve(name, k) for name in self.names()}
        # A tied alias is the same tensor, as in the model saved: torch.save keeps them shared.
        state.update({alias: state[name] for alias, name in self.tied.items()})
        return state

    def nbytes(self) -> int:
        """Bytes on disk: the file, or a sharded file's shards and index."""
        return sum(f.stat().st_size for f in self.files)


def _superposed_file(path: Path) -> Path:
    """The file to open for `path`: itself, or in a folder its one shard index or its one
    safetensors file.

    Raises:
        InputError: no such path, or a folder without exactly one superposed file.
    """
    if path.is_dir():
        found = sorted(path.glob(f"*{INDEX_SUFFIX}")) or sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise InputError(f"{path}: is a directory, not a superposed file")
        return found[0]
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    return path


def _check_metadata(path: Path, meta: Mapping[str, str]) -> None:
    """Raise FormatError unless `meta` is a pspctl file's, of a version this pspctl reads."""
    if meta.get("format") != FORMAT_NAME or "pspctl.header" not in meta:
        raise FormatError(f"{path}: a plain safetensors file, not a pspctl superposed file")
    version = meta.get("pspctl.format_version", "?")
    if version not in READS:
        raise FormatError(
            f"{path}: pspctl format version {str(version)[:20]}, this pspctl reads versions "
            f"{', '.join(sorted(READS))}; upgrade pspctl"
        )
    unknown = sorted(set(meta) - METADATA_KEYS)
    if unknown:  # also catches a corrupted key name, e.g. one that hid the checksums
        raise FormatError(
            f"{path}: unknown metadata entries {unknown[:3]}: corrupted, or written by another tool"
        )


def open_superposed(file: str | Path | SuperposedFile) -> SuperposedFile:
    """`file` opened, or as it is if it already is (e.g. opened with a linked base's `base=`)."""
    return file if isinstance(file, SuperposedFile) else SuperposedFile(file)
