"""The layers stay layers: the import graph of ``vold`` (trainer, demo, kernels) and of ``benchmarks`` has no
cycle, counting function-level (lazy) imports too, every kernel module imports on its own, and the float64
oracle ``vold.kernels.reference`` imports only torch.

The graph is read from the source with ``ast`` (every ``import`` / ``from ... import`` statement anywhere in a
module, at any depth), so a cycle hidden behind a lazy import inside a function is found as well. An edge
``a -> b`` means a statement in ``a`` names module ``b``; ``from . import x`` names the submodule ``x`` when
there is one (else the package). A package's own ``__init__`` running before its submodules is Python's
package machinery, not an import statement, and is not an edge.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def package_modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    """``{dotted module name: file}`` for every ``.py`` file of ``package`` (a folder under ``root``)."""
    base = root.joinpath(*package.split("."))
    modules = {}
    for path in sorted(base.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The innermost module of the package that the dotted ``name`` lies in (None: outside it)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imported_names(module: str, path: Path) -> set[str]:
    """Every dotted module name an import statement of ``module`` names, anywhere in its body."""
    is_package = path.name == "__init__.py"
    here = module.split(".") if is_package else module.split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = here[: len(here) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names.update(f"{base}.{alias.name}" for alias in node.names)  # resolved to a module by _resolve
    return names


def import_graph(package: str, root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules of the same package it imports}`` (self-edges and the package's outside left out)."""
    modules = package_modules(package, root)
    graph = {}
    for module, path in modules.items():
        targets = {_resolve(name, modules) for name in imported_names(module, path)}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle ``[a, b, ..., a]`` of ``graph`` (depth-first search), or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_finds_a_lazy_import_cycle(tmp_path):
    """The checker itself: a cycle closed only by a function-level import is reported."""
    pkg = tmp_path / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\ndef f():\n    return g()\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f  # lazy\n    return f\n")
    (pkg / "c.py").write_text("from . import a\n")
    graph = import_graph("cyc", tmp_path)
    assert graph["cyc.a"] == {"cyc.b"} and graph["cyc.b"] == {"cyc.a"} and graph["cyc.c"] == {"cyc.a"}
    assert find_cycle(graph) in (["cyc.a", "cyc.b", "cyc.a"], ["cyc.b", "cyc.a", "cyc.b"])
    (pkg / "b.py").write_text("def g():\n    return 1\n")
    assert find_cycle(import_graph("cyc", tmp_path)) is None


@pytest.mark.parametrize("package", ["vold", "vold.kernels", "benchmarks"])
def test_import_graph_is_acyclic(package):
    """No cycle anywhere: the trainer (stages import vold.scoring/vold.stage, never each other), the demo
    (vold.demo.arms is what its pipeline, report and config share), the rollout engines (they import
    vold.rollout.base, not the package that picks them) and the kernels."""
    graph = import_graph(package)
    assert find_cycle(graph) is None, f"import cycle in {package}: {' -> '.join(find_cycle(graph))}"


def test_kernel_layers():
    """common at the bottom (imports nothing of the package), the engines above it, the chunk loop imports no
    engine, and nothing in vold.kernels imports the rest of vold."""
    graph = import_graph("vold.kernels")
    assert graph["vold.kernels.common"] == set()
    assert graph["vold.kernels.engines.torch"] == {"vold.kernels.common"}
    assert graph["vold.kernels.engines.triton"] == {"vold.kernels.common"}
    assert graph["vold.kernels.chunked"] == {"vold.kernels.common"}
    for module, path in package_modules("vold.kernels").items():
        outside = {n for n in imported_names(module, path) if n.split(".")[0] == "vold"
                   and not n.startswith("vold.kernels")}
        assert not outside, f"{module} imports {outside} from outside vold.kernels"


def test_reference_imports_only_torch():
    path = package_modules("vold.kernels")["vold.kernels.reference"]
    top = {name.split(".")[0] for name in imported_names("vold.kernels.reference", path)}
    assert top <= {"__future__", "torch"}, top


def test_each_kernel_module_imports_on_its_own():
    """In a fresh interpreter, each module of vold.kernels imports with nothing of vold imported before it,
    and none of them (but the Triton engine) imports triton."""
    triton_engine = "vold.kernels.engines.triton"  # last: triton, once imported, stays in sys.modules
    names = sorted(set(package_modules("vold.kernels")) - {triton_engine}) + [triton_engine]
    script = f"""
import importlib, json, sys
result = {{}}
for name in {names!r}:
    for loaded in [m for m in sys.modules if m == "vold" or m.startswith("vold.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
    result[name] = "triton" in sys.modules
print(json.dumps(result))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    triton_loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(triton_loaded) == set(names)
    assert [n for n, loaded in triton_loaded.items() if loaded] == [triton_engine]


def test_setup_py_ships_every_kernel_package():
    """Each package folder of vold.kernels (engines/ included) is in setup.py's ``packages=`` list."""
    call = next(n for n in ast.walk(ast.parse((ROOT / "setup.py").read_text()))
                if isinstance(n, ast.keyword) and n.arg == "packages")
    listed = set(ast.literal_eval(call.value))
    folders = {m for m, p in package_modules("vold.kernels").items() if p.name == "__init__.py"}
    assert folders and folders <= listed, folders - listed
