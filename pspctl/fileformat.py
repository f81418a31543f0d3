"""The superposed file: one `.safetensors` with a versioned pspctl header. See docs/format.md.

Tensor names in the file, for an original tensor `name`:
    superposed/<name>  the superposed weight (complex kinds: real and imaginary parts stacked last)
    stacked/<name>     a per-context tensor, the K originals stacked on a new dim 0
    contexts/<name>    the contexts of a superposed tensor, in `ContextSet.stored()` form
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pspctl.checkpoints import PICKLE_SUFFIXES, ST_DTYPES
from pspctl.contexts import ContextSet, Kind
from pspctl.errors import ContextError, FormatError, InputError, OutputError
from pspctl.header import (
    CONTEXTS,
    FORMAT_VERSION,
    STACKED,
    SUPERPOSED,
    Header,
    TensorMeta,
    check_header,
    check_tensors,
    parse_header,
    stored_names,
)
from pspctl.outputs import atomic_path, crc32, refuse_existing, write_safetensors
from pspctl.policy import Role
from pspctl.superpose import unbind

__all__ = [
    "FORMAT_VERSION",
    "Header",
    "SuperposedFile",
    "SuperposedWriter",
    "TensorMeta",
    "check_output",
    "pack",
    "write_superposed",
]

FORMAT_NAME = "pspctl"
CHECKSUMS = "pspctl.checksums"  # metadata key: CRC-32 of the header text and of every tensor
METADATA_KEYS = {"format", "pspctl.format_version", "pspctl.header", CHECKSUMS}


def pack(superposed: Tensor, dtype: torch.dtype) -> Tensor:
    """The stored form of a superposed tensor: complex becomes a trailing (real, imag) pair."""
    if superposed.is_complex():
        superposed = torch.view_as_real(superposed)
    return superposed.to(dtype).contiguous()


def check_output(path: str | Path, *, force: bool) -> None:
    """Refuse, before any work, an output path a superposed file must not be written to.

    Raises:
        OutputError: the name does not end in .safetensors, or the file exists without `force`.
    """
    _check_name(Path(path))
    refuse_existing(path, force=force)


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
) -> None:
    """Write tensors (already named superposed/…, stacked/…, contexts/…) and header atomically.

    The same tensors and header give the same bytes. `inputs` are files the output must not be.
    """
    from pspctl import __version__

    header.pspctl_version = header.pspctl_version or __version__
    text = header.to_json()
    checksums = {"header": _crc_text(text), "tensors": {n: crc32(t) for n, t in sorted(tensors.items())}}
    metadata = {
        "format": FORMAT_NAME,
        "pspctl.format_version": str(FORMAT_VERSION),
        "pspctl.header": text,
        CHECKSUMS: json.dumps(checksums, sort_keys=True, separators=(",", ":")),
    }
    _check_name(path)  # atomic_path refuses an existing file
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        write_safetensors(tensors, tmp, metadata)
        written = SuperposedFile(tmp)  # write, then verify: header, tensors and checksums
        for name in tensors:
            written.raw(name)


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
        """The original shape of every tensor, by name."""
        return {name: meta.shape for name, meta in self.metas.items()}

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
        """The K per-context tensors of `name`, stacked on dim 0."""
        return self.raw(STACKED + name)

    def retrieve(self, name: str, k: int, *, superposed: Tensor | None = None) -> Tensor:
        """Model k's tensor, in its original dtype: exact for per-context tensors, Ŵ_k otherwise.

        Args:
            superposed: use this in place of the stored superposed tensor (e.g. pruned).
        """
        meta = self.metas[name]
        if meta.role != Role.SUPERPOSED:
            return self.stacked(name)[k].clone()
        value = self.superposed(name) if superposed is None else superposed
        return unbind(value, self.contexts(name), k).to(getattr(torch, meta.dtype))

    def stored_bytes(self, name: str) -> int:
        """Bytes the file spends on original tensor `name`."""
        return sum(self.raw(n).nbytes for n in stored_names(name, self.metas[name]))


class SuperposedWriter(_Stored):
    """A superposed file being built in memory: the only code that knows the stored names and
    packing. `retrieve` reads back exactly what `write` will store.

    Args:
        kind, num_contexts: of the file.
    """

    def __init__(self, kind: Kind | str, num_contexts: int):
        self.kind, self.num_contexts = Kind(kind), num_contexts
        self.metas = {}
        self.tensors: dict[str, Tensor] = {}

    def raw(self, stored_name: str) -> Tensor:
        return self.tensors[stored_name]

    def add_superposed(
        self, name: str, meta: TensorMeta, superposed: Tensor, ctx: ContextSet, dtype: torch.dtype
    ) -> int:
        """Store a bound tensor in `dtype` (complex: a trailing (real, imag) pair); returns its bytes."""
        return self._add(
            name, meta, {SUPERPOSED + name: pack(superposed, dtype), CONTEXTS + name: ctx.stored()}
        )

    def add_per_context(self, name: str, meta: TensorMeta, stacked: Tensor) -> int:
        """Store the K tensors of `name`, stacked on dim 0; returns their bytes."""
        return self._add(name, meta, {STACKED + name: stacked.contiguous()})

    def _add(self, name: str, meta: TensorMeta, tensors: dict[str, Tensor]) -> int:
        self.metas[name] = meta
        self.tensors.update(tensors)
        self._last = None
        return sum(t.nbytes for t in tensors.values())

    def write(
        self, path: str | Path, header: Header, *, force: bool = False, inputs: Sequence[str | Path] = ()
    ) -> None:
        """Write the file: `header` as given, with this writer's tensor records."""
        header.tensors = dict(self.metas)
        write_superposed(Path(path), self.tensors, header, force=force, inputs=inputs)


class SuperposedFile(_Stored):
    """A pspctl file opened lazily: the header now, tensors when asked.

    Raises:
        InputError: missing, truncated or corrupt file.
        FormatError: a plain safetensors file, or an unknown format version.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.is_dir():
            raise InputError(f"{self.path}: is a directory, not a superposed file")
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            meta = self._handle.metadata() or {}
            stored = {}
            for n in self._handle.keys():
                piece = self._handle.get_slice(n)
                stored[n] = (list(piece.get_shape()), ST_DTYPES.get(piece.get_dtype(), piece.get_dtype()))
        except SafetensorError as e:
            if self.path.suffix in PICKLE_SUFFIXES:
                raise FormatError(
                    f"{self.path}: a PyTorch checkpoint, not a pspctl superposed file (pspctl merge makes one)"
                ) from None
            raise InputError(f"{self.path}: not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT_NAME or "pspctl.header" not in meta:
            raise FormatError(f"{self.path}: a plain safetensors file, not a pspctl superposed file")
        version = meta.get("pspctl.format_version", "?")
        if version != str(FORMAT_VERSION):
            raise FormatError(
                f"{self.path}: pspctl format version {version[:20]}, this pspctl reads version {FORMAT_VERSION}; upgrade pspctl"
            )
        unknown = sorted(set(meta) - METADATA_KEYS)
        if unknown:  # also catches a corrupted key name, e.g. one that hid the checksums
            raise FormatError(
                f"{self.path}: unknown metadata entries {unknown[:3]}: corrupted, or written by another tool"
            )
        self._checksums = _checksums(self.path, meta)
        self._verified: set[str] = set()
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

    @property
    def labels(self) -> list[str]:
        return self.header.labels

    def resolve_context(self, spec: int | str) -> int:
        """A 0-based index from an index or a label. Labels win over digits."""
        if isinstance(spec, str) and spec in self.labels:
            return self.labels.index(spec)
        try:
            k = int(spec)
        except ValueError:
            raise ContextError(f"unknown context {spec!r}; labels are {', '.join(self.labels)}") from None
        if not 0 <= k < self.num_contexts:
            raise ContextError(
                f"context {k} out of range: this file holds contexts 0..{self.num_contexts - 1}"
            )
        return k

    def raw(self, stored_name: str) -> Tensor:
        """A stored tensor as it is in the file, its checksum verified on first read.

        Raises:
            InputError: unreadable, or its bytes differ from the checksum written with it.
        """
        try:
            tensor = self._handle.get_tensor(stored_name)
        except SafetensorError as e:
            raise InputError(f"{self.path}: cannot read {stored_name!r} ({e})") from None
        if stored_name not in self._verified and self._checksums:
            if crc32(tensor) != self._checksums[stored_name]:
                raise InputError(
                    f"{self.path}: tensor {stored_name!r} does not match its checksum: the file is corrupted"
                )
            self._verified.add(stored_name)
        return tensor

    def state_dict(self, context: int | str) -> dict[str, Tensor]:
        """Model `context` as a plain state_dict with the inputs' keys, shapes and dtypes."""
        k = self.resolve_context(context)
        return {name: self.retrieve(name, k) for name in self.names()}

    def nbytes(self) -> int:
        return self.path.stat().st_size
