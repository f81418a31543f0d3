"""Dtypes travel as strings (in headers, recipes and `--dtype`); this turns them back into torch's.

The one place that does `getattr(torch, name)`, so that an unknown name fails the same way
everywhere and a grep finds every conversion.
"""

from __future__ import annotations

import torch

__all__ = ["itemsize", "torch_dtype"]


def torch_dtype(name: str) -> torch.dtype:
    """`torch.float16` for `"float16"` (a DType member works too: it is a str).

    Raises:
        ValueError: `name` is not a torch dtype.
    """
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"not a torch dtype: {name!r}")
    return dtype


def itemsize(name: str) -> int:
    """Bytes per element of the dtype called `name`."""
    return torch_dtype(name).itemsize
