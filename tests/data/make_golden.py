"""Regenerate the golden files: `python tests/data/make_golden.py` (from the repo root).

Only do this for a deliberate format change, together with a FORMAT_VERSION bump.
"""

import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from pspctl.merge import MergeOptions, merge
from pspctl.policy import Policy

HERE = Path(__file__).parent


def inputs() -> dict[str, dict[str, torch.Tensor]]:
    out = {}
    for i, name in enumerate(["a", "b"]):
        g = torch.Generator().manual_seed(i)
        out[name] = {
            "lin.weight": torch.randn(4, 10, generator=g),
            "lin.bias": torch.randn(4, generator=g),
            "head.weight": torch.randn(2, 4, generator=g).half(),
            "steps": torch.tensor(i + 1),
        }
    return out


def main() -> None:
    os.chdir(HERE)
    for name, sd in inputs().items():
        save_file(sd, f"golden-{name}.safetensors")
    for kind in ("binary", "complex"):
        out = Path(f"golden-v1-{kind}.safetensors")
        out.unlink(missing_ok=True)
        merge(["golden-a.safetensors", "golden-b.safetensors"], out,
              MergeOptions(kind=kind, seed=0, policy=Policy(superpose=("lin.weight",))))  # fmt: skip


if __name__ == "__main__":
    main()
