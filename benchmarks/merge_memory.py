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
import time
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


def _rss_anon(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_rss_of(cmd: list[str]) -> tuple[int, int]:
    """(peak RSS, peak anonymous RSS) in bytes of one child process.

    Peak RSS (getrusage; Linux reports KiB) also counts file pages mapped from the inputs,
    which the kernel can drop at will; anonymous RSS, polled every 5 ms, is the process's own
    memory.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    anon = 0
    while proc.poll() is None:
        anon = max(anon, _rss_anon(proc.pid))
        time.sleep(0.005)
    if proc.returncode:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    if after <= before:
        raise RuntimeError("measure each merge in a fresh benchmark process")
    return after * 1024, anon


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pspctl-mem"))
    parser.add_argument("--format", choices=["safetensors", "pt"], default="safetensors")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    paths = make_inputs(args.workdir, args.format)
    out = args.workdir / "w.safetensors"
    baseline, _ = peak_rss_of([sys.executable, "-c", "import torch, safetensors, pspctl.merge"])
    rss, anon = peak_rss_of([sys.executable, "-m", "pspctl", "merge", *map(str, paths), "-o", str(out),
                       "--force", "--quiet", "--superpose", "*.weight", "--base", "none"])  # fmt: skip
    largest = WIDTH * WIDTH * 4
    output = out.stat().st_size
    bound = output + (K + 1) * largest + baseline
    mib = 1 << 20
    print(
        f"inputs: {K} × {paths[0].stat().st_size / mib:.0f} MiB ({args.format}); output {output / mib:.0f} MiB"
    )
    print(f"interpreter + imports: {baseline / mib:.0f} MiB; largest tensor {largest / mib:.0f} MiB")
    print(f"peak RSS of merge: {rss / mib:.0f} MiB (anonymous: {anon / mib:.0f} MiB)")
    print(f"bound output + (K+1)×largest + interpreter: {bound / mib:.0f} MiB")
    print(f"ratio peak RSS / bound = {rss / bound:.2f}; anonymous / bound = {anon / bound:.2f}")
    print(f"for scale: all K inputs held at once would be {K * paths[0].stat().st_size / mib:.0f} MiB")


if __name__ == "__main__":
    main()
