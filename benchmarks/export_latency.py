"""onnxruntime latency of the multi-context graph vs the per-context graph of the same context.

For each model, context kind and base (none, or the inputs' mean: a based file, format v2):
merge K models, export the multi-context graph (tuned for each batch size, `--batch`) and
the per-context graph of one context (both validated against PyTorch by pspctl, the multi
graph for every context), then time them in onnxruntime at batch 1 and batch 64, one
intra-op thread. Runs alternate between the graphs (A B C D, D C B A, ...) so that drift on a
shared machine hits all alike; each ratio is a median over median, from one run.

Each cell is held to a target, ratio ≤ 1.15 × its bound, and printed PASS or FAIL:

- bound: 1 for binary without a base (the same bytes are read; only dispatch separates the
  graphs); otherwise the "weights read" ratio: bytes of weights the multi-context graph
  must read per call over those of the per-context graph (complex and onepower read Re W
  and Im W, rotation C_k, a based file B and S). At batch 1 the GEMVs are memory-bound, so
  latency cannot fall below it.

Two measured floors are printed beside it, to tell the cost of the design from the cost of
the implementation:

- "stacked floor": the per-context graph with a `context` input whose per-context tensors
  (biases, kept layers) are gathered from stacked [K, ...] tables; superposed weights are
  folded in, with no binding at all. Not a product graph (its output is right only for the
  context whose weights were folded in, which is checked).
- "extra nodes: dispatch": n = the nodes of onnxruntime's optimised multi-context graph
  minus those of the optimised per-context graph, and the per-context graph plus a chain of
  n trivial scalar nodes, timed in the same run: what dispatching n nodes costs with none of
  their work (only for graphs under 64 MiB).

    python benchmarks/export_latency.py                      # bundled MLP + 4096-wide MLP
    python benchmarks/export_latency.py --models digits --kinds binary complex --runs 50

Prints a Markdown table (pasted into docs/export.md) and, with --json, writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `pspctl`, `samples` importable

from torch.func import functional_call  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

from pspctl.contexts import Kind  # noqa: E402
from pspctl.fileformat import SuperposedFile  # noqa: E402
from pspctl.merge import MergeOptions, merge  # noqa: E402
from pspctl.onnx_export import export_contexts, export_multi  # noqa: E402
from pspctl.onnx_export.convert import to_onnx  # noqa: E402
from pspctl.onnx_export.modules import BRANCH, MultiContextModel, StackedTensors  # noqa: E402
from pspctl.policy import (
    SHAPE_RULES,  # noqa: E402
    Role,  # noqa: E402
)

K = 4
CONTEXT = 1
BATCHES = (1, 64)


def wide_mlp(seed: int, width: int = 4096) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    )


def digits_setup(folder: Path) -> tuple[list[Path], SimpleNamespace, int]:
    from samples import digits_task
    from samples.train import checkpoint_path

    task = SimpleNamespace(
        source="samples/digits_task.py", build_model=digits_task.build_model,
        example_inputs=digits_task.example_inputs, load_data=digits_task.load_data,
    )  # fmt: skip
    return [checkpoint_path(k) for k in range(K)], task, 64


def wide_setup(folder: Path) -> tuple[list[Path], SimpleNamespace, int]:
    paths = []
    for k in range(K):
        path = folder / f"wide_{k}.pt"
        torch.save(wide_mlp(k).state_dict(), path)
        paths.append(path)
    gen = torch.Generator().manual_seed(0)
    task = SimpleNamespace(
        source="wide-mlp", build_model=lambda: wide_mlp(0),
        example_inputs=lambda: (torch.randn(8, 4096, generator=gen),), load_data=None,
    )  # fmt: skip
    return paths, task, 4096


SETUPS = {"digits": digits_setup, "wide4096": wide_setup}


class StackedFloor(nn.Module):
    """Context k's per-context model, except that its per-context tensors are gathered by a
    `context` input from the file's stacked [K, ...] tables, by the multi-context graph's own
    StackedTensors. Superposed weights: Ŵ_k, folded in."""

    def __init__(self, model: nn.Module, file: SuperposedFile, k: int):
        super().__init__()
        model.load_state_dict(file.state_dict(k))
        self.model = model.eval()
        self.stacked = StackedTensors(file, {name: t.dtype for name, t in model.state_dict().items()})

    def forward(self, context: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(pytree.tree_leaves(functional_call(self.model, self.stacked.select(context), inputs)))


def weights_read(file: SuperposedFile) -> float:
    """Bytes of weights one call must read: multi-context graph / per-context graph (a lower bound:
    a gathered slice counts once, though Gather copies it)."""
    single = multi = 0
    for name, meta in file.header.tensors.items():
        numel = int(np.prod(meta.shape))
        single += numel
        if meta.role != Role.SUPERPOSED:
            multi += numel
            continue
        if file.base(name) is not None:
            multi += numel  # y = [B | S][x ; c_k ⊙ x]: the base B is read too
        if file.kind is Kind.ROTATION:
            multi += numel + meta.fan_in**2  # W and C_k
        elif file.kind.is_complex:
            multi += 2 * numel + meta.fan_in  # Re W, Im W and φ_k
        else:
            multi += numel + meta.fan_in  # W and c_k
    return multi / single


DISPATCH_MAX_BYTES = 64 * 2**20  # the dispatch floor loads and rewrites the per-context graph


def optimised_nodes(path: Path) -> int:
    """Nodes onnxruntime runs for `path`: those of its optimised model (ORT_ENABLE_ALL)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.optimized_model_filepath = str(path.with_name(path.stem + ".opt.onnx"))
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return len(onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node)


def dispatch_floor(single: Path, extra: int, out: Path) -> Path:
    """The per-context graph plus `extra` trivial nodes (a chain of Clips on a scalar `context`
    input, one more output): what dispatching the multi-context graph's extra nodes costs with
    none of their work. The nodes are chained so that onnxruntime cannot drop or merge them."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(single))
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("context", TensorProto.INT64, []))
    graph.initializer.extend(
        [numpy_helper.from_array(np.array(v, dtype=np.int64), n) for n, v in (("lo", 0), ("hi", K - 1))]
    )
    prev = "context"
    for i in range(extra):
        graph.node.append(helper.make_node("Clip", [prev, "lo", "hi"], [f"dispatch_{i}"]))
        prev = f"dispatch_{i}"
    graph.output.append(helper.make_tensor_value_info(prev, TensorProto.INT64, []))
    onnx.save(model, str(out))
    return out


def branch_floor(single: Path, out: Path) -> Path:
    """The per-context graph plus what picking one of K branches costs when the branches do
    nothing: the multi-context graph's Clip and Equal on `context`, and a balanced If tree
    over K leaves that pass the context through (one more output). What a multi-context graph
    of whole per-context branches (`modules.BRANCH`) pays on top of the per-context graph."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(single))
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("context", TensorProto.INT64, []))
    graph.initializer.extend(
        [numpy_helper.from_array(np.array(v, dtype=np.int64), f"c{v}") for v in range(K)]
    )
    graph.node.extend([helper.make_node("Clip", ["context", "c0", f"c{K - 1}"], ["k0"]),
                       helper.make_node("Equal", ["k0", "context"], ["valid"])])  # fmt: skip
    count = iter(range(10**6))

    def tree(k: str, leaves: int) -> list:
        i = next(count)
        if leaves == 1:
            return [helper.make_node("Identity", [k], [f"pick{i}"])]
        half = leaves // 2
        low = tree(k, half)
        shifted = f"shifted{i}"
        high = [helper.make_node("Sub", [k, f"c{half}"], [shifted]), *tree(shifted, leaves - half)]

        def body(nodes: list, name: str):
            return helper.make_graph(
                nodes, name, [], [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.INT64, [])]
            )

        return [
            helper.make_node("Less", [k, f"c{half}"], [f"lt{i}"]),
            helper.make_node("If", [f"lt{i}"], [f"pick{i}"], then_branch=body(low, f"lo{i}"), else_branch=body(high, f"hi{i}")),
        ]  # fmt: skip

    graph.node.extend(tree("k0", K))
    graph.output.extend([helper.make_tensor_value_info(graph.node[-1].output[0], TensorProto.INT64, []),
                         helper.make_tensor_value_info("valid", TensorProto.BOOL, [])])  # fmt: skip
    onnx.save(model, str(out))
    return out


def session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved(fns: list, runs: int, warmup: int) -> list[float]:
    """Median seconds of each fn, alternating the order every round."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(runs):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


BASES = ("none", "mean")
TARGET = 1.15


def bound(kind: str, base: str, read: float) -> float:
    """The floor a cell's ratio is held to: 1 for plain binary (same bytes, only dispatch between
    them), else the weights-read ratio (complex/onepower read Re W and Im W, rotation C_k, a
    based file B and S)."""
    return 1.0 if kind == "binary" and base == "none" else read


def bench(name: str, kind: str, base: str, folder: Path, args: argparse.Namespace) -> list[dict]:
    paths, task, width = SETUPS[name](folder)
    stem = folder / f"{name}_{kind}_{base}"
    superposed = stem.with_suffix(".safetensors")
    merge(paths, superposed, MergeOptions(kind=kind, force=True, base=base, policy=SHAPE_RULES))
    single = export_contexts(superposed, task, CONTEXT, folder / f"{stem.name}_{CONTEXT}.onnx", force=True)
    file = SuperposedFile(superposed)
    floor_path = folder / f"{stem.name}_floor.onnx"
    example = tuple(task.example_inputs())
    to_onnx(
        StackedFloor(task.build_model(), file, CONTEXT), (torch.tensor(CONTEXT), *example), floor_path,
        input_names=["context", "input"], output_names=["output"], varargs=True,
    )  # fmt: skip
    s_single = session(folder / f"{stem.name}_{CONTEXT}.onnx", args.threads)
    s_floor = session(floor_path, args.threads)
    check = example[0].numpy()
    want = s_single.run(None, {"input": check})[0]
    got = s_floor.run(None, {"input": check, "context": np.array(CONTEXT, dtype=np.int64)})[0]
    np.testing.assert_allclose(
        got, want, rtol=1e-4, atol=1e-4, err_msg="the floor graph is not context's model"
    )
    read = weights_read(file)
    rows = []
    multis: dict[tuple, tuple] = {}  # the graph for each batch's per-layer choices, exported once
    for batch in BATCHES:
        # Every context of the multi-context graph is validated against PyTorch by export_multi.
        layers = tuple(MultiContextModel(task.build_model(), file, batch=batch).layers.items())
        if layers not in multis:
            path = folder / f"{stem.name}_multi_b{batch}.onnx"
            report = export_multi(superposed, task, path, force=True, batch=batch)
            multis[layers] = (report, session(path, args.threads))
        multi, s_multi = multis[layers]
        x = np.random.default_rng(0).standard_normal((batch, width)).astype(np.float32)
        multi_feed = {"context": np.array(CONTEXT, dtype=np.int64), "input": x}
        fns = [partial(s_multi.run, None, multi_feed), partial(s_single.run, None, {"input": x}),
               partial(s_floor.run, None, multi_feed)]  # fmt: skip
        single_path = folder / f"{stem.name}_{CONTEXT}.onnx"
        extra = None
        branches = set(multi.layers.values()) == {BRANCH}
        if branches:  # no extra node does work; what the If tree costs, with empty branches
            extra = "If tree"
            dispatch_path = branch_floor(single_path, folder / f"{stem.name}_dispatch.onnx")
            fns.append(partial(session(dispatch_path, args.threads).run, None, multi_feed))
        elif single.total_bytes <= DISPATCH_MAX_BYTES:
            multi_path = Path(next(iter(multi.files)))
            extra = optimised_nodes(multi_path) - optimised_nodes(single_path)
            dispatch_path = dispatch_floor(single_path, extra, folder / f"{stem.name}_dispatch.onnx")
            fns.append(partial(session(dispatch_path, args.threads).run, None, multi_feed))
        t_multi, t_single, t_floor, *t_dispatch = interleaved(fns, runs=args.runs, warmup=args.warmup)
        floor = bound(kind, base, read)
        ratio = t_multi / t_single
        rows.append({
            "model": name, "kind": kind, "base": base, "batch": batch,
            "multi_ms": t_multi * 1e3, "single_ms": t_single * 1e3, "ratio": ratio,
            "floor_ms": t_floor * 1e3, "floor_ratio": t_floor / t_single, "weights_read_ratio": read,
            "extra_nodes": extra, "dispatch_ratio": t_dispatch[0] / t_single if t_dispatch else None,
            "bound": floor, "target": TARGET * floor, "of_bound": ratio / floor, "pass": ratio <= TARGET * floor,
            "multi_bytes": multi.total_bytes, "single_bytes": single.total_bytes,
            "per_context_total_bytes": multi.per_context_bytes, "superposed_file_bytes": superposed.stat().st_size,
            "max_abs_diff": max(c.max_abs for c in multi.checks), "layers": multi.layers,
        })  # fmt: skip
        print(
            f"{name:9s} {kind:9s} base {base:4s} batch {batch:3d}: multi {t_multi * 1e3:8.3f} ms, "
            f"single {t_single * 1e3:8.3f} ms, ratio {ratio:.3f} (bound {floor:.2f}, "
            f"{ratio / floor:.2f}× of it: {'PASS' if ratio <= TARGET * floor else 'FAIL'}; "
            f"stacked floor {t_floor / t_single:.3f}"
            + (f", {extra} extra nodes dispatch {t_dispatch[0] / t_single:.3f})" if t_dispatch else ")"),
            file=sys.stderr, flush=True,
        )  # fmt: skip
    return rows


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def dispatch(row: dict) -> str:
    if row["dispatch_ratio"] is None:
        return "n/a"
    return f"{row['extra_nodes']}: {row['dispatch_ratio']:.2f}×"


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"onnxruntime {__import__('onnxruntime').__version__}, CPU ({platform.processor() or platform.machine()}), "
        f"{args.threads} intra-op thread(s), median of {args.runs} interleaved runs, K = {K}, context {CONTEXT}. "
        f"Target: ratio ≤ {TARGET} × bound.",
        "",
        "| model | kind | base | batch | multi (ms) | per-context (ms) | ratio | bound | ratio / bound "
        "| target | stacked floor | extra nodes: dispatch | multi file | K per-context files |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        verdict = "PASS" if r["pass"] else "**FAIL**"
        lines.append(
            f"| {r['model']} | {r['kind']} | {r['base']} | {r['batch']} | {r['multi_ms']:.3f} | {r['single_ms']:.3f} | "
            f"**{r['ratio']:.2f}×** | {r['bound']:.2f}× | {r['of_bound']:.2f} | {verdict} | {r['floor_ratio']:.2f}× | "
            f"{dispatch(r)} | "
            f"{mib(r['multi_bytes'])} | {mib(r['per_context_total_bytes'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--kinds", nargs="+", default=["binary", "complex", "onepower", "rotation"])
    parser.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the raw rows here")
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            for kind in args.kinds:
                for base in args.bases:
                    rows += bench(name, kind, base, Path(tmp), args)
    print(markdown(rows, args))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
