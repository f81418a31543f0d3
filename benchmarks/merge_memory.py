"""Peak memory of `pspctl merge` on four ≈500 MB checkpoints.

Target (issue 2): peak RSS near output size + (K+1) × largest tensor + the interpreter.
Each merge runs in a fresh subprocess; its peak RSS comes from getrusage(RUSAGE_CHILDREN).

    python benchmarks/merge_memory.py [--workdir /tmp/pspctl-mem] [--format safetensors|pt]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

K = 4
LAYERS = 8  # 8 × 4096×4096 fp32 = 512 MiB per model
WIDTH = 4096


def make_inputs(workdir: Path, fmt: str) -> list[Path]:
    paths = []
    for k in range(K):
        path = workdir / f"model{k}.{fmt}"
        if not path.exists():
            g = torch.Generator().manual_seed(k)
            sd = {f"layers.{i}.weight": torch.randn(WIDTH, WIDTH, generator=g) * 0.01 for i in range(LAYERS)}
            sd.update({f"layers.{i}.bias": torch.zeros(WIDTH) for i in range(LAYERS)})
            save_file(sd, str(path)) if fmt == "safetensors" else torch.save(sd, path)
            del sd
        paths.append(path)
    return paths


def peak_rss_of(cmd: list[str]) -> int:
    """Peak RSS in bytes of one child process (Linux reports ru_maxrss in KiB)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("measure each merge in a fresh benchmark process")
    return after * 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pspctl-mem"))
    parser.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = make_inputs(args.workdir, args.format)
    out = args.workdir / "w.safetensors"
    baseline = peak_rss_of([sys.executable, "-c", "import torch, safetensors, pspctl.merge"])
    rss = peak_rss_of([sys.executable, "-m", "pspctl", "merge", *map(str, paths), "-o", str(out),
                       "--force", "--quiet", "--superpose", "*.weight"])  # fmt: skip
    largest = WIDTH * WIDTH * 4
    output = out.stat().st_size
    bound = output + (K + 1) * largest + baseline
    mib = 1 << 20
    print(f"inputs: {K} × {paths[0].stat().st_size / mib:.0f} MiB ({args.format}); output {output / mib:.0f} MiB")
    print(f"interpreter + imports: {baseline / mib:.0f} MiB; largest tensor {largest / mib:.0f} MiB")
    print(f"peak RSS of merge: {rss / mib:.0f} MiB")
    print(f"bound output + (K+1)×largest + interpreter: {bound / mib:.0f} MiB; ratio peak/bound = {rss / bound:.2f}")
    print(f"for scale: all K inputs held at once would be {K * paths[0].stat().st_size / mib:.0f} MiB")


if __name__ == "__main__":
    main()
