"""`extract`: models back out of a superposed file as plain state_dicts."""

from __future__ import annotations

from pathlib import Path

from pspctl.checkpoints import save_state_dict
from pspctl.fileformat import SuperposedFile
from pspctl.outputs import staged_folder

__all__ = ["extract", "plan_outputs"]


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
    fmt: str = "safetensors",
    force: bool = False,
) -> list[Path]:
    """Write model `context` (an index, a label, or "all") as a plain state_dict.

    With `context="all"`, `output` is a directory and one `<label>.<fmt>` file is written per
    context, all or none: they are staged and moved into place only when every one is written.
    Returns the paths written.

    Raises:
        ContextError: unknown label or index out of range.
        OutputError: an output exists (without `force`), is the input file, or "all" was
            given a file.
    """
    file = SuperposedFile(path)
    output = Path(output)
    targets = plan_outputs(file, context, output, f".{fmt}")
    if str(context) != "all":
        [(k, target)] = targets
        save_state_dict(file.state_dict(k), target, force=force, inputs=[file.path])
        return [target]
    names = [t.name for _, t in targets]
    with staged_folder(output, names, force=force, inputs=[file.path]) as staging:
        for k, target in targets:
            save_state_dict(file.state_dict(k), staging / target.name)
    return [t for _, t in targets]
