"""Fuzz the superposed file's reader: mutate a real file, run `info --json` and `extract --context all`.

Two kinds of mutation:
- **corruption** (byte flips, deletions, truncations, edits of the header JSON that leave the
  checksums as they were): every run must end in a clean one-line error, or give output
  identical to the unmutated file's. Nothing silently different.
- **forgery** (edits of the header JSON with the checksums recomputed, as an attacker or a
  buggy writer would): the schema and the tensor checks are all that stand. Every run must end
  in a clean one-line error or exit 0 with each extracted tensor of the shape and dtype the
  header declares, and nothing written outside the output folder.

A traceback, an exit code of 1 (an unexpected exception) or a broken rule is a failure.

    python benchmarks/fuzz_header.py --cases 2000      # prints the counts; exits 1 on any failure
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from typer.testing import CliRunner

from pspctl.cli import app
from pspctl.outputs import crc32, write_safetensors

DOCUMENTED = {0, 2, 3, 4, 5, 6, 7, 8, 9, 10}  # docs/cli.md; 1 is "a bug"
runner = CliRunner()


def make_original(folder: Path) -> Path:
    """A small real merge: 3 MLPs, some tensors superposed, some per context."""
    torch.manual_seed(0)
    for i in range(3):
        net = torch.nn.Sequential(torch.nn.Linear(40, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        torch.save(net.state_dict(), folder / f"m{i}.pt")
    args = ["merge", *(str(folder / f"m{i}.pt") for i in range(3)), "-o", str(folder / "w.safetensors"), "-q"]
    result = runner.invoke(app, [*args, "--superpose", "0.weight", "--labels", "a,b,c"])
    assert result.exit_code == 0, result.output
    return folder / "w.safetensors"


def read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def _random_json(rng: random.Random) -> Any:
    return rng.choice(
        [
            None,
            True,
            -1,
            0,
            1,
            2,
            3,
            4,
            10**20,
            0.5,
            float("nan"),
            "",
            "x",
            "../x",
            "/abs/x",
            "a",
            [],
            {},
            [1, 2],
            {"a": 1},
        ]
    )


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside a JSON document."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def edit_header(text: str, rng: random.Random) -> str:
    """One random edit of the header JSON: replace, delete, add, nudge a number, or duplicate."""
    doc = json.loads(text)
    path = rng.choice(_paths(doc))
    parent = doc
    for p in path[:-1]:
        parent = parent[p]
    key = path[-1]
    op = rng.choice(["replace", "delete", "add", "nudge", "copy_sibling"])
    if op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[f"extra{rng.randint(0, 9)}"] = _random_json(rng)
    elif op == "nudge" and isinstance(parent[key], int) and not isinstance(parent[key], bool):
        parent[key] += rng.choice([-1, 1])
    elif op == "copy_sibling" and isinstance(parent, list) and len(parent) > 1:
        parent[key] = parent[(key + 1) % len(parent)]
    else:
        parent[key] = _random_json(rng)
    return json.dumps(doc)


def mutate(original: Path, target: Path, rng: random.Random) -> str:
    """Write one mutation of `original` at `target`; returns its family (corruption or forgery)."""
    data = bytearray(original.read_bytes())
    op = rng.choice(["flip", "flip", "delete", "truncate", "header", "forge", "forge", "forge"])
    if op == "flip":
        for _ in range(rng.randint(1, 3)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif op == "delete":
        i = rng.randrange(len(data))
        del data[i : i + rng.randint(1, 64)]
    elif op == "truncate":
        data = data[: rng.randrange(len(data))]
    if op in ("flip", "delete", "truncate"):
        target.write_bytes(bytes(data))
        return "corruption"
    meta, tensors = read(original)
    meta["pspctl.header"] = edit_header(meta["pspctl.header"], rng)
    if op == "forge":  # recompute the header's checksum as a forger would
        sums = json.loads(meta["pspctl.checksums"])
        sums["header"] = f"{zlib.crc32(meta['pspctl.header'].encode()):08x}"
        sums["tensors"] = {n: crc32(t) for n, t in tensors.items()}
        meta["pspctl.checksums"] = json.dumps(sums)
    write_safetensors(tensors, target, meta)
    return "corruption" if op == "header" else "forgery"


def outcome(path: Path, out: Path) -> tuple[int, str, dict[str, Any] | None]:
    """(exit code, stderr, {"info": ..., "models": {file: {name: tensor}}} when both succeeded)."""
    info = runner.invoke(app, ["info", "--json", str(path)])
    if info.exit_code != 0:
        return info.exit_code, info.stderr, None
    extract = runner.invoke(app, ["extract", str(path), "--context", "all", "-o", str(out)])
    if extract.exit_code != 0:
        return extract.exit_code, extract.stderr, None
    models = {}
    for f in sorted(out.iterdir()):
        with safe_open(str(f), "pt") as h:
            models[f.name] = {k: h.get_tensor(k) for k in h.keys()}
    data = json.loads(info.stdout)
    data.pop("path")
    return 0, "", {"info": data, "models": models}


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    if a["info"] != b["info"] or a["models"].keys() != b["models"].keys():
        return False
    return all(
        m.keys() == b["models"][f].keys() and all(torch.equal(t, b["models"][f][k]) for k, t in m.items())
        for f, m in a["models"].items()
    )


def check_one(
    original: Path, reference: dict[str, Any], folder: Path, rng: random.Random
) -> tuple[str, str, str]:
    """Mutate once and judge: (family, verdict, detail); verdict is error, identical, valid or FAIL."""
    target = folder / "mutated.safetensors"
    out = folder / "out"
    family = mutate(original, target, rng)
    before = set(folder.parent.rglob("*"))
    code, stderr, result = outcome(target, out)
    escaped = [p for p in set(folder.parent.rglob("*")) - before if folder not in p.parents]
    try:
        if escaped:
            return family, "FAIL", f"wrote outside its folder: {escaped[:2]}"
        if code not in DOCUMENTED:
            return family, "FAIL", f"exit {code}: {stderr.strip()[:200]}"
        if code != 0:
            if "Traceback" in stderr or stderr.count("\n") != 1 or not stderr.startswith("error: "):
                return family, "FAIL", f"not one line: {stderr[:200]!r}"
            return family, "error", stderr.strip()
        assert result is not None
        if family == "corruption":
            return (
                (family, "identical", "")
                if same(result, reference)
                else (family, "FAIL", "silently different")
            )
        shapes = {n: m["shape"] for n, m in result["info"]["tensors"].items()}
        dtypes = {n: m["dtype"] for n, m in result["info"]["tensors"].items()}
        for model in result["models"].values():
            for name, t in model.items():
                if list(t.shape) != shapes[name] or str(t.dtype).removeprefix("torch.") != dtypes[name]:
                    return family, "FAIL", f"{name}: {list(t.shape)} {t.dtype} vs the header's"
        return family, "valid", ""
    finally:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        target.unlink(missing_ok=True)


def run(cases: int, seed: int = 0) -> tuple[Counter, list[str]]:
    rng = random.Random(seed)
    counts: Counter = Counter()
    failures: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "case").mkdir()
        original = make_original(root)
        code, _, reference = outcome(original, root / "ref")
        assert code == 0 and reference is not None
        for i in range(cases):
            family, verdict, detail = check_one(original, reference, root / "case", rng)
            counts[family, verdict] += 1
            if verdict == "FAIL":
                failures.append(f"case {i} ({family}): {detail}")
    return counts, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    start = time.perf_counter()
    counts, failures = run(args.cases, args.seed)
    print(f"{args.cases} mutated files in {time.perf_counter() - start:.0f} s (seed {args.seed})")
    print(f"{'family':<12}{'clean error':>12}{'identical':>11}{'valid':>7}{'FAIL':>6}")
    for family in ("corruption", "forgery"):
        row = [counts[family, v] for v in ("error", "identical", "valid", "FAIL")]
        print(f"{family:<12}{row[0]:>12}{row[1]:>11}{row[2]:>7}{row[3]:>6}")
    for line in failures[:20]:
        print(line)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
