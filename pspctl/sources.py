"""Where every command finds what a superposed file was made from: the originals and the task file.

The file's header records the input paths (with their sha256) and the task spec. A recorded
path is tried as recorded, then beside the superposed file (the recorded relative path, then
its basename), so that `analyze`, `tune` and `export` run from another directory find the same
files. A recorded original whose sha256 differs is not used. Explicit arguments override the
header; explicit originals that disagree with the recorded hashes or shapes are an error.

Each command words what it cannot find in its own terms (analyze notes it and skips a part,
`tune --objective distill` and `export` refuse), from the one answer given here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pspctl.checkpoints import Checkpoint, open_checkpoint
from pspctl.digests import candidates, checkpoint_files, locate, sha256_checkpoint
from pspctl.errors import InputError, MismatchError, TaskError, listed
from pspctl.fileformat import SuperposedFile
from pspctl.hf import hf_task
from pspctl.task import Task, load_task

__all__ = [
    "Located",
    "candidates",
    "files_read",
    "find_originals",
    "hf_task",
    "locate_originals",
    "open_originals",
    "recorded_task",
    "require_task",
]


@dataclass
class Located:
    """The recorded originals, found (in context order) or not: what is missing, what changed."""

    paths: list[Path] = field(default_factory=list)
    recorded: bool = True  # False: the header records no (or not K) input paths
    missing: list[str] = field(default_factory=list)  # recorded paths found nowhere
    changed: list[Path] = field(default_factory=list)  # found, but their sha256 differs

    @property
    def found(self) -> bool:
        return self.recorded and not self.missing and not self.changed


def locate_originals(sf: SuperposedFile) -> Located:
    """Find the recorded originals on disk (see the module docstring); opens nothing."""
    recorded = sf.header.inputs
    if len(recorded) != sf.num_contexts:
        return Located(recorded=False)
    out = Located()
    for entry in recorded:
        found = locate(entry["path"], sf.path.parent)
        if found is None:
            out.missing.append(entry["path"])
        elif entry.get("sha256") and sha256_checkpoint(found) != entry["sha256"]:
            out.changed.append(found)
        else:
            out.paths.append(found)
    return out


def files_read(
    sf: SuperposedFile,
    *,
    task: str | Path | None = None,
    originals: Sequence[str | Path] | None = None,
) -> list[Path]:
    """Every file a command on `sf` may read, which none of its outputs may be, even with
    --force (`outputs.refuse_inputs`): the superposed file's own files, its linked base, the
    originals (`originals`, else the recorded ones where found), and the task file (`task`,
    else the recorded one). Extract protects the originals too: a lossy retrieval must never
    replace the exact model. Hashes and opens nothing."""
    paths = list(sf.files)
    base = sf.linked_base_location()
    wanted: list[Path] = [] if base is None else [base]
    if originals is None:
        found = (locate(entry["path"], sf.path.parent) for entry in sf.header.inputs)
        wanted += [p for p in found if p is not None]
    else:
        wanted += [Path(o) for o in originals]
    for path in wanted:
        paths.append(path)
        with contextlib.suppress(InputError, OSError):  # not a checkpoint: the path itself is kept
            paths += checkpoint_files(path)
    spec = task if task is not None else recorded_task(sf)[0]
    if spec is not None and str(spec).endswith(".py"):
        paths.append(Path(spec))
    return list(dict.fromkeys(paths))


def open_originals(
    paths: Sequence[Path], *, trust_pickle: bool = False, strip_prefix: str | None = None
) -> list[Checkpoint]:
    """Open located originals; `trust_pickle` as for merge (pickled modules run their code),
    `strip_prefix` as merge recorded it (`recipe.strip_prefix`).

    Raises:
        UnsafeCheckpointError: a pickled module without `trust_pickle`.
        InputError: unreadable.
    """
    return [open_checkpoint(p, trust_pickle=trust_pickle, strip_prefix=strip_prefix) for p in paths]


def _check_shapes(sf: SuperposedFile, ckpt: Checkpoint, k: int) -> None:
    problems = []
    for name, meta in sf.header.tensors.items():
        info = ckpt.infos.get(name)
        if info is None:
            problems.append(f"{name} missing")
        elif list(info.shape) != list(meta.shape):
            problems.append(f"{name} has shape {list(info.shape)}, file has {meta.shape}")
    if problems:
        raise MismatchError(
            f"{ckpt.path} (context {k}) does not match the file's tensors: {listed(problems, '; ')}"
        )


def find_originals(
    sf: SuperposedFile, explicit: Sequence[str | Path] | None = None, *, trust_pickle: bool = False
) -> tuple[list[Checkpoint] | None, str | None]:
    """Open the K original checkpoints, in context order: `explicit`, or the recorded ones.

    Returns:
        (checkpoints, None), or (None, note) when the recorded originals are gone or changed.

    Raises:
        MismatchError: explicit originals of the wrong count, hash or shapes (says which).
        InputError: an explicit original is missing or unreadable.
    """
    recorded = sf.header.inputs
    if explicit is not None:
        if len(explicit) != sf.num_contexts:
            raise MismatchError(f"{len(explicit)} originals given for a file of {sf.num_contexts} contexts")
        prefix = sf.header.recipe.get("strip_prefix")
        ckpts = [open_checkpoint(p, trust_pickle=trust_pickle, strip_prefix=prefix) for p in explicit]
        for k, ckpt in enumerate(ckpts):
            want = recorded[k].get("sha256") if k < len(recorded) else None
            if want and sha256_checkpoint(ckpt.path) != want:
                raise MismatchError(
                    f"{ckpt.path} does not match the sha256 recorded for context {k} "
                    f"({sf.labels[k]}, merged from {recorded[k].get('path')})"
                )
            _check_shapes(sf, ckpt, k)
        return ckpts, None
    located = locate_originals(sf)
    if not located.recorded:
        return None, "originals not recorded in the file: weight-space error skipped (pass --originals)"
    if located.missing:
        return None, f"originals not found ({', '.join(located.missing)}): weight-space error skipped"
    if located.changed:
        changed = ", ".join(map(str, located.changed))
        return (
            None,
            f"originals changed since the merge (sha256 differs: {changed}): weight-space error skipped",
        )
    ckpts = open_originals(
        located.paths, trust_pickle=trust_pickle, strip_prefix=sf.header.recipe.get("strip_prefix")
    )
    for k, ckpt in enumerate(ckpts):
        _check_shapes(sf, ckpt, k)
    return ckpts, None


def recorded_task(sf: SuperposedFile) -> tuple[str | None, bool]:
    """The task spec the file records, resolved like the originals: (spec, found).

    A recorded `.py` path is looked for as the originals are (`candidates`); (the recorded
    spec, False) when it is nowhere. A module name is returned as it is. (None, False) when
    the file records no task.
    """
    spec = sf.header.task
    if spec is None:
        return None, False
    if not spec.endswith(".py"):
        return spec, True
    found = locate(spec, sf.path.parent)
    return (spec, False) if found is None else (str(found), True)


def require_task(sf: SuperposedFile, explicit: str | Path | None, *needs: str) -> Task:
    """Load `explicit`, or the task the file records (resolved as in `recorded_task`), or for a
    merge of Hugging Face folders without one the task built from its config.json (`hf_task`);
    and check it defines the optional functions `needs`.

    Raises:
        TaskError: the file records no task and none is given; the task lacks one of `needs`,
            or fails to import.
        UntrustedTaskError: the recorded task is not one the user has run (`pspctl.trust`).
        InputError: the task file does not exist (where it was recorded, nor beside the file).
        PspctlError: an HF merge without a task file, and transformers is not installed.
    """
    if explicit is None:
        spec, _ = recorded_task(sf)  # a recorded path found nowhere: load_task names it
        if spec is None and sf.header.hf is not None:
            # tune distils on made-up inputs: it needs inputs, not labels (pspctl.hf.hf_task)
            task = hf_task(sf, synthetic_data="load_data" in needs)
            lacking = [n for n in needs if getattr(task, n, None) is None]
            if lacking:
                raise TaskError(
                    f"{sf.path}: its Hugging Face model is built from config.json, which gives no "
                    f"{lacking[0]}(); pass --task with one (docs/task-file.md)"
                )
            return task
        if spec is None:
            raise TaskError(f"{sf.path} records no task file; pass --task")
        task = load_task(spec, recorded_in=sf.path)  # only a task the user has run (pspctl.trust)
    else:
        task = load_task(explicit)
    task.require(*needs)
    return task
