"""Which task files this user has run with pspctl: a task a superposed file names runs only if so.

A superposed file records the task it was merged with, and `analyze`, `export` and `tune`
load it when no `--task` is given. Loading a task runs its code, and a file's header is data
that anyone can write, so the header alone must not make pspctl run code: a received
`w.safetensors` could name any `.py` file. The user's consent is `--task` (or `merge
--task`): every task loaded that way is remembered here by its content (sha256 of the file;
a module by its name), and a recorded task runs only while its content is one remembered.
Editing the task file, or a file naming another one, needs `--task` once more.

The list is a JSON file, `$PSPCTL_TRUSTED_TASKS`, else `$XDG_STATE_HOME/pspctl/trusted-tasks.json`
(`~/.local/state/...`). A list that cannot be read counts as empty, one that cannot be written
is left as it is: pspctl then asks for `--task` again, and nothing else changes.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from pspctl.digests import sha256_file
from pspctl.errors import PspctlError
from pspctl.outputs import atomic_path

__all__ = ["ENV", "fingerprint", "remember", "store_path", "trusted"]

ENV = "PSPCTL_TRUSTED_TASKS"
FORMAT = 1


def store_path() -> Path:
    """The list's file: `$PSPCTL_TRUSTED_TASKS`, else under `$XDG_STATE_HOME` (`~/.local/state`)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "pspctl" / "trusted-tasks.json"


def fingerprint(task: Path | str) -> str:
    """`sha256:<hex>` of a task file's bytes (a Path), or `module:<name>` for a module name.

    Raises:
        OSError: the file cannot be read.
    """
    return f"sha256:{sha256_file(task)}" if isinstance(task, Path) else f"module:{task}"


def _load() -> dict[str, str]:
    try:
        data = json.loads(store_path().read_text())
    except (OSError, ValueError):
        return {}
    tasks = data.get("tasks") if isinstance(data, dict) and data.get("format") == FORMAT else None
    return {k: v for k, v in tasks.items() if isinstance(v, str)} if isinstance(tasks, dict) else {}


def trusted(task: Path | str) -> bool:
    """Whether the task file `task` has this content (a module: this name) among those the user ran."""
    try:
        return fingerprint(task) in _load()
    except OSError:
        return False


def remember(task: Path | str) -> None:
    """Add the task file `task` (a module: its name) to the list, with its last path as a
    reminder; never raises."""
    with contextlib.suppress(OSError, PspctlError):  # unwritable: pspctl asks for --task again
        key = fingerprint(task)
        tasks = _load()
        where = str(task.resolve()) if isinstance(task, Path) else task
        if tasks.get(key) == where:
            return
        tasks[key] = where
        text = json.dumps({"format": FORMAT, "tasks": dict(sorted(tasks.items()))}, indent=1) + "\n"
        with atomic_path(store_path(), force=True, output=False) as tmp:
            tmp.write_text(text)
