"""Reading and writing plain checkpoints, safe by default.

`.safetensors` files are read lazily, one tensor at a time. `.pt`/`.pth`/`.bin` files are
loaded with `torch.load(weights_only=True, mmap=True)`: no pickle code runs and tensors stay
on disk until touched. A pickled whole `nn.Module` needs pickle execution, so it is refused
unless the caller passes `trust_pickle=True`.

A checkpoint may also be sharded the way Hugging Face saves large models: an index
(`model.safetensors.index.json`, `pytorch_model.bin.index.json`) whose `weight_map` names the
shard holding each tensor. A directory stands for the checkpoint inside it (see `resolve`).
"""

from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from pspctl.digests import (
    INDEX_SUFFIX,
    PICKLE_SUFFIXES,
    SUFFIXES,
    TIMM_SUFFIX,
    resolve,
    shard_map,
)
from pspctl.dtypes import itemsize
from pspctl.errors import InputError, OutputError, UnsafeCheckpointError, listed, one_line
from pspctl.outputs import ST_CODES, atomic_path, refuse_existing, write_safetensors
from pspctl.policy import TensorInfo, is_lookup

__all__ = [
    "Checkpoint",
    "atomic_path",
    "dtype_name",
    "find_ties",
    "open_checkpoint",
    "refuse_existing",
    "save_state_dict",
]

# Keys of a Lightning checkpoint's top-level dict (besides state_dict): its state_dict's keys carry
# the LightningModule's attribute prefix, e.g. `model.`.
LIGHTNING_KEYS = ("pytorch-lightning_version", "optimizer_states", "lr_schedulers", "global_step")
LIGHTNING = "unwrapped 'state_dict' of a Lightning checkpoint"  # a Checkpoint's note
# Plain classes found in training checkpoints, safe to rebuild without running code: timm
# saves its argparse arguments next to the weights.
SAFE_GLOBALS: list[Any] = [argparse.Namespace]
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
RAN_PICKLED_CODE = "ran pickled code (--trust-pickle)"  # a Checkpoint's note
# Every file whose pickled code this process ran (--trust-pickle), in order: the CLI names them.
RAN_PICKLED: list[Path] = []


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


ST_DTYPES = {code: dtype_name(dtype) for dtype, code in ST_CODES.items()}  # "F32" -> "float32"


class Checkpoint:
    """A read-only view of one state_dict: ordered names, shapes and dtypes up front, tensors on demand.

    Tied tensors (one storage under several names, as `torch.save(model.state_dict())` writes a
    model whose head shares its embedding) are listed once in `infos`: `ties` maps each other
    name (alias) to the listed one, and `ckpt[alias]` still reads it.
    """

    def __init__(
        self,
        path: Path,
        infos: dict[str, TensorInfo],
        getter,
        notes: list[str],
        ties: dict[str, str] | None = None,
    ):
        self.path = path
        self.infos = infos
        self._get = getter
        self.notes = notes  # what was done to the file's keys, e.g. a stripped prefix
        self.ties = ties or {}  # alias -> the name in `infos` whose storage it shares
        self._tied_infos = {a: infos[n] for a, n in self.ties.items()}

    def untie(self, aliases: Sequence[str]) -> None:
        """List `aliases` as tensors of their own again (in the file's order is not kept: last)."""
        for alias in aliases:
            if alias in self.ties:
                del self.ties[alias]
                self.infos[alias] = replace(self._tied_infos[alias], name=alias)

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def __getitem__(self, name: str) -> Tensor:
        return self._get(name)

    def nbytes(self) -> int:
        """Bytes of all its tensors (not the file size)."""
        return sum(i.numel * itemsize(i.dtype) for i in self.infos.values())


def _strip_prefixes(
    names: list[str], prefix: str | None = None, *, lightning: bool = False
) -> tuple[dict[str, str], list[str]]:
    """Map stripped name -> stored name, removing DDP's `module.` and torch.compile's `_orig_mod.`;
    then `prefix` if given (keys without it are dropped, and the notes say so), else for a
    Lightning checkpoint the LightningModule's attribute prefix when all keys share one.

    Raises:
        InputError: no key starts with `prefix`.
    """
    notes = []
    mapping = {n: n for n in names}
    for wrapper in WRAPPER_PREFIXES:
        if mapping and all(k.startswith(wrapper) for k in mapping):
            mapping = {k[len(wrapper) :]: v for k, v in mapping.items()}
            notes.append(f"stripped prefix '{wrapper}'")
    if prefix:
        kept = {k[len(prefix) :]: v for k, v in mapping.items() if k.startswith(prefix) and k != prefix}
        if not kept:
            raise InputError(
                f"no tensor name starts with --strip-prefix {prefix!r} (first: {next(iter(mapping), '')!r})"
            )
        dropped = [k for k in mapping if not k.startswith(prefix) or k == prefix]
        notes.append(f"stripped prefix '{prefix}' (--strip-prefix)")
        if dropped:
            notes.append(f"dropped {len(dropped)} tensors without the prefix: {listed(dropped)}")
        return kept, notes
    if lightning and mapping:
        # One attribute holding the network (`self.model = ...`): its name prefixes every key,
        # and the network has submodules (some key goes on deeper; a network's own tensors,
        # such as CLIP's `model.logit_scale`, may sit beside them). Else, ambiguous: kept.
        heads = {k.split(".", 1)[0] for k in mapping}
        under_one = len(heads) == 1 and all("." in k for k in mapping)
        if under_one and any(k.count(".") >= 2 for k in mapping):
            head = f"{heads.pop()}."
            mapping = {k[len(head) :]: v for k, v in mapping.items()}
            notes.append(f"stripped the LightningModule attribute prefix '{head}' (override: --strip-prefix)")
        elif under_one:  # `self.model = nn.Linear(...)`, or the LightningModule's own layer
            notes.append(
                f"a Lightning checkpoint of one layer '{heads.pop()}': kept as it is "
                "(--strip-prefix PREFIX strips it)"
            )
        else:
            notes.append(
                "a Lightning checkpoint whose keys share no one module prefix: kept as they are "
                "(--strip-prefix PREFIX keeps one submodule)"
            )
    return mapping, notes


# What a reader returns: (shape, dtype) by stored name, a getter by stored name, notes.
Raw = tuple[dict[str, tuple[tuple[int, ...], str]], Callable[[str], Tensor], list[str]]


def _read_safetensors(path: Path) -> Raw:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata() or {}
            slices = {n: handle.get_slice(n) for n in handle.keys()}
            raw = {
                n: (tuple(s.get_shape()), ST_DTYPES.get(s.get_dtype(), s.get_dtype()))
                for n, s in slices.items()
            }
    except SafetensorError as e:
        raise InputError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") == "pspctl":
        raise InputError(f"{path}: is a pspctl superposed file; extract its models first (pspctl extract)")

    def get(name: str) -> Tensor:
        # A fresh handle per tensor: closing it unmaps the file, so pages read for one tensor
        # do not stay resident while the next K-1 inputs are read.
        try:
            with safe_open(str(path), framework="pt", device="cpu") as one:
                return one.get_tensor(name)
        except SafetensorError as e:
            raise InputError(f"{path}: cannot read tensor {name!r} ({e})") from None

    return raw, get, []


def _read_pickle(path: Path, trust_pickle: bool) -> Raw:
    if path.suffix not in PICKLE_SUFFIXES and not path.name.endswith(TIMM_SUFFIX):
        raise InputError(f"{path}: unknown checkpoint type (expected .safetensors, .pt, .pth, .bin or .ckpt)")
    obj, pickled = _torch_load(path, trust_pickle)
    state, notes = _unwrap(obj, path)
    if pickled:
        notes.append(RAN_PICKLED_CODE)
        RAN_PICKLED.append(path)
    raw = {n: (tuple(t.shape), dtype_name(t.dtype)) for n, t in state.items()}
    return raw, state.__getitem__, notes


def _read_file(path: Path, trust_pickle: bool) -> Raw:
    return _read_safetensors(path) if path.suffix == ".safetensors" else _read_pickle(path, trust_pickle)


def _read_sharded(index: Path, trust_pickle: bool) -> Raw:
    shards = shard_map(index)
    readers = {p: _read_file(p, trust_pickle) for p in sorted(set(shards.values()))}
    lost = [f"{n} (in {p.name})" for n, p in shards.items() if n not in readers[p][0]]
    if lost:
        raise InputError(f"{index}: the index names tensors its shards lack: {listed(lost)}")
    raw = {n: readers[p][0][n] for n, p in shards.items()}
    notes = [f"{len(readers)} shards"] + sorted({n for r in readers.values() for n in r[2]})
    return raw, lambda name: readers[shards[name]][1](name), notes


def _unwrap(obj: object, path: Path) -> tuple[Mapping[str, Tensor], list[str]]:
    notes = []
    # Lightning and timm; the PyTorch tutorials' {"model_state_dict", "optimizer_state_dict"};
    # a model under "model"; DeepSpeed's model states under "module".
    for key in ("state_dict", "model_state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            lightning = key == "state_dict" and any(k in obj for k in LIGHTNING_KEYS)
            if isinstance(obj.get("state_dict_ema"), Mapping):
                notes.append("also holds 'state_dict_ema' (timm's EMA weights), not used")
            obj = obj[key]
            notes.append(LIGHTNING if lightning else f"unwrapped '{key}'")
            break
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
        notes.append("took state_dict() of a pickled module")
    if not isinstance(obj, Mapping) or not obj:
        raise InputError(f"{path}: no state_dict found (expected a dict of tensors)")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise InputError(f"{path}: not a state_dict: entries {bad[:3]} are not tensors")
    return obj, notes


def _torch_load(path: Path, trust_pickle: bool) -> tuple[object, bool]:
    """The object pickled in `path`, and whether loading it ran pickled code.

    Always tried with weights_only=True first: a plain state_dict needs no code, so
    `trust_pickle` lets only the files that do need it run code (and they are reported).
    """
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] != b"PK" and magic[:1] != b"\x80":
        raise InputError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=magic[:2] == b"PK"), False
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
            what = f" (it references {found.group(1)})" if found else ""
            raise UnsafeCheckpointError(
                f"{path}: loading it would execute pickled code{what}; a malicious pickle can run "
                "anything. Re-save it as a state_dict, or pass --trust-pickle if you trust its source"
            ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False), True
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise InputError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    except Exception as e:  # the file's own code failed, e.g. a class it pickled cannot be imported
        raise InputError(f"{path}: its pickled code failed ({one_line(e)})") from e


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]


def open_checkpoint(
    path: str | Path, *, trust_pickle: bool = False, strip_prefix: str | None = None
) -> Checkpoint:
    """Open a state_dict checkpoint for reading: a file, a sharded checkpoint's index, or a
    directory holding either (see `resolve`).

    Keys lose DDP's `module.` and torch.compile's `_orig_mod.`; then `strip_prefix` (keys
    without it are dropped), or for a Lightning checkpoint its one common attribute prefix.

    Raises:
        InputError: missing, unreadable, truncated, or not a state_dict; a broken shard index.
        UnsafeCheckpointError: a pickled module or other object, without `trust_pickle`.
    """
    path = Path(path)
    file = resolve(path)
    if file.name.endswith(INDEX_SUFFIX):
        raw, get, notes = _read_sharded(file, trust_pickle)
    else:
        raw, get, notes = _read_file(file, trust_pickle)
    try:
        mapping, strip_notes = _strip_prefixes(list(raw), strip_prefix, lightning=LIGHTNING in notes)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    infos = {n: TensorInfo(n, *raw[stored]) for n, stored in mapping.items()}
    # safetensors cannot share storage; a pickle (also a pickled shard) can.
    ties = {} if ".safetensors" in file.name else find_ties({n: get(s) for n, s in mapping.items()})
    infos = {n: i for n, i in infos.items() if n not in ties}
    if ties:
        notes.append(f"tied: {listed([f'{a} = {n}' for a, n in ties.items()])}")
    return Checkpoint(path, infos, lambda name: get(mapping[name]), notes + strip_notes, ties)


def find_ties(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Names that are views of one storage with one layout: alias -> the name it shares.

    The shared name is the first of its group in `state`'s order, or the group's embedding
    (a lookup, by name) if one is: the policy then sees the tensor as what it mostly is.
    Reads no tensor data: storage pointers only (a memory-mapped file stays unread).
    """
    groups: dict[tuple[object, ...], list[str]] = {}
    for name, t in state.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)
        groups.setdefault(key, []).append(name)
    ties = {}
    for names in groups.values():
        if len(names) > 1:
            first = next((n for n in names if is_lookup(n)), names[0])
            ties.update({n: first for n in names if n != first})
    return ties


def checkpoint_names(model: torch.nn.Module, names: Iterable[str]) -> dict[str, str]:
    """Where transformers names `model`'s weights otherwise than its checkpoints: each
    checkpoint name in `names` that it renames -> the model's name.

    transformers 5 builds some architectures under other names than it saves (ViT's
    `encoder.layer.N.attention.attention.query` is `layers.N.attention.q_proj` in the model;
    DeiT, Swin) and renames the weights in `from_pretrained` and `save_pretrained`; its own
    renaming rules are applied here. Empty for any other model, and where renaming alone does
    not give the model's names (then `check_fits` says what differs).
    """
    if not type(model).__module__.startswith("transformers."):
        return {}
    names = list(names)
    own = model.state_dict()
    if all(n in own for n in names):
        return {}
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # another transformers: no renaming to apply
        return {}
    renamings = [t for t in get_model_conversion_mapping(model) if isinstance(t, WeightRenaming)]  # type: ignore[arg-type]
    renamed = {n: rename_source_key(n, renamings, [])[0] for n in names}
    if not all(r in own for r in renamed.values()) or len(set(renamed.values())) < len(renamed):
        return {}
    return {n: r for n, r in renamed.items() if n != r}


def save_state_dict(
    state: Mapping[str, Tensor], path: str | Path, *, force: bool = False, inputs: Sequence[str | Path] = ()
) -> None:
    """Write a plain state_dict atomically: safetensors for `.safetensors`, torch.save otherwise.
    The same state_dict gives the same bytes.

    Raises:
        OutputError: an unknown suffix, or `path` refused by `atomic_path`.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory")
    if path.suffix not in SUFFIXES:
        raise OutputError(f"{path}: unknown output type (use {', '.join(sorted(SUFFIXES))})")
    with atomic_path(path, force=force, inputs=inputs) as tmp:
        if path.suffix == ".safetensors":
            write_safetensors(state, tmp, {"format": "pt"})
        else:  # through a file object: torch.save would name the archive after the temp file
            with open(tmp, "wb") as f:
                torch.save(dict(state), f)
