"""Wall time and peak RSS of `pspctl merge` and `pspctl extract` against the I/O floor.

Inputs: 4 × ~210 MB fp32 safetensors (8 tensors of 2560²), built once in the work folder.
Floors, each a fresh interpreter that imports torch like pspctl does:
- merge floor: read every tensor of the 4 inputs once, write one input-sized safetensors file;
- extract floor: read every tensor of the superposed file once, write K (or 1) model-sized files.
Runs are interleaved (floor, pspctl, floor, pspctl, …) on a warm page cache; medians of N.
Peak RSS is ru_maxrss of each child (getrusage(RUSAGE_CHILDREN) before and after).

    python benchmarks/merge_speed.py [--workdir /tmp/pspctl-speed] [--repeats 5] [--only merge|extract]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

K = 4
LAYERS = 8
WIDTH = 2560

MERGE_FLOOR = """
import sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
*inputs, out, copies = sys.argv[1:]
result = {}
for i, path in enumerate(inputs):
    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            t = f.get_tensor(name)  # mapped, not read: safetensors reads it when it is touched
            if i < int(copies):  # as many bytes as pspctl's output (read as it is written)
                result[f"{i}.{name}"] = t
            else:
                t.sum()  # read once
save_file(result, out)
"""

EXTRACT_FLOOR = """
import sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
src, outdir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
with safe_open(src, framework="pt") as f:
    tensors = {n: f.get_tensor(n) for n in f.keys()}
sizes = sorted(tensors.values(), key=lambda t: -t.nbytes)
model = {f"t{i}": t for i, t in enumerate(sizes[:8])}  # model-sized: the 8 largest stored tensors
for k in range(count):
    save_file(model, f"{outdir}/m{k}.safetensors")
"""


def make_inputs(workdir: Path) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    paths = []
    for k in range(K):
        path = workdir / f"model{k}.safetensors"
        if not path.exists():
            # Fine-tunes of one parent, as merged in practice: the parent plus a small delta.
            parent = torch.Generator().manual_seed(1000)
            g = torch.Generator().manual_seed(k)
            sd = {
                f"layers.{i}.weight": torch.randn(WIDTH, WIDTH, generator=parent) * 0.02
                + torch.randn(WIDTH, WIDTH, generator=g) * 0.002
                for i in range(LAYERS)
            }
            save_file(sd, str(path))
        paths.append(path)
    return paths


def child_rss(cmd: list[str]) -> tuple[float, int]:
    """Run `cmd` in a fresh benchmark process so that its ru_maxrss is its own. A leading
    `PYTHONPATH=…` item runs it with that pspctl checkout first on the path."""
    env = dict(os.environ)
    if cmd[0].startswith("PYTHONPATH="):
        env["PYTHONPATH"] = cmd[0].split("=", 1)[1]
        cmd = cmd[1:]
    code = (
        "import resource, subprocess, sys, time\n"
        "s = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True, env=env, cwd="/"
    )  # not from a checkout: `python -m` would put it before PYTHONPATH
    wall, rss = out.stdout.split()
    return float(wall), int(rss)


def compare(
    title: str, floor: list[str], ours: list[str], repeats: int, cleanup, baseline: str | None
) -> None:
    runs = [("floor", floor), ("pspctl", ours)]
    if baseline:
        runs.append(("baseline", [f"PYTHONPATH={baseline}", *ours]))
    rows: dict[str, list[tuple[float, int]]] = {label: [] for label, _ in runs}
    for _ in range(repeats):
        for label, cmd in runs:
            cleanup()
            rows[label].append(child_rss(cmd))
    mib = 1 << 20
    f_wall = statistics.median(w for w, _ in rows["floor"])
    print(f"\n{title} (medians of {repeats}, interleaved)")
    print(f"{'':8} {'wall':>8} {'peak RSS':>10} {'ratio':>7}   {'paired ratios: median (min–max)'}")
    for label, runs in rows.items():
        wall = statistics.median(w for w, _ in runs)
        rss = statistics.median(r for _, r in runs)
        # Each run against the floor run of its own round: robust to the machine's drift.
        paired = [w / f for (w, _), (f, _) in zip(runs, rows["floor"], strict=True)]
        spread = f"{statistics.median(paired):.2f}× ({min(paired):.2f}–{max(paired):.2f})"
        print(f"{label:8} {wall:7.2f}s {rss / mib:7.0f} MiB {wall / f_wall:6.2f}×   {spread}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pspctl-speed"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", choices=["merge", "extract"], default=None)
    parser.add_argument("--keep", action="store_true", help="keep the inputs for the next run")
    parser.add_argument(
        "--baseline", help="also run the pspctl of this checkout (e.g. /work/main), interleaved"
    )
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in make_inputs(work)]
    py = sys.executable
    merged = work / "w.safetensors"
    floor_out = work / "floor.safetensors"

    def rm(*items: Path):
        def clean() -> None:
            for item in items:
                shutil.rmtree(item, ignore_errors=True) if item.is_dir() else item.unlink(missing_ok=True)

        return clean

    for p in paths:  # warm the page cache
        Path(p).read_bytes()
    merge = [py, "-m", "pspctl", "merge", *paths, "-o", str(merged), "--quiet", "--force"]
    subprocess.run(merge, check=True, stdout=subprocess.DEVNULL)  # the output's size, for the floor
    copies = round(merged.stat().st_size / Path(paths[0]).stat().st_size)
    print(
        f"inputs {K} × {Path(paths[0]).stat().st_size / 1e6:.0f} MB; merged output {merged.stat().st_size / 1e6:.0f} MB"
    )
    if args.only in (None, "merge"):
        compare(
            f"merge: 4 × 210 MB fp32 safetensors → one file (floor writes {copies} inputs' worth)",
            [py, "-c", MERGE_FLOOR, *paths, str(floor_out), str(copies)],
            merge,
            args.repeats,
            rm(floor_out, merged),  # each run writes a fresh file: none pays for unlinking the last
            args.baseline,
        )
    if args.only in (None, "extract"):
        one, out_dir, floor_dir = work / "one.safetensors", work / "all", work / "floor-all"
        floor_dir.mkdir(exist_ok=True)
        compare(
            "extract --context 0",
            [py, "-c", EXTRACT_FLOOR, str(merged), str(floor_dir), "1"],
            [py, "-m", "pspctl", "extract", str(merged), "-c", "0", "-o", str(one), "--force"],
            args.repeats,
            rm(one),
            args.baseline,
        )
        compare(
            f"extract --context all ({K} outputs)",
            [py, "-c", EXTRACT_FLOOR, str(merged), str(floor_dir), str(K)],
            [py, "-m", "pspctl", "extract", str(merged), "-c", "all", "-o", str(out_dir), "--force"],
            args.repeats,
            rm(out_dir),
            args.baseline,
        )
    print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared)")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
