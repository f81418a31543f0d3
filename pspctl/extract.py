"""`extract`: models back out of a superposed file as plain state_dicts, or as Hugging Face
model folders when the inputs were HF folders (see `pspctl.hf`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor

from pspctl.checkpoints import save_state_dict
from pspctl.digests import SUFFIXES, sha256_file
from pspctl.errors import InputError, OutputError
from pspctl.fileformat import SuperposedFile
from pspctl.hf import folder_names, write_folder
from pspctl.outputs import staged_folder, write_safetensors_sharded
from pspctl.sources import files_read
from pspctl.types import Progress

__all__ = ["default_format", "extract", "plan_outputs"]


def default_format(file: SuperposedFile, context: int | str, output: Path) -> str:
    """`hf` for a merge of HF folders, unless one context goes to a state_dict file name
    (`-o out.safetensors`, `-o out.pt`); `safetensors` otherwise."""
    if file.header.hf is not None and (str(context) == "all" or output.suffix not in SUFFIXES):
        return "hf"
    return "safetensors"


def plan_outputs(
    file: SuperposedFile, context: int | str, output: Path, suffix: str
) -> list[tuple[int, Path]]:
    """(context index, path) to write: one `<label><suffix>` per context in directory `output`
    for `context="all"`, else the one resolved context at `output`. Labels are safe file
    names (the header is checked when the file is opened), so every path is inside `output`.

    Raises:
        ContextError: unknown label or index out of range.
    """
    if str(context) == "all":
        return [(k, output / f"{label}{suffix}") for k, label in enumerate(file.labels)]
    return [(file.resolve_context(context), output)]


def extract(
    path: str | Path,
    context: int | str,
    output: str | Path,
    *,
    fmt: str | None = None,
    force: bool = False,
    base: str | Path | None = None,
    max_shard_size: int | str | None = None,
    progress: Progress | None = None,
) -> list[Path]:
    """Write model `context` (an index, a label, or "all") as a plain state_dict, or with
    `fmt="hf"` (the default for a merge of HF folders, see `default_format`) as a Hugging Face
    model folder `output` (for "all": one folder per context in `output`), its weights sharded
    above `max_shard_size` (default transformers' 50GB).

    With `context="all"`, `output` is a directory and one `<label>.<fmt>` file (or `<label>/`
    folder) is written per context, all or none: they are staged and moved into place only
    when every one is written. Returns the paths written. With `max_shard_size` and a
    state_dict format (safetensors only), each model is written as shards of at most that size
    and their index, the Hugging Face layout. `progress(done, total, label)` is called after
    each context is written.

    Raises:
        ContextError: unknown label or index out of range.
        OutputError: an output exists (without `force`), is the input file, or "all" was
            given a file.
        InputError, MismatchError: a linked base that is missing, or another than merged on
            (`base` names where it is, when not at its recorded path).
    """
    file = SuperposedFile(path, base=base)
    output = Path(output)
    if file.linked:
        file.linked_base()  # there, and the one merged on: checked before any work
    sources = files_read(file)  # nor an original: a retrieval must never replace the exact model
    fmt = fmt or default_format(file, context, output)
    tick = progress or (lambda done, total, item: None)
    if fmt == "hf":
        return _extract_hf(
            file, context, output, force=force, sources=sources, max_shard_size=max_shard_size, tick=tick
        )
    if max_shard_size is not None and fmt != "safetensors":
        raise OutputError(f"--max-shard-size writes safetensors shards, not {fmt}")
    targets = plan_outputs(file, context, output, f".{fmt}")
    if str(context) != "all":
        [(k, target)] = targets
        written = _save(file.state_dict(k), target, max_shard_size, force=force, inputs=sources)
        tick(1, 1, file.labels[k])
        return written
    names = [t.name for _, t in targets]
    written = []
    with staged_folder(output, names, force=force, inputs=sources) as staging:
        for i, (k, target) in enumerate(targets):
            files = _save(file.state_dict(k), staging / target.name, max_shard_size)
            written += [output / f.name for f in files]
            tick(i + 1, len(targets), file.labels[k])
    return written


def _extract_hf(
    file: SuperposedFile,
    context: int | str,
    output: Path,
    *,
    force: bool,
    sources: list[Path],
    max_shard_size: int | str | None,
    tick: Progress,
) -> list[Path]:
    """Write HF model folders (see `pspctl.hf.write_folder`), all or none."""
    if file.header.hf is None:
        raise InputError(
            f"{file.path}: records no Hugging Face folder (its inputs were not HF model folders); "
            "use --format safetensors or pt"
        )
    folder_names(file, max_shard_size)  # a bad size fails before any work
    digest = sha256_file(file.path)
    if str(context) != "all":
        k = file.resolve_context(context)
        names = folder_names(file, max_shard_size)
        with staged_folder(output, names, force=force, inputs=sources) as staging:
            write_folder(file, k, staging, sha256=digest, max_shard_size=max_shard_size)
        tick(1, 1, file.labels[k])
        return [output]
    targets = plan_outputs(file, context, output, "")
    with staged_folder(output, [t.name for _, t in targets], force=force, inputs=sources) as staging:
        for i, (k, target) in enumerate(targets):
            (staging / target.name).mkdir()
            write_folder(file, k, staging / target.name, sha256=digest, max_shard_size=max_shard_size)
            tick(i + 1, len(targets), file.labels[k])
    return [t for _, t in targets]


def _save(
    state: dict[str, Tensor],
    path: Path,
    max_shard_size: int | str | None,
    *,
    force: bool = False,
    inputs: Sequence[Path] = (),
) -> list[Path]:
    """Write one model: one file, or shards and their index; returns the files written."""
    if max_shard_size is None:
        save_state_dict(state, path, force=force, inputs=inputs)
        return [path]
    if path.suffix != ".safetensors":
        raise OutputError(f"{path}: --max-shard-size writes safetensors shards; name it *.safetensors")
    return write_safetensors_sharded(
        state, path, {"format": "pt"}, max_shard_size=max_shard_size, force=force, inputs=inputs
    )
