"""Regenerate the golden files of the current format: `python tests/data/make_golden.py`.

Only do this for a deliberate format change, together with a FORMAT_VERSION bump. Each
`golden-vN-*` pins format version N (v3: a merge of the `golden-hf-*` folders). The
`golden-v1-*` files were written by format version 1 and are never rewritten: they pin what
every later pspctl must still read.
"""

import json
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


# Format v3: a merge of Hugging Face folders whose config.json differs in its labels.
V3_FOLDERS = ["golden-hf-a", "golden-hf-b"]
V3_OPTIONS = MergeOptions(base="none", kind="binary", seed=0, policy=Policy(superpose=("lin.weight",)))


def hf_folders() -> None:
    """Two HF-style folders (config.json and model.safetensors) of the same inputs, whose
    configs name other labels."""
    for folder, (name, sd) in zip(V3_FOLDERS, inputs().items(), strict=True):
        Path(folder).mkdir(exist_ok=True)
        labels = {"0": f"{name}-no", "1": f"{name}-yes"}
        config = {"model_type": "golden", "hidden_size": 4, "id2label": labels}
        Path(folder, "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        save_file(sd, f"{folder}/model.safetensors")


def main() -> None:
    os.chdir(HERE)
    for name, sd in inputs().items():
        save_file(sd, f"golden-{name}.safetensors")
    for name, options in GOLDEN_V2.items():
        out = Path(f"golden-v2-{name}.safetensors")
        out.unlink(missing_ok=True)
        merge(["golden-a.safetensors", "golden-b.safetensors"], out, options)
    hf_folders()
    out = Path("golden-v3-labels.safetensors")
    out.unlink(missing_ok=True)
    merge(V3_FOLDERS, out, V3_OPTIONS)


if __name__ == "__main__":
    main()
