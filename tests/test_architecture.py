"""The layering docs/architecture.md describes: dependencies point down (CLI → use cases → file
format and checkpoints → vocabulary and maths), with no import cycle, not even one inside a
function or under TYPE_CHECKING. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "pspctl"

# Lowest first. A module may import its own layer and the ones below.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "vocabulary and maths",
        (
            "pspctl",
            "types",
            "errors",
            "dtypes",
            "contexts",
            "kinds",
            "superpose",
            "measure",
            "policy",
            "architectures",
        ),
    ),
    (
        "file format and checkpoints",
        (
            "digests",
            "interrupts",
            "outputs",
            "checkpoints",
            "header",
            "fileformat",
            "trust",
            "task",
            "plotting",
            "hf",
        ),
    ),
    (
        "use cases",
        (
            "merge",
            "extract",
            "sources",
            "planning",
            "calibration",
            "demo",
            "nn",
            "analysis",
            "training",
            "onnx_export",
        ),
    ),
    ("CLI", ("cli", "__main__")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(path: Path) -> set[str]:
    """Every pspctl module `path` imports anywhere in it (top level, functions, TYPE_CHECKING)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("pspctl"):
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "pspctl"}
    return out


GRAPH = {name: _imports(path) - {name} for name, path in MODULES.items()}


def _layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else module
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS and to docs/architecture.md")


@pytest.mark.parametrize("module", sorted(MODULES))
def test_dependencies_point_down(module):
    upward = [m for m in sorted(GRAPH[module]) if _layer(m) > _layer(module)]
    assert not upward, f"{module} ({LAYERS[_layer(module)][0]}) imports {upward} from a layer above"


def test_no_import_cycles():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        seen[module] = 1
        for dep in sorted(GRAPH[module]):
            if seen.get(dep) == 1:
                raise AssertionError("import cycle: " + " → ".join([*path[path.index(dep) :], dep]))
            if dep not in seen:
                visit(dep, [*path, dep])
        seen[module] = 2

    for module in sorted(GRAPH):
        if module not in seen:
            visit(module, [module])


def test_only_the_cli_imports_typer_and_rich():
    for name, path in MODULES.items():
        if name.startswith("pspctl.cli"):
            continue
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not roots & {"typer", "rich"}, name


def test_merge_and_extract_are_always_the_modules():
    code = (
        "import types, pspctl\n"
        "before = [isinstance(pspctl.merge, types.ModuleType), isinstance(pspctl.extract, types.ModuleType)]\n"
        "import pspctl.merge, pspctl.extract\n"
        "after = [isinstance(pspctl.merge, types.ModuleType), isinstance(pspctl.extract, types.ModuleType)]\n"
        "print(before, after, callable(pspctl.merge.merge), callable(pspctl.extract.extract))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[True, True] [True, True] True True"
