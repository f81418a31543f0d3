"""matplotlib, an optional extra (`pip install 'pspctl[plot]'`), for `analyze --plot` and `train --plot`.

Both commands check for it before any work, and a missing matplotlib is the same error, with
the same exit code (1, a plain PspctlError), everywhere.
"""

from __future__ import annotations

from typing import Any

from pspctl.errors import PspctlError

__all__ = ["INSTALL_HINT", "pyplot", "require_matplotlib"]

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
