"""The superposed file: one `.safetensors` with a versioned pspctl header. See docs/format.md.

Tensor names in the file, for an original tensor `name`:
    superposed/<name>  the superposed weight (complex kinds: real and imaginary parts stacked last)
    stacked/<name>     a per-context tensor, the K originals stacked on a new dim 0
    contexts/<name>    the contexts of a superposed tensor, in `ContextSet.stored()` form
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from pspctl.checkpoints import PICKLE_SUFFIXES, atomic_path, refuse_existing
from pspctl.contexts import ContextSet, Kind
from pspctl.errors import ContextError, FormatError, InputError, OutputError
from pspctl.policy import Role
from pspctl.superpose import unbind

__all__ = [
    "FORMAT_VERSION",
    "Header",
    "SuperposedFile",
    "TensorMeta",
    "check_output",
    "pack",
    "write_superposed",
]

FORMAT_NAME = "pspctl"
FORMAT_VERSION = 1
SUPERPOSED, STACKED, CONTEXTS = "superposed/", "stacked/", "contexts/"


@dataclass(frozen=True)
class TensorMeta:
    role: str  # Role value
    dtype: str  # the original dtype, restored on extraction
    shape: list[int]
    fan_in: int = 1
    reason: str = ""


@dataclass
class Header:
    """Everything in the file besides the tensors. Serialised as JSON in the safetensors metadata."""

    kind: str
    seed: int
    num_contexts: int
    labels: list[str]
    tensors: dict[str, TensorMeta]
    inputs: list[dict[str, Any]] = field(default_factory=list)  # {"path", "sha256", "label"}
    recipe: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # later steps, e.g. tune
    format_version: int = FORMAT_VERSION
    pspctl_version: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Header:
        data = json.loads(text)
        data["tensors"] = {k: TensorMeta(**v) for k, v in data["tensors"].items()}
        return cls(**data)


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
    path: Path, tensors: Mapping[str, Tensor], header: Header, *, force: bool = False
) -> None:
    """Write tensors (already named superposed/…, stacked/…, contexts/…) and header atomically."""
    from pspctl import __version__

    header.pspctl_version = header.pspctl_version or __version__
    metadata = {
        "format": FORMAT_NAME,
        "pspctl.format_version": str(FORMAT_VERSION),
        "pspctl.header": header.to_json(),
    }
    _check_name(path)  # atomic_path refuses an existing file
    with atomic_path(path, force=force) as tmp:
        save_file(dict(tensors), str(tmp), metadata=metadata)
        SuperposedFile(tmp)  # write, then verify: the header parses and every tensor is there


class SuperposedFile:
    """A pspctl file opened lazily: the header now, tensors when asked.

    Raises:
        InputError: missing, truncated or corrupt file.
        FormatError: a plain safetensors file, or an unknown format version.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such file")
        try:
            self._handle = safe_open(str(self.path), framework="pt", device="cpu")
            meta = self._handle.metadata() or {}
            names = set(self._handle.keys())
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
                f"{self.path}: pspctl format version {version}, this pspctl reads version {FORMAT_VERSION}; upgrade pspctl"
            )
        try:
            self.header = Header.from_json(meta["pspctl.header"])
        except (ValueError, TypeError, KeyError) as e:
            raise FormatError(f"{self.path}: corrupt pspctl header ({e})") from None
        missing = [n for n in self._expected_names() if n not in names]
        if missing:
            raise FormatError(f"{self.path}: header lists tensors the file lacks: {missing[:3]}")

    def _expected_names(self) -> list[str]:
        out = []
        for name, meta in self.header.tensors.items():
            out += [SUPERPOSED + name, CONTEXTS + name] if meta.role == Role.SUPERPOSED else [STACKED + name]
        return out

    @property
    def kind(self) -> Kind:
        return Kind(self.header.kind)

    @property
    def num_contexts(self) -> int:
        return self.header.num_contexts

    @property
    def labels(self) -> list[str]:
        return self.header.labels

    def names(self, role: Role | None = None) -> list[str]:
        """Original tensor names in their original order, optionally of one role."""
        return [n for n, m in self.header.tensors.items() if role is None or m.role == role]

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
        try:
            return self._handle.get_tensor(stored_name)
        except SafetensorError as e:
            raise InputError(f"{self.path}: cannot read {stored_name!r} ({e})") from None

    def contexts(self, name: str) -> ContextSet:
        meta = self.header.tensors[name]
        return ContextSet.from_stored(self.kind, self.num_contexts, meta.fan_in, self.raw(CONTEXTS + name))

    def superposed(self, name: str) -> Tensor:
        """The superposed tensor in float32 (complex64 for the complex kinds), original shape."""
        stored = self.raw(SUPERPOSED + name).float()
        return torch.view_as_complex(stored) if self.kind.is_complex else stored

    def stacked(self, name: str) -> Tensor:
        """The K per-context tensors of `name`, stacked on dim 0."""
        return self.raw(STACKED + name)

    def retrieve(self, name: str, k: int) -> Tensor:
        """Model k's tensor, in its original dtype: exact for per-context tensors, Ŵ_k otherwise."""
        meta = self.header.tensors[name]
        if meta.role != Role.SUPERPOSED:
            return self.stacked(name)[k].clone()
        weight = unbind(self.superposed(name), self.contexts(name), k)
        return weight.to(getattr(torch, meta.dtype))

    def shapes(self) -> dict[str, list[int]]:
        """The original shape of every tensor, by name."""
        return {name: meta.shape for name, meta in self.header.tensors.items()}

    def state_dict(self, context: int | str) -> dict[str, Tensor]:
        """Model `context` as a plain state_dict with the inputs' keys, shapes and dtypes."""
        k = self.resolve_context(context)
        return {name: self.retrieve(name, k) for name in self.names()}

    def nbytes(self) -> int:
        return self.path.stat().st_size
