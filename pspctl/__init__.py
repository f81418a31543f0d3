"""pspctl: parameter superposition (Cheung et al., 2019) for PyTorch checkpoints.

The pure core is importable without any I/O:

    >>> import torch, pspctl
    >>> ctx = pspctl.make_contexts("binary", num_contexts=2, fan_in=4, seed=0)
    >>> W = pspctl.bind([torch.ones(3, 4), torch.zeros(3, 4)], ctx)
"""

from pspctl.contexts import ContextSet, Kind, make_contexts
from pspctl.errors import PspctlError
from pspctl.superpose import bind, unbind

__version__ = "0.1.0"

__all__ = ["ContextSet", "Kind", "PspctlError", "__version__", "bind", "make_contexts", "unbind"]
