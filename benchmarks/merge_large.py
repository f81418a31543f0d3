"""Merging four 1B-parameter decoders in bf16: wall time against the I/O floor, peak RSS
against output + (K+1) × largest tensor + interpreter.

The checkpoints are synthetic, shaped like a Llama-style 1B decoder (16 layers, hidden 2048,
intermediate 5632, vocab 32000: ~0.95B parameters, ~1.9 GB each in bf16): one parent drawn
from a fixed seed, and K fine-tunes = parent + a small seeded delta, each saved as 1 GB shards
with an index, the Hugging Face layout. Nothing is downloaded. Needs ~4 × 1.9 GB of disk for
the inputs and ~2 × the output for the merge and the floor; everything is removed afterwards.

    python benchmarks/merge_large.py [--workdir /tmp/pspctl-large] [--layers 16] [--keep]

`--layers 4` runs a scaled-down model (same widths, fewer layers) in a quarter of the time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

K = 4
HIDDEN, INTERMEDIATE, VOCAB = 2048, 5632, 32000

FLOOR = """
import sys, torch
from pspctl.checkpoints import open_checkpoint
from safetensors.torch import save_file
*inputs, out, copies = sys.argv[1:]
result = {}
for i, path in enumerate(inputs):
    ckpt = open_checkpoint(path)
    for name in ckpt.names:
        t = ckpt[name]
        if i < int(copies):  # as many bytes as pspctl's output
            result[f"{i}.{name}"] = t
save_file(result, out)
"""


def shapes(layers: int) -> dict[str, tuple[int, ...]]:
    """A Llama-like decoder's state_dict shapes."""
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            out[f"{p}self_attn.{proj}_proj.weight"] = (HIDDEN, HIDDEN)
        out[f"{p}mlp.gate_proj.weight"] = (INTERMEDIATE, HIDDEN)
        out[f"{p}mlp.up_proj.weight"] = (INTERMEDIATE, HIDDEN)
        out[f"{p}mlp.down_proj.weight"] = (HIDDEN, INTERMEDIATE)
        out[f"{p}input_layernorm.weight"] = (HIDDEN,)
        out[f"{p}post_attention_layernorm.weight"] = (HIDDEN,)
    out["model.norm.weight"] = (HIDDEN,)
    out["lm_head.weight"] = (VOCAB, HIDDEN)
    return out


def make_inputs(workdir: Path, layers: int) -> list[Path]:
    """K sharded bf16 checkpoints, generated tensor by tensor (never a whole model in memory)."""
    import torch

    from pspctl.outputs import write_safetensors_sharded

    folders = [workdir / f"ft{k}" for k in range(K)]
    if all(f.is_dir() and any(f.iterdir()) for f in folders):
        return folders
    for f in folders:
        shutil.rmtree(f, ignore_errors=True)
        f.mkdir(parents=True)
    for k in range(K):  # one model in memory at a time: the parent is drawn again for each
        state = {}
        for j, (name, shape) in enumerate(shapes(layers).items()):
            if len(shape) == 1:
                base = torch.ones(shape)
            else:
                base = torch.randn(shape, generator=torch.Generator().manual_seed(10_000 + j)) * 0.02
            delta = torch.randn(shape, generator=torch.Generator().manual_seed(1000 * k + j))
            state[name] = base.add_(delta, alpha=0.002 if len(shape) > 1 else 0.01).to(torch.bfloat16)
            del base, delta
        write_safetensors_sharded(
            state, folders[k] / "model.safetensors", {"format": "pt"}, max_shard_size="1GB"
        )
        del state
    return folders


def measured(cmd: list[str]) -> tuple[float, int]:
    """(wall s, peak RSS bytes) of `cmd`, run from a fresh process so ru_maxrss is its own."""
    code = (
        "import resource, subprocess, sys, time\n"
        "s = time.perf_counter(); subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)\n"
        "print(time.perf_counter() - s, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True)
    wall, rss = out.stdout.split()
    return float(wall), int(rss)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pspctl-large"))
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--keep", action="store_true", help="keep the inputs for another run")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    gib = 1 << 30
    sizes = shapes(args.layers)
    params = sum(int(torch_numel(s)) for s in sizes.values())
    start = time.perf_counter()
    folders = make_inputs(work, args.layers)
    made = time.perf_counter() - start
    input_bytes = sum(f.stat().st_size for f in folders[0].iterdir())
    print(
        f"{K} inputs: {params / 1e9:.2f}B parameters, bf16, {input_bytes / gib:.2f} GiB each (made in {made:.0f} s)"
    )
    for folder in folders:  # warm the page cache, as for the floor
        for f in folder.iterdir():
            with open(f, "rb") as h:
                while h.read(1 << 24):
                    pass
    out = work / "out"
    out.mkdir(exist_ok=True)
    py = sys.executable
    cmd = [py, "-m", "pspctl", "merge", *map(str, folders), "-o", str(out / "w.safetensors"), "--quiet",
           "--force", "--max-shard-size", "2GB"]  # fmt: skip
    wall, rss = measured(cmd)
    output = sum(f.stat().st_size for f in out.iterdir())
    copies = max(1, round(output / input_bytes))
    shutil.rmtree(out)
    floor_out = work / "floor.safetensors"
    f_wall, f_rss = measured([py, "-c", FLOOR, *map(str, folders), str(floor_out), str(copies)])
    floor_out.unlink()
    _, base = measured([py, "-c", "import torch, safetensors, pspctl.merge"])
    largest = max(torch_numel(s) for s in sizes.values()) * 2
    bound = output + (K + 1) * largest + base
    print(
        f"output {output / gib:.2f} GiB; largest tensor {largest / 2**20:.0f} MiB; interpreter {base / 2**20:.0f} MiB"
    )
    print(
        f"floor (read the 4 inputs once, write {copies} inputs' worth): {f_wall:.1f} s, peak RSS {f_rss / gib:.2f} GiB"
    )
    print(f"pspctl merge: {wall:.1f} s ({wall / f_wall:.2f}× the floor), peak RSS {rss / gib:.2f} GiB")
    print(
        f"bound output + (K+1)×largest + interpreter = {bound / gib:.2f} GiB; peak RSS / bound = {rss / bound:.2f}"
    )
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} (shared); total {time.perf_counter() - start:.0f} s"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


def torch_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


if __name__ == "__main__":
    main()
