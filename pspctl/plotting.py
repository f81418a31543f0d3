"""matplotlib, an optional extra (`pip install 'pspctl[plot]'`), for `analyze --plot` and `train --plot`.

Both commands check for it before any work, and a missing matplotlib is the same error, with
the same exit code (1, a plain PspctlError), everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pspctl.errors import InputError, PspctlError

__all__ = ["INSTALL_HINT", "check_plot_path", "pyplot", "require_matplotlib"]

INSTALL_HINT = "--plot needs matplotlib: pip install 'pspctl[plot]'"


def require_matplotlib() -> None:
    """Fail early, before any work, when matplotlib is missing.

    Raises:
        PspctlError: matplotlib cannot be imported; the message says how to install it.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PspctlError(INSTALL_HINT) from None


def check_plot_path(path: str | Path) -> None:
    """Fail early, before any work, when matplotlib cannot write `path`'s format.

    Raises:
        PspctlError: as `require_matplotlib`.
        InputError: `path`'s suffix is no format matplotlib writes (`.png`, `.pdf`, `.svg`, …).
    """
    require_matplotlib()
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        raise InputError(f"--plot {path}: not an image format matplotlib writes; use .png, .pdf or .svg")


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (no display needed).

    Raises:
        PspctlError: as `require_matplotlib`.
    """
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # must precede importing pyplot
    import matplotlib.pyplot as plt

    return plt
