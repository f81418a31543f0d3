"""Regenerate the golden files of the current format: `python tests/data/make_golden.py`.

Only do this for a deliberate format change, together with a FORMAT_VERSION bump. The
`golden-v1-*` files were written by format version 1 and are never rewritten: they pin what
every later pspctl must still read.
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


# Format v2: plain superposition, and one centred on the inputs' mean (a base, per tensor).
GOLDEN_V2 = {
    "binary": MergeOptions(base="none", kind="binary", seed=0, policy=Policy(superpose=("lin.weight",))),
    "complex": MergeOptions(base="none", kind="complex", seed=0, policy=Policy(superpose=("lin.weight",))),
    "mean": MergeOptions(base="mean", kind="binary", seed=0, policy=Policy(superpose=("lin.weight",))),
}


def main() -> None:
    os.chdir(HERE)
    for name, sd in inputs().items():
        save_file(sd, f"golden-{name}.safetensors")
    for name, options in GOLDEN_V2.items():
        out = Path(f"golden-v2-{name}.safetensors")
        out.unlink(missing_ok=True)
        merge(["golden-a.safetensors", "golden-b.safetensors"], out, options)


if __name__ == "__main__":
    main()
