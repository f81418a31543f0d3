"""`extract`: models back out of a superposed file as plain state_dicts."""

from __future__ import annotations

from pathlib import Path

from pspctl.checkpoints import save_state_dict
from pspctl.errors import OutputError
from pspctl.fileformat import SuperposedFile

__all__ = ["extract"]


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
    if str(context) == "all":
        if output.exists() and not output.is_dir():
            raise OutputError(f"{output}: is a file; --context all needs a directory")
        targets = [(k, output / f"{label}.{fmt}") for k, label in enumerate(file.labels)]
        for _, target in targets:  # refuse before writing anything
            if target.exists() and not force:
                raise OutputError(f"{target}: already exists (pass --force to overwrite)")
        output.mkdir(parents=True, exist_ok=True)
    else:
        targets = [(file.resolve_context(context), output)]
    for k, target in targets:
        save_state_dict(file.state_dict(k), target, force=force)
    return [t for _, t in targets]
