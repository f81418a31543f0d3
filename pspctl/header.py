"""The superposed file's header, and the checks a header passes before it is believed.

The header is JSON in the safetensors metadata. Its schema is the two pydantic dataclasses
below, strict (no type coercion; unknown fields are ignored, as docs/format.md says): pydantic checks types, ranges and the
allowed values when a header is built (merge, train, tune) and when it is read. What a
schema cannot see, the header's agreement with itself (K against labels and inputs) and
with the tensors actually stored, is checked by `check_header` and `check_tensors`.

pydantic earns its place over hand-written checks: the header is nested (a dict of tensor
records, lists of input records), and its error locations (`tensors.lin.weight.fan_in`) make
the one-line message name the exact field. msgspec would also do; pydantic's constrained
types (`Annotated[..., Field(...)]`) read as the spec in docs/format.md does.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import field
from typing import Annotated, Any

from pydantic import AfterValidator, ConfigDict, Field, TypeAdapter
from pydantic import ValidationError as PydanticError
from pydantic.dataclasses import dataclass
from typing_extensions import NotRequired, TypedDict

from pspctl.errors import FormatError, MismatchError
from pspctl.types import Kind, Role

__all__ = [
    "FORMAT_VERSION",
    "Header",
    "needed_version",
    "variant_name",
    "TensorMeta",
    "check_label",
    "check_labels",
    "safe_label",
    "parse_header",
    "stored_names",
]

FORMAT_VERSION = 3  # the newest version this pspctl reads (1, 2 and 3) and writes
# A file is written as the oldest version that holds it (`needed_version`): 2, or 3 for a
# merge of HF folders whose non-weight files differ per context (`hf.files[].per_context`).
SUPERPOSED, STACKED, CONTEXTS = "superposed/", "stacked/", "contexts/"
BASE, SHARED = "base/", "shared/"
FILES = "files/"  # v2: a Hugging Face folder's small non-weight files, as uint8 bytes (see `hf`)
MAX_CONTEXTS = 4096
MAX_LABEL = 100

KINDS = tuple(k.value for k in Kind)
ROLES = tuple(r.value for r in Role)
DTYPES = (
    "float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2",
    "int64", "int32", "int16", "int8", "uint8", "bool", "complex64",
)  # fmt: skip
FLOATING = ("float64", "float32", "float16", "bfloat16")
_LABEL = re.compile(r"[^\x00-\x1f\x7f/\\:*?\"<>|]+")


def check_label(label: str) -> str:
    """`label` if it is safe as a file name in any output directory; ValueError otherwise.

    Labels become file names (`extract --context all`), so: no path separators, no
    characters Windows forbids, no control characters, no leading dot, dash or space, no
    trailing dot or space, at most 100 characters.

    >>> check_label("digits_3")
    'digits_3'
    """
    if not label:
        raise ValueError("a label must not be empty")
    if len(label) > MAX_LABEL:
        raise ValueError(f"label {label[:20]!r}…: longer than {MAX_LABEL} characters")
    if not _LABEL.fullmatch(label):
        raise ValueError(
            f'label {label!r}: a label is a file name, without / \\ : * ? " < > | or control characters'
        )
    if label[0] in ".- " or label[-1] in ". ":
        raise ValueError(
            f"label {label!r}: must not start with '.', '-' or a space, nor end with '.' or a space"
        )
    return label


def safe_label(name: str) -> str:
    """A label made from a file name: unsafe characters become '_', leading dots and dashes go.

    >>> safe_label(".hidden model:v2")
    'hidden model_v2'
    """
    label = "".join(c if _LABEL.fullmatch(c) else "_" for c in name).lstrip(".- ").rstrip(". ")
    return label[:MAX_LABEL] or "model"


def check_labels(labels: Sequence[str], num_contexts: int | None = None) -> list[str]:
    """`labels` as a list if each is safe (`check_label`) and all are unique, also ignoring case
    (`A` and `a` would be one file on macOS and Windows).

    Raises:
        MismatchError: a label is unsafe, two collide, or there are not `num_contexts` of them.
    """
    labels = list(labels)
    if num_contexts is not None and len(labels) != num_contexts:
        raise MismatchError(f"{len(labels)} labels for {num_contexts} contexts")
    try:
        for label in labels:
            check_label(label)
    except ValueError as e:
        raise MismatchError(str(e)) from None
    seen: dict[str, str] = {}
    for label in labels:
        if label.casefold() in seen:
            raise MismatchError(
                f"labels {seen[label.casefold()]!r} and {label!r} collide; labels must be unique"
            )
        seen[label.casefold()] = label
    return labels


def _one_of(allowed: tuple[str, ...]):
    def check(value: str) -> str:
        if value not in allowed:
            raise ValueError(f"{value[:40]!r} is not one of {', '.join(allowed)}")
        return value

    return AfterValidator(check)


Label = Annotated[str, AfterValidator(check_label)]
KindName = Annotated[str, _one_of(KINDS)]
RoleName = Annotated[str, _one_of(ROLES)]
DTypeName = Annotated[str, _one_of(DTYPES)]
Count = Annotated[int, Field(ge=1, le=MAX_CONTEXTS)]
_CONFIG = ConfigDict(strict=True, extra="ignore")  # docs/format.md: readers ignore unknown fields


class InputRecord(TypedDict):
    """One input checkpoint: where it was, its sha256 (docs/format.md), its label."""

    __pydantic_config__ = _CONFIG  # type: ignore[misc]

    path: str
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    label: Label


def _input_record(record: dict[str, Any]) -> dict[str, Any]:
    return dict(_INPUT.validate_python(record, strict=True))


_INPUT = TypeAdapter(InputRecord)


class BaseRecord(TypedDict):
    """What superposed tensors are centred on (format v2): the inputs' mean, or a checkpoint.

    A linked base is not stored: its tensors are read from `path`, whose sha256 must match.
    """

    __pydantic_config__ = _CONFIG  # type: ignore[misc]

    source: Annotated[str, _one_of(("mean", "checkpoint"))]
    path: str | None
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] | None
    linked: bool


def _base_record(record: dict[str, Any]) -> dict[str, Any]:
    record = dict(_BASE.validate_python(record, strict=True))
    if record["linked"] and (record["source"] != "checkpoint" or not record["path"] or not record["sha256"]):
        raise ValueError("a linked base must be a checkpoint with a path and a sha256")
    return record


_BASE = TypeAdapter(BaseRecord)


class FileVariant(TypedDict):
    """One context's own version of a non-weight file (format v3, `hf.files[].per_context`)."""

    __pydantic_config__ = _CONFIG  # type: ignore[misc]

    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class FileRecord(TypedDict):
    """One non-weight file of the first input folder (format v2, `hf.files`): stored as
    `files/<name>` (uint8) when `stored`, else only recorded and copied from `hf.source`.
    v3: `per_context`, each context's version where the inputs' files differ; a version
    other than the first's is stored as `files/<k>/<name>`."""

    __pydantic_config__ = _CONFIG  # type: ignore[misc]

    name: Label
    size: Annotated[int, Field(ge=0)]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]
    stored: bool
    per_context: NotRequired[list[FileVariant]]


class HFRecord(TypedDict):
    """The inputs were Hugging Face model folders (format v2): the first one's path, its
    non-weight files, and the merge's predicted output error per context (for the model card)."""

    __pydantic_config__ = _CONFIG  # type: ignore[misc]

    source: str
    files: list[FileRecord]
    predicted_error: list[float]


def _hf_record(record: dict[str, Any]) -> dict[str, Any]:
    record = dict(_HF.validate_python(record, strict=True))
    names = [f["name"] for f in record["files"]]
    if len(set(names)) != len(names):
        raise ValueError("hf.files names a file twice")
    for f in record["files"]:
        variants = f.get("per_context")
        if variants is not None and not (f["stored"] and variants and variants[0]["sha256"] == f["sha256"]):
            raise ValueError(f"hf.files {f['name']}: per_context needs a stored file, the first context's")
    return record


def variant_name(name: str, k: int) -> str:
    """The stored name (under `files/`) of context `k`'s own version of non-weight file `name`."""
    return f"{k}/{name}"


def needed_version(header: Header) -> int:
    """The oldest format version that holds `header`: 3 with per-context non-weight files, else 2."""
    return 3 if any("per_context" in f for f in (header.hf or {}).get("files", [])) else 2


_HF = TypeAdapter(HFRecord)


@dataclass(frozen=True, config=_CONFIG)
class TensorMeta:
    role: RoleName
    dtype: DTypeName  # the original dtype, restored on extraction
    shape: list[Annotated[int, Field(ge=0)]]
    fan_in: Annotated[int, Field(ge=0)] = 1  # 0 for a zero-size tensor
    reason: str = ""
    centred: bool = False  # v2, superposed only: the superposed sum is of deltas from the base
    error: float | None = None  # v2: the predicted relative output error per context, at merge time
    fan_in_axis: Annotated[int, Field(ge=0)] | None = None  # v2: the fan-in axis; None: every dim but 0


@dataclass(config=_CONFIG)
class Header:
    """Everything in the file besides the tensors. Serialised as JSON in the safetensors metadata."""

    kind: KindName
    seed: int
    num_contexts: Count
    labels: list[Label]
    tensors: dict[str, TensorMeta]
    inputs: list[Annotated[dict[str, Any], AfterValidator(_input_record)]] = field(default_factory=list)
    recipe: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # later steps, e.g. tune
    format_version: Annotated[int, Field(ge=1, le=FORMAT_VERSION)] = 2  # writers set `needed_version`
    pspctl_version: str = ""
    base: Annotated[dict[str, Any], AfterValidator(_base_record)] | None = None  # v2
    tied: dict[str, str] = field(default_factory=dict)  # v2: alias -> the stored tensor it shares
    hf: Annotated[dict[str, Any], AfterValidator(_hf_record)] | None = None  # v2: HF folder inputs

    def __post_init__(self) -> None:
        check_labels(self.labels, self.num_contexts)
        if self.inputs and [i["label"] for i in self.inputs] != self.labels:
            raise MismatchError(f"{len(self.inputs)} input records whose labels are not the header's labels")

    def to_json(self) -> str:
        # The v2 fields added later are left out at their defaults, so that files which use
        # none of them keep their bytes (the golden files pin them).
        exclude: dict[str, Any] = {
            "tensors": {n: {"fan_in_axis"} for n, m in self.tensors.items() if m.fan_in_axis is None}
        }
        if self.hf is None:  # written only when there is one: other files keep their bytes
            exclude["hf"] = True
        if not self.tied:
            exclude["tied"] = True
        return _ADAPTER.dump_json(self, exclude=exclude).decode()


_ADAPTER = TypeAdapter(Header)


def parse_header(text: str | bytes) -> Header:
    """The header in `text`, fully type-checked and consistent with itself.

    Raises:
        FormatError: one line naming the first problem.
    """
    try:
        return _ADAPTER.validate_json(text)
    except PydanticError as e:
        err = e.errors(include_url=False)[0]
        where = "".join(f"{p}: " if i == len(err["loc"]) - 1 else f"{p}." for i, p in enumerate(err["loc"]))
        raise FormatError(f"corrupt pspctl header: {where}{_one_line(err['msg'])}") from None
    except MismatchError as e:  # raised by __post_init__
        raise FormatError(f"corrupt pspctl header: {e}") from None


def _one_line(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stored_names(name: str, meta: TensorMeta, *, linked: bool = False) -> list[str]:
    """The names under which original tensor `name` is stored (a linked base stores none)."""
    if meta.role == "superposed":
        return [SUPERPOSED + name, CONTEXTS + name] + ([BASE + name] if meta.centred and not linked else [])
    return [SHARED + name] if meta.role == "shared" else [STACKED + name]


def expected_tensors(header: Header) -> dict[str, tuple[list[int], tuple[str, ...]]]:
    """Every stored tensor the header implies: name -> (shape, allowed dtypes)."""
    K = header.num_contexts
    complex_kind = header.kind in ("complex", "onepower")
    out: dict[str, tuple[list[int], tuple[str, ...]]] = {}
    linked = bool(header.base and header.base["linked"])
    for name, meta in header.tensors.items():
        if meta.role == "per_context":
            out[STACKED + name] = ([K, *meta.shape], (meta.dtype,))
            continue
        if meta.role == "shared":
            out[SHARED + name] = (list(meta.shape), (meta.dtype,))
            continue
        if meta.centred and not linked:
            out[BASE + name] = (list(meta.shape), (meta.dtype,))
        M = meta.fan_in
        out[SUPERPOSED + name] = ([*meta.shape, 2] if complex_kind else list(meta.shape), FLOATING)
        out[CONTEXTS + name] = {
            "binary": ([K, -(-M // 8)], ("uint8",)),
            "complex": ([K, M], ("float32",)),
            "onepower": ([M], ("float32",)),
            "rotation": ([K, M, M], ("float32",)),
        }[header.kind]
    for record in (header.hf or {}).get("files", []):
        if record["stored"]:
            out[FILES + record["name"]] = ([record["size"]], ("uint8",))
        for k, v in enumerate(record.get("per_context", [])):
            if v["sha256"] != record["sha256"]:
                out[FILES + variant_name(record["name"], k)] = ([v["size"]], ("uint8",))
    return out


def check_header(header: Header, metadata_version: str) -> None:
    """What the schema cannot say: per-tensor consistency and the version's agreement.

    Raises:
        FormatError: the first problem.
    """
    if str(header.format_version) != metadata_version:
        raise FormatError(
            f"corrupt pspctl header: format_version {header.format_version} but the file says {metadata_version}"
        )
    v1 = header.format_version == 1
    if v1 and (
        header.base is not None or any(m.role == "shared" or m.centred for m in header.tensors.values())
    ):
        raise FormatError("corrupt pspctl header: format version 1 has no base and no shared tensors")
    if v1 and header.tied:
        raise FormatError("corrupt pspctl header: format version 1 has no tied tensors")
    for alias, name in header.tied.items():
        if alias in header.tensors or name not in header.tensors:
            raise FormatError(
                f"corrupt pspctl header: tied {alias} -> {name}: not an alias of a stored tensor"
            )
    if v1 and header.hf is not None:
        raise FormatError("corrupt pspctl header: format version 1 records no Hugging Face folder")
    for record in (header.hf or {}).get("files", []):
        if "per_context" in record and header.format_version < 3:
            raise FormatError(
                f"corrupt pspctl header: format version {header.format_version} has no per-context files"
            )
        if len(record.get("per_context", [None] * header.num_contexts)) != header.num_contexts:
            raise FormatError(
                f"corrupt pspctl header: hf.files {record['name']}: per_context does not list {header.num_contexts} contexts"
            )
    for name, meta in header.tensors.items():
        if meta.fan_in_axis is not None and meta.fan_in_axis >= len(meta.shape):
            raise FormatError(
                f"corrupt pspctl header: {name}: fan_in_axis {meta.fan_in_axis} does not fit shape {meta.shape}"
            )
        if meta.centred and (meta.role != "superposed" or header.base is None):
            raise FormatError(
                f"corrupt pspctl header: {name} is centred but {'not superposed' if header.base else 'there is no base'}"
            )
        if meta.role != "superposed":
            continue
        if meta.dtype not in FLOATING:
            raise FormatError(f"corrupt pspctl header: {name} is superposed but its dtype is {meta.dtype}")
        M = math.prod(meta.shape[1:]) if meta.fan_in_axis is None else meta.shape[meta.fan_in_axis]
        if len(meta.shape) < 2 or meta.fan_in != M:
            raise FormatError(
                f"corrupt pspctl header: {name}: fan_in {meta.fan_in} does not fit shape {meta.shape}"
            )


def check_tensors(header: Header, stored: Mapping[str, tuple[list[int], str]]) -> None:
    """The stored tensors are exactly those the header implies, with their shapes and dtypes.

    Args:
        stored: name -> (shape, dtype name) as the safetensors header gives them.

    Raises:
        FormatError: the first missing, unlisted, misshapen or mistyped tensor.
    """
    expected = expected_tensors(header)
    for name, (shape, dtypes) in expected.items():
        if name not in stored:
            raise FormatError(f"header lists a tensor the file lacks: {name}")
        got_shape, got_dtype = stored[name]
        if list(got_shape) != shape:
            raise FormatError(f"{name}: stored shape {list(got_shape)}, the header implies {shape}")
        if got_dtype not in dtypes:
            raise FormatError(f"{name}: stored dtype {got_dtype}, the header implies {' or '.join(dtypes)}")
    unlisted = [n for n in stored if n not in expected]
    if unlisted:
        raise FormatError(f"tensors the header does not list: {', '.join(sorted(unlisted)[:3])}")
