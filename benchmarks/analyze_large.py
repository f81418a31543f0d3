"""Time and peak memory of `analyze` on a larger synthetic file.

Writes K random MLPs (default: 8 contexts of a 4096-wide, 3-hidden-layer MLP, 50M
parameters and 201 MB each), merges them, then runs the full analysis (weight space,
function space on 256 calib inputs, pruning at 3 sparsities, same-budget baseline) in a
fresh process and prints its wall time and peak RSS next to the sizes that matter: the
analysis streams, so the peak should stay near a few models, far below K models plus the file.

    python benchmarks/analyze_large.py                       # K=8, width 4096, binary
    python benchmarks/analyze_large.py --width 1024 --kind complex
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = """
import torch
from torch import nn

WIDTH, LAYERS, CLASSES = {width}, {layers}, 10

def build_model():
    layers = []
    for _ in range(LAYERS):
        layers += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(WIDTH, CLASSES))

def load_data(context, split):
    g = torch.Generator().manual_seed(1000 * context + len(split))
    yield torch.randn(256, WIDTH, generator=g), torch.randint(0, CLASSES, (256,), generator=g)
"""

CHILD = """
import json, resource, sys, threading, time

peak = {"anon": 0, "rss": 0}

def watch():
    # ru_maxrss also counts the pages of the mmapped safetensors files read so far, which
    # the kernel can drop at will; RssAnon is the memory the analysis itself holds.
    while True:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak["anon"] = max(peak["anon"], int(fields["RssAnon"].split()[0]) * 1024)
        peak["rss"] = max(peak["rss"], int(fields["VmRSS"].split()[0]) * 1024)
        time.sleep(0.02)

threading.Thread(target=watch, daemon=True).start()
t0 = time.perf_counter()
from pspctl.analysis import analyze
r = analyze(sys.argv[1], max_samples=256)
seconds = time.perf_counter() - t0
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": seconds, "cpu": use.ru_utime + use.ru_stime, "peak_anon": peak["anon"],
                  "peak_rss": use.ru_maxrss * 1024,
                  "layers": [(e.name, e.context, e.measured, e.predicted) for e in r.layers[:3]]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=3, help="hidden layers of width × width")
    parser.add_argument("--kind", default="binary")
    args = parser.parse_args()

    import torch

    from pspctl.merge import MergeOptions, merge
    from pspctl.policy import Policy

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "task.py").write_text(TASK.format(width=args.width, layers=args.layers))
        sys.path.insert(0, str(d))
        import task  # noqa: PLC0415

        t0 = time.perf_counter()
        paths = []
        for k in range(args.contexts):
            torch.manual_seed(k)
            paths.append(d / f"m{k}.safetensors")
            from safetensors.torch import save_file

            save_file({n: p.contiguous() for n, p in task.build_model().state_dict().items()}, str(paths[-1]))
        model_bytes = paths[0].stat().st_size
        out = d / "w.safetensors"
        policy = Policy(superpose=("*.weight",))  # every hidden layer and the head
        merge(paths, out, MergeOptions(kind=args.kind, policy=policy, task=str(d / "task.py"), base="none"))
        print(f"setup (write {args.contexts} models, merge): {time.perf_counter() - t0:.1f} s")

        child = subprocess.run(
            [sys.executable, "-c", CHILD, str(out)], capture_output=True, text=True, cwd=ROOT, check=False
        )
        if child.returncode != 0:
            sys.exit(child.stderr)
        res = json.loads(child.stdout.strip().splitlines()[-1])
        mib = 1 << 20
        print(
            f"analyze: K={args.contexts}, {args.layers}×{args.width}² + head, {args.kind}: "
            f"{res['seconds']:.1f} s wall ({res['cpu']:.1f} s CPU), peak anonymous memory "
            f"{res['peak_anon'] / mib:.0f} MiB (peak RSS with the mmapped files' pages: {res['peak_rss'] / mib:.0f} MiB)"
        )
        print(
            f"sizes: one model {model_bytes / mib:.0f} MiB, superposed file {out.stat().st_size / mib:.0f} MiB, "
            f"K models + file {(args.contexts * model_bytes + out.stat().st_size) / mib:.0f} MiB"
        )
        print(f"first layers (name, context, measured, predicted): {res['layers']}")


if __name__ == "__main__":
    main()
