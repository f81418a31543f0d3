"""The `pspctl` command line: parse, call one library function, render with rich.

Heavy modules (torch, onnx) are imported inside the commands so that `pspctl --help` is fast.
The app and what the commands share live in pspctl.cli.common; importing this package
registers every command on `app` (the modules import common, never this package: no cycle).
"""

import sys

try:
    from pspctl.cli import analyze, core, export, train  # noqa: F401  (they register on `app`)
    from pspctl.cli.common import (
        app,
        command_line,
        console,
        err_console,
        error_line,
        handle_errors,
        human_bytes,
        main,
        print_json,
        progress_bar,
        state,
    )
except KeyboardInterrupt:  # Ctrl-C while typer and rich load (the `pspctl` script's first 0.3 s)
    import os

    sys.stderr.write("error: interrupted\n")  # rich may be what was interrupted
    sys.stderr.flush()
    # Not SystemExit: raised out of this import, the process still died by the signal (rc -2)
    # in about 1 of 20 timings; nothing has been done yet, so nothing needs Python's shutdown.
    os._exit(130)

__all__ = [
    "app",
    "command_line",
    "console",
    "err_console",
    "error_line",
    "handle_errors",
    "human_bytes",
    "main",
    "print_json",
    "progress_bar",
    "state",
]
