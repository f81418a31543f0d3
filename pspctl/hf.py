"""Hugging Face model folders: what `merge` records of them, what `extract` writes back, and the
task `analyze`, `export` and `tune` use for them when there is no task file.

An HF folder is a directory with a `config.json` beside its weights. `merge` records the first
input folder's non-weight files (config, generation config, tokenizer files, chat template…)
by name, size and sha256, and stores each one up to `MAX_STORED_FILE` bytes in the superposed
file (`files/<name>`, uint8), so extraction does not need the input folders. A larger file is
only recorded: extraction copies it from the recorded folder if its sha256 still matches and
fails otherwise (an incomplete model folder is worse than none).

transformers (`pip install 'pspctl[hf]'`) is imported only where a model is built from a config.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pspctl.digests import candidates, sha256_file
from pspctl.dtypes import itemsize
from pspctl.errors import InputError, MismatchError, PspctlError, listed, one_line
from pspctl.fileformat import SuperposedFile, SuperposedWriter
from pspctl.header import check_label, variant_name
from pspctl.outputs import parse_size, plan_shards, shard_name, write_safetensors
from pspctl.task import Signature, Task

__all__ = [
    "INSTALL_HINT",
    "LABEL_KEYS",
    "MAX_SHARD_SIZE",
    "MAX_STORED_FILE",
    "WEIGHTS",
    "hf_task",
    "check_configs",
    "differing_files",
    "is_hf_folder",
    "non_weight_files",
    "shard_plan",
    "record_folder",
    "require_transformers",
    "write_folder",
]

MAX_STORED_FILE = 10 * 2**20  # bytes: a non-weight file up to this is stored in the superposed file
WEIGHTS = "model.safetensors"
CARD = "README.md"  # written by extract; the input's own model card is not carried over
INSTALL_HINT = "building a Hugging Face model from config.json needs transformers: pip install 'pspctl[hf]'"
# Files that hold weights (any format) or their index: never copied as non-weight files.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")
_WEIGHT_ENDINGS = (".index.json", ".pth.tar")


def is_hf_folder(path: str | Path) -> bool:
    """Whether `path` is a directory holding a `config.json` (a Hugging Face model folder)."""
    return Path(path).is_dir() and (Path(path) / "config.json").is_file()


def non_weight_files(folder: Path) -> list[Path]:
    """The files of `folder` to carry to every extracted model, sorted by name: everything at its
    top level but weights, weight indexes, hidden files and its model card (README.md)."""
    out = []
    for p in sorted(folder.iterdir()):
        name = p.name
        if not p.is_file() or name.startswith(".") or name == CARD:
            continue
        if name.endswith(_WEIGHT_SUFFIXES) or name.endswith(_WEIGHT_ENDINGS):
            continue
        out.append(p)
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# What a folder's config.json says about where it came from, not about the model.
_ORIGIN_KEYS = ("_name_or_path", "transformers_version")
# What it says about the task, not the computation: fine-tunes of one parent on different
# tasks differ here, and each context keeps its own config.json (format v3, `per_context`).
LABEL_KEYS = ("id2label", "label2id", "finetuning_task", "problem_type")


def check_configs(folders: Sequence[Path]) -> None:
    """The folders must build the same model: `analyze`, `export` and `tune` build every
    context from the first's config.json. Their configs may differ only in where they came
    from (`_ORIGIN_KEYS`) and in their task's labels (`LABEL_KEYS`); each context's own
    config.json is kept (`record_folder`).

    Raises:
        MismatchError: a config.json that differs from the first's in another key, naming the
            first keys that differ with both values.
        InputError: a config.json that is not a JSON object.
    """
    first = _config(folders[0])
    for folder in folders[1:]:
        other = _config(folder)
        labels = [k for k in LABEL_KEYS if first.get(k) != other.get(k)]
        large = [
            d / "config.json"
            for d in (folders[0], folder)
            if (d / "config.json").stat().st_size > MAX_STORED_FILE
        ]
        if labels and large:  # kept per context only when stored (`record_folder`)
            raise MismatchError(
                f"{folder}/config.json differs from {folders[0]}'s in {', '.join(labels)}, but "
                f"{large[0]} is over the {MAX_STORED_FILE / 2**20:.3g} MiB pspctl stores, so it cannot be kept per "
                "context; merge their weight files instead and keep each config yourself"
            )
        keys = sorted(
            k
            for k in first.keys() | other.keys()
            if k not in _ORIGIN_KEYS + LABEL_KEYS and first.get(k) != other.get(k)
        )
        if keys:
            shown = "; ".join(f"{k} {_brief(other.get(k))}, not {_brief(first.get(k))}" for k in keys[:3])
            raise MismatchError(
                f"{folder}/config.json differs from {folders[0]}'s ({shown}{'; …' if len(keys) > 3 else ''}): "
                "pspctl builds every context from one config.json (only the labels, "
                f"{', '.join(LABEL_KEYS)}, may differ); merge folders whose configs agree "
                "(or their weight files, keeping each config)"
            )


def encoder_decoder_tables(folder: Path) -> tuple[str, ...]:
    """The token table of an encoder-decoder folder (T5, BART, Pegasus, Marian): its
    `embed_tokens` are tied aliases that save_pretrained drops, keeping `shared.weight`
    (`model.shared.weight`), a name no embedding pattern can claim in other models (a
    multi-task net's `shared` trunk is a Linear)."""
    return ("shared.weight", "*.shared.weight") if _config(folder).get("is_encoder_decoder") else ()


def differing_files(folders: Sequence[Path], record: Mapping[str, Any]) -> list[str]:
    """A warning for each non-weight file of the first folder (`record_folder`'s `record` of
    it) that another folder lacks, or holds otherwise where it could not be kept per context
    (over `MAX_STORED_FILE`): every extracted model gets the first's. And one for the files
    a later folder holds that the first lacks: they are not carried."""
    warnings = []
    recorded = {f["name"] for f in record["files"]}
    for folder in folders[1:]:  # files the first folder lacks are not carried at all
        extra = [p.name for p in non_weight_files(folder) if p.name not in recorded]
        if extra:
            warnings.append(
                f"{listed(extra)} of {folder} not in {folders[0]}: no extracted model gets "
                f"{'it' if len(extra) == 1 else 'them'}"
            )
    for f in record["files"]:
        if "per_context" in f or f["name"] == "config.json":  # check_configs judges configs
            continue
        others = [
            d
            for d in folders[1:]
            if not (d / f["name"]).is_file() or sha256_file(d / f["name"]) != f["sha256"]
        ]
        if others:
            warnings.append(
                f"{f['name']} of {listed([str(d) for d in others])} differs from {folders[0]}'s (or is missing); "
                f"every extracted model gets {folders[0]}'s"
            )
    return warnings


def _config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{folder}/config.json: cannot be read as JSON ({one_line(e)})") from None
    if not isinstance(config, dict):
        raise InputError(f"{folder}/config.json: not a JSON object")
    return config


def _brief(value: Any, limit: int = 40) -> str:
    text = json.dumps(value) if value is not None else "absent"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def record_folder(
    folders: Sequence[Path],
    writer: SuperposedWriter,
    *,
    source: str | None = None,
    max_stored: int | None = None,
) -> dict[str, Any]:
    """Record the first folder's non-weight files for the header's `hf` entry, storing the
    small ones in `writer`. A small file that every folder holds, but not all alike (each
    fine-tune's config.json with its own labels, say), is kept per context: the record lists
    each context's size and sha256 (`per_context`) and the versions other than the first's
    are stored as `variant_name(name, k)`. Returns the record (its `predicted_error` is filled
    in by merge); `source`: how the record names the first folder (default: as given).

    Raises:
        InputError: a file cannot be read, or its name is not a safe file name.
    """
    limit = MAX_STORED_FILE if max_stored is None else max_stored
    files = []
    for path in non_weight_files(folders[0]):
        try:
            check_label(path.name)
        except ValueError as e:
            raise InputError(f"{path}: cannot be carried to the extracted folders ({e})") from None
        record: dict[str, Any] = {"name": path.name}
        try:
            size = path.stat().st_size
            stored = size <= limit
            data = path.read_bytes() if stored else b""
            record.update(size=size, sha256=_sha256(data) if stored else sha256_file(path), stored=stored)
            versions = (_versions(folders, path.name, limit) or []) if stored else []
        except OSError as e:
            raise InputError(f"{e.filename or path}: cannot be read ({e.strerror or e})") from None
        if stored:
            writer.add_file(path.name, data)
        digests = [_sha256(v) for v in versions]
        if len(set(digests)) > 1:
            record["per_context"] = [
                {"size": len(v), "sha256": d} for v, d in zip(versions, digests, strict=True)
            ]
            for k, (v, d) in enumerate(zip(versions, digests, strict=True)):
                if d != record["sha256"]:
                    writer.add_file(variant_name(path.name, k), v)
        files.append(record)
    first = source if source is not None else str(folders[0])
    return {"source": first, "files": files, "predicted_error": []}


def _versions(folders: Sequence[Path], name: str, limit: int) -> list[bytes] | None:
    """Each folder's bytes of file `name`; None if one lacks it or holds more than `limit`
    bytes, and for a config.json whose versions differ only where they came from
    (`_ORIGIN_KEYS`): the first's serves every context, as before format v3."""
    paths = [d / name for d in folders]
    if not all(p.is_file() and p.stat().st_size <= limit for p in paths):
        return None
    if name == "config.json":
        first = _config(folders[0])
        if all(first.get(k) == _config(d).get(k) for d in folders[1:] for k in LABEL_KEYS):
            return None
    return [p.read_bytes() for p in paths]


def _source_folder(sf: SuperposedFile) -> Path | None:
    """The recorded first input folder, looked for as the originals are (`candidates`)."""
    return next((p for p in candidates((sf.header.hf or {})["source"], sf.path.parent) if p.is_dir()), None)


def file_bytes(sf: SuperposedFile, record: Mapping[str, Any], k: int | None = None) -> bytes:
    """A recorded non-weight file's bytes: stored in `sf`, or read from the recorded input
    folder. With `k`: context k's own version where the file is kept per context (v3).

    Raises:
        InputError: a stored file that does not match its sha256; a large file whose input
            folder is gone. MismatchError: a large file whose sha256 changed.
    """
    name = record["name"]
    variants = record.get("per_context")
    if k is not None and variants and variants[k]["sha256"] != record["sha256"]:
        return _checked(sf, variant_name(name, k), variants[k]["sha256"])
    if record["stored"]:
        return _checked(sf, name, record["sha256"])
    folder = _source_folder(sf)
    path = None if folder is None else folder / name
    if path is None or not path.is_file():
        raise InputError(
            f"{sf.path}: {name} ({record['size']} bytes, over the {MAX_STORED_FILE >> 20} MiB stored in the file) "
            f"is not in the input folder {sf.header.hf['source']} any more; put it back there"  # type: ignore[index]
        )
    data = path.read_bytes()
    if _sha256(data) != record["sha256"]:
        raise MismatchError(
            f"{path}: changed since the merge (sha256 differs); extraction needs the original"
        )
    return data


def _checked(sf: SuperposedFile, stored: str, sha256: str) -> bytes:
    data = sf.file(stored)
    if _sha256(data) != sha256:
        raise InputError(
            f"{sf.path}: stored file {stored} does not match its recorded sha256: the file is corrupted"
        )
    return data


MAX_SHARD_SIZE = "50GB"  # transformers' save_pretrained default
INDEX = "model.safetensors.index.json"


def shard_plan(sf: SuperposedFile, max_shard_size: int | str | None = None) -> dict[str, list[str]]:
    """Weight file name -> the tensor names it holds: one `model.safetensors`, or shards of at
    most `max_shard_size` bytes each (a larger tensor gets a shard of its own), named and
    indexed as transformers names them."""
    limit = parse_size(MAX_SHARD_SIZE if max_shard_size is None else max_shard_size)
    sizes = {name: math.prod(meta.shape) * itemsize(meta.dtype) for name, meta in sf.metas.items()}
    shards = plan_shards(sizes, limit)
    if len(shards) == 1:
        return {WEIGHTS: shards[0]}
    return {shard_name(WEIGHTS, i, len(shards)): names for i, names in enumerate(shards)}


def _write_weights(sf: SuperposedFile, k: int, folder: Path, plan: Mapping[str, list[str]]) -> None:
    """Model `k`'s weights as transformers reads them, one shard in memory at a time (`shard_plan`);
    with several shards, also their index."""
    total = 0
    for file, names in plan.items():
        tensors = {name: sf.retrieve(name, k) for name in names}
        total += sum(t.nbytes for t in tensors.values())
        write_safetensors(tensors, folder / file, {"format": "pt"})
    if len(plan) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {n: f for f, ns in plan.items() for n in ns},
        }
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def folder_names(sf: SuperposedFile, max_shard_size: int | str | None = None) -> list[str]:
    """The files `write_folder` writes, in order."""
    plan = shard_plan(sf, max_shard_size)
    index = [INDEX] if len(plan) > 1 else []
    return [f["name"] for f in (sf.header.hf or {}).get("files", [])] + list(plan) + index + [CARD]


def write_folder(
    sf: SuperposedFile, k: int, folder: Path, *, sha256: str, max_shard_size: int | str | None = None
) -> None:
    """Write model `k` of `sf` into the (empty, staged) `folder` as a Hugging Face model folder:
    its weights (sharded above `max_shard_size`, default transformers' 50GB), the first input
    folder's non-weight files, and a model card.

    Raises:
        InputError, MismatchError: as `file_bytes`; a bad `max_shard_size`.
    """
    for record in (sf.header.hf or {}).get("files", []):
        (folder / record["name"]).write_bytes(file_bytes(sf, record, k))
    _write_weights(sf, k, folder, shard_plan(sf, max_shard_size))
    (folder / CARD).write_text(model_card(sf, k, sha256))


def model_card(sf: SuperposedFile, k: int, sha256: str) -> str:
    """A short README.md saying where model `k` came from."""
    from pspctl import __version__

    h = sf.header
    errors = (h.hf or {}).get("predicted_error") or []
    error = f"{errors[k]:.4g}" if k < len(errors) else "not recorded"
    source = h.inputs[k]["path"] if k < len(h.inputs) else "not recorded"
    return (
        f"# {h.labels[k]}\n\n"
        f"Context {k} (`{h.labels[k]}`) of {h.num_contexts}, extracted by pspctl {__version__} from a "
        "parameter superposition (Cheung et al., 2019). Its weights are a retrieval: close to the original "
        "model, not equal to it.\n\n"
        "| | |\n|---|---|\n"
        f"| superposed file | `{sf.path.name}` |\n"
        f"| its sha256 | `{sha256}` |\n"
        f"| context | {k} (`{h.labels[k]}`) |\n"
        f"| kind | {h.kind} |\n"
        f"| predicted relative output error (at merge) | {error} |\n"
        f"| original model | `{source}` |\n"
        f"| pspctl | {__version__} (made by {h.pspctl_version or 'unknown'}) |\n"
    )


# --- HF models without a task file -------------------------------------------------------------


def require_transformers() -> Any:
    """The transformers module.

    Raises:
        PspctlError: it is not installed; the message names the extra.
    """
    try:
        import transformers
    except ImportError:
        raise PspctlError(INSTALL_HINT) from None
    return transformers


def config_dict(sf: SuperposedFile) -> dict[str, Any]:
    """The recorded config.json of an HF merge.

    Raises:
        InputError: the file records no config.json, or it is not JSON.
    """
    record = next((f for f in (sf.header.hf or {}).get("files", []) if f["name"] == "config.json"), None)
    if record is None:
        raise InputError(f"{sf.path}: records no config.json")
    try:
        config = json.loads(file_bytes(sf, record))
    except ValueError as e:
        raise InputError(f"{sf.path}: its config.json is not JSON ({e})") from None
    if not isinstance(config, dict):
        raise InputError(f"{sf.path}: its config.json is not an object")
    return config


# The Auto class by the suffix of the config's architecture name, first match wins.
_AUTO = (
    ("ForCausalLM", "AutoModelForCausalLM"),
    ("LMHeadModel", "AutoModelForCausalLM"),
    ("ForSequenceClassification", "AutoModelForSequenceClassification"),
    ("ForImageClassification", "AutoModelForImageClassification"),
)


def auto_class_name(config: Mapping[str, Any]) -> str:
    """The transformers Auto class for `config`'s `architectures` (AutoModel if none fits)."""
    for arch in config.get("architectures") or []:
        for suffix, auto in _AUTO:
            if str(arch).endswith(suffix):
                return auto
    return "AutoModel"


def example_inputs(
    config: Mapping[str, Any], batch: int = 2, seq: int = 16, seed: int = 0
) -> tuple[Tensor, ...]:
    """Inputs a model of `config` takes: pixel values for vision, token ids below vocab_size otherwise.

    Seeded: the same config and seed give the same inputs.
    """
    gen = torch.Generator().manual_seed(seed)
    vision = config.get("vision_config") or config
    if _is_vision(config):
        size = vision.get("image_size", 224)
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (torch.randn(batch, vision.get("num_channels", 3), h, w, generator=gen),)
    vocab = int(config.get("vocab_size") or 2)
    limit = config.get("max_position_embeddings") or config.get("n_positions") or seq
    return (torch.randint(0, vocab, (batch, min(seq, int(limit))), generator=gen),)


def _is_vision(config: Mapping[str, Any]) -> bool:
    vision = config.get("vision_config") or config
    return "image_size" in vision or "num_channels" in vision


def text_signature(config: Mapping[str, Any]) -> Signature:
    """What `export` gives a text model's graph (as optimum does): `input_ids` and
    `attention_mask`, any batch and any sequence length up to the model's positions. Traced
    and validated with the second row right-padded, so that the mask is really used."""
    limit = config.get("max_position_embeddings") or config.get("n_positions")

    def inputs() -> tuple[Tensor, ...]:
        (ids,) = example_inputs(config)
        mask = torch.ones_like(ids)
        mask[1, -max(1, ids.shape[1] // 4) :] = 0
        return ids, mask

    axes = {0: "batch", 1: "sequence"}
    return Signature(
        ("input_ids", "attention_mask"), inputs, (axes, axes), {"sequence": int(limit)} if limit else {}
    )


SYNTHETIC_BATCHES = {"train": 32, "test": 4}  # batches of 8 made-up inputs per split (tune)


def hf_task(sf: SuperposedFile, *, synthetic_data: bool = False) -> Task:
    """A Task for an HF merge without a task file: `build_model` makes the model from the
    recorded config.json with transformers' Auto class for its `architectures`; `example_inputs`
    are made from the config. It has no labelled data, so no metrics.

    With `synthetic_data` it also has `load_data(k, split)`: seeded made-up inputs (as
    `example_inputs`, 8 per batch) with no targets, which is enough to distil each context
    towards its original (`tune`); `tune` then measures agreement with the original.

    Raises:
        PspctlError: transformers is missing. InputError: no readable config.json.
    """
    transformers = require_transformers()
    config = config_dict(sf)
    auto = auto_class_name(config)
    arch = next(iter(config.get("architectures") or []), None)
    named = getattr(transformers, arch, None) if isinstance(arch, str) else None
    # The class config.json names (BertForMaskedLM, T5ForConditionalGeneration…), as the
    # folder was saved from; an Auto class only where transformers has no such class.
    cls = named if isinstance(named, type) and issubclass(named, transformers.PreTrainedModel) else None

    text = not _is_vision(config)

    def build_model() -> nn.Module:
        model_type = config.get("model_type")
        if model_type not in transformers.CONFIG_MAPPING:
            raise InputError(f"{sf.path}: config.json has model_type {model_type!r}, unknown to transformers")
        cfg = transformers.CONFIG_MAPPING[model_type].from_dict(config)
        cfg.use_cache = False  # logits only: a KV cache in the outputs is no tensor for export/analyze
        built = cls if cls is not None else type(getattr(transformers, auto).from_config(cfg))
        decoder = bool(getattr(cfg, "is_encoder_decoder", False))  # T5, BART: decoder inputs too
        if decoder or (text and _takes_mask(built)):
            built = _text_fed(built, decoder=decoder)
        return built(cfg).eval()

    def inputs() -> tuple[Tensor, ...]:
        return example_inputs(config)

    def load_data(context: int, split: str) -> list[tuple[Tensor, None]]:
        count = SYNTHETIC_BATCHES.get(split, SYNTHETIC_BATCHES["test"])
        seed = 1 + context * 1000 + (0 if split == "train" else 500)
        return [(example_inputs(config, batch=8, seed=seed + i)[0], None) for i in range(count)]

    return Task(
        source=f"config.json of {sf.path.name} ({auto if cls is None else cls.__name__})",
        build_model=build_model,
        example_inputs=inputs,
        load_data=load_data if synthetic_data else None,
        # The class config.json names takes a mask (an Auto fallback keeps one input).
        signature=text_signature(config) if text and cls is not None and _takes_mask(cls) else None,
    )


def _takes_mask(cls: type[nn.Module]) -> bool:
    return "attention_mask" in inspect.signature(cls.forward).parameters


def _text_fed(cls: type[nn.Module], *, decoder: bool) -> type[nn.Module]:
    """`cls` taking (input_ids, attention_mask=None) positionally, as `export` feeds a text
    model (`text_signature`) and analyze and tune call it with the ids alone. `decoder`: an
    encoder-decoder, fed the token ids as its decoder inputs too. The subclass adds no module,
    so its state_dict is `cls`'s."""

    class TextFed(cls):  # type: ignore[valid-type,misc]
        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Any:
            extra: dict[str, Tensor] = {} if attention_mask is None else {"attention_mask": attention_mask}
            if decoder:
                extra["decoder_input_ids"] = input_ids
            return super().forward(input_ids=input_ids, **extra)

    TextFed.__name__ = TextFed.__qualname__ = cls.__name__
    return TextFed


def hf_paths(paths: Sequence[Path]) -> bool:
    """Whether every input is a Hugging Face folder (then merge records the first one's files)."""
    return bool(paths) and all(is_hf_folder(p) for p in paths)
