"""Training in superposition: PSP layers, `superpose` a model, `save`/`load` it as a pspctl file.

>>> from torch import nn
>>> from pspctl.nn import superpose
>>> psp = superpose(nn.Sequential(nn.Linear(8, 4)), 3, kind="binary", policy=None)
>>> with psp.context(2):
...     y = psp(x)  # doctest: +SKIP
"""

from pspctl.nn.layers import PerContext, PSPConv, PSPLayer, PSPLinear
from pspctl.nn.model import PSPModel, load, save, superpose
from pspctl.nn.tensors import Stacked, Superposed, initial_superposed, mix_contexts

__all__ = [
    "PSPConv",
    "PSPLayer",
    "PSPLinear",
    "PSPModel",
    "PerContext",
    "Stacked",
    "Superposed",
    "initial_superposed",
    "load",
    "mix_contexts",
    "save",
    "superpose",
]
