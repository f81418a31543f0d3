"""`extract`: models back out of a superposed file as plain state_dicts."""

from __future__ import annotations

from pathlib import Path

from pspctl.checkpoints import refuse_existing, save_state_dict
from pspctl.errors import OutputError
from pspctl.fileformat import SuperposedFile

__all__ = ["extract", "plan_outputs"]


def plan_outputs(
    file: SuperposedFile, context: int | str, output: Path, suffix: str
) -> list[tuple[int, Path]]:
    """(context index, path) to write: one `<label><suffix>` per context in directory `output`
    for `context="all"`, else the one resolved context at `output`.

    Raises:
        ContextError: unknown label or index out of range.
        OutputError: "all" was given an existing file.
    """
    if str(context) == "all":
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output}: is a file; --context all needs a directory")
        return [(k, output / f"{label}{suffix}") for k, label in enumerate(file.labels)]
    return [(file.resolve_context(context), output)]


def extract(
    path: str | Path,
    context: int | str,
    output: str | Path,
    *,
    fmt: str = "safetensors",
    force: bool = False,
) -> list[Path]:
    """Write model `context` (an index, a label, or "all") as a plain state_dict.

    With `context="all"`, `output` is a directory and one `<label>.<fmt>` file is written per
    context. Returns the paths written.

    Raises:
        ContextError: unknown label or index out of range.
        OutputError: the output exists (without `force`), or "all" was given a file.
    """
    file = SuperposedFile(path)
    output = Path(output)
    targets = plan_outputs(file, context, output, f".{fmt}")
    if str(context) == "all":
        for _, target in targets:  # refuse before writing anything
            refuse_existing(target, force=force)
        output.mkdir(parents=True, exist_ok=True)
    for k, target in targets:
        save_state_dict(file.state_dict(k), target, force=force)
    return [t for _, t in targets]
