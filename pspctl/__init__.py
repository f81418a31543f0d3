"""pspctl: parameter superposition (Cheung et al., 2019) for PyTorch checkpoints.

The pure core is importable without any I/O:

    >>> import torch, pspctl
    >>> ctx = pspctl.make_contexts("binary", num_contexts=2, fan_in=4, seed=0)
    >>> W = pspctl.bind([torch.ones(3, 4), torch.zeros(3, 4)], ctx)
    >>> pspctl.unbind(W, ctx, 0).shape
    torch.Size([3, 4])

Names are resolved lazily so that `pspctl --help` does not pay for importing torch.

`pspctl.merge` and `pspctl.extract` are the modules (as `import pspctl.merge` makes them);
their functions are `pspctl.merge.merge` and `pspctl.extract.extract`:

    >>> from pspctl.merge import MergeOptions, merge
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "ContextSet": "pspctl.contexts",
    "Kind": "pspctl.contexts",
    "make_contexts": "pspctl.contexts",
    "bind": "pspctl.superpose",
    "unbind": "pspctl.superpose",
    "Policy": "pspctl.policy",
    "PspctlError": "pspctl.errors",
    "SuperposedFile": "pspctl.fileformat",
    "MergeOptions": "pspctl.merge",
}
# Submodules named like their main function. Exporting the function under the module's name
# made `pspctl.merge` a function until something imported the module, then the module.
_MODULES = ("merge", "extract")

__all__ = [*_EXPORTS, *_MODULES, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    if name in _MODULES:
        return importlib.import_module(f"pspctl.{name}")
    raise AttributeError(f"module 'pspctl' has no attribute {name!r}")
