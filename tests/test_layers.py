"""The package's layers point one way, and importing it is cheap (issue: one-way architecture).

Walks every module's imports from its source (no import runs), and starts fresh interpreters to see what
``import fasp_edge`` and the benchmark's measuring child load.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fasp_edge.runtime_bench.measure import HEAVY_MODULES

PACKAGE = Path(__file__).resolve().parents[1] / "fasp_edge"

#: bottom to top; a module may import only from its own layer or the layers below it
LAYERS = [
    ("base", ["fasp_edge", "fasp_edge.errors", "fasp_edge.fsutil", "fasp_edge.procutil", "fasp_edge.artifacts",
              "fasp_edge.versions"]),
    ("families", ["fasp_edge.models"]),
    ("checkpoints", ["fasp_edge.checkpoints"]),
    ("pruning", ["fasp_edge.pipeline"]),
    ("runtime", ["fasp_edge.runtime"]),
    ("export", ["fasp_edge.export"]),
    ("bench", ["fasp_edge.runtime_bench"]),
    ("job", ["fasp_edge.job"]),
    ("cli", ["fasp_edge.cli"]),
]

#: modules whose function-local imports of the package are their purpose: the CLI loads a subcommand's
#: layers (and torch) only when it runs, so ``fasp-edge --help`` and argument errors answer at once; the
#: measuring child must apply its profile before anything that loads torch
DEFERRED_IMPORTS = {"fasp_edge.cli", "fasp_edge.runtime_bench.measure"}

HEAVY = (*HEAVY_MODULES, "psutil")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported fasp_edge module, imported inside a function, line) for every import statement of ``path``."""
    is_pkg = path.name == "__init__.py"
    modules = _modules()
    found = []

    def visit(node, local: bool):
        for child in ast.iter_child_nodes(node):
            inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
                    pkg = pkg[: len(pkg) - (child.level - 1)]
                    base = ".".join(pkg + ([base] if base else []))
                if base.split(".")[0] == "fasp_edge":
                    for alias in child.names:  # "from . import x" may name a submodule
                        sub = f"{base}.{alias.name}"
                        found.append((sub if sub in modules else base, local, child.lineno))
            elif isinstance(child, ast.Import):
                found.extend((a.name, local, child.lineno) for a in child.names if a.name.split(".")[0] == "fasp_edge")
            visit(child, inner)

    visit(ast.parse(path.read_text()), False)
    return found


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{module} belongs to no layer; add it to LAYERS"
    return rank


def test_every_import_points_down_the_layers():
    wrong = []
    for name, path in _modules().items():
        for target, _, line in _imports(name, path):
            if _layer(target) > _layer(name):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYERS[_layer(name)][0]}) imports {target} "
                             f"({LAYERS[_layer(target)][0]})")
    assert not wrong, "imports pointing up the layers:\n" + "\n".join(wrong)


def test_no_import_cycle_and_no_hidden_function_local_imports():
    modules = _modules()
    graph = {name: set() for name in modules}
    hidden = []
    for name, path in modules.items():
        for target, local, line in _imports(name, path):
            if target != name and target != "fasp_edge":  # every submodule import runs the package's __init__
                graph[name].add(target)
            if local and name not in DEFERRED_IMPORTS:
                hidden.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} inside a function")
    hidden = list(dict.fromkeys(hidden))
    assert not hidden, "function-local imports of the package (import at the top instead):\n" + "\n".join(hidden)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt in graph and not state.get(nxt):
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if not state.get(name):
            visit(name)


def _fresh(code: str, env: dict | None = None) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env=env).stdout


def test_importing_the_package_loads_no_heavy_library():
    """Nor does the CLI before a subcommand runs (``fasp-edge --help`` and argument errors answer at once)."""
    out = json.loads(_fresh("import json, sys, fasp_edge, fasp_edge.artifacts, fasp_edge.versions, fasp_edge.cli, "
                            "fasp_edge.runtime_bench, fasp_edge.runtime_bench.measure; "
                            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"))
    assert out == []
    # the public names still resolve, on first use
    assert _fresh("import fasp_edge; print(fasp_edge.prune.__module__, fasp_edge.load_bundle.__module__)").split() == \
        ["fasp_edge.pipeline.fasp", "fasp_edge.runtime.bundle"]
