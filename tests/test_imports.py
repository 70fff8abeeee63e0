"""The package's modules import one another in one direction only: the graph of intra-package imports
(module level and inside functions alike) has no cycle."""
import ast
import os
from pathlib import Path
from typing import Dict, List, Set

import m2clip_fast
import m2clip_fast.kernels

PACKAGE = Path(m2clip_fast.__file__).parent
# setup.py installs the top-level kernels/ folder as m2clip_fast.kernels: in an editable install it is not
# inside PACKAGE, so it is walked from where Python finds it
KERNELS = Path(m2clip_fast.kernels.__file__).parent


def _walk(root: Path, prefix: List[str]) -> Dict[str, Path]:
    """Dotted name → file of every module under ``root`` (the compiled extension too, as a module without
    imports)."""
    found = {}
    for folder, _, files in os.walk(root, followlinks=True):
        for name in files:
            if not name.endswith((".py", ".so", ".pyd")):
                continue
            parts = list(Path(folder, name.split(".")[0]).relative_to(root).parts)  # _C.cpython-311-...so → _C
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([*prefix, *parts])] = Path(folder, name)
    return found


def _modules() -> Dict[str, Path]:
    return {**_walk(PACKAGE, ["m2clip_fast"]), **_walk(KERNELS, ["m2clip_fast", "kernels"])}


def _imports(name: str, path: Path, modules: Dict[str, Path]) -> Set[str]:
    """The package modules ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    if path.suffix != ".py":
        return set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # "from . import x" / "from .data import loader" imports the module x; "from .data import f", the
            # package (its __init__) that defines f
            targets.update(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names)
    return {t for t in targets if t in modules and t != name}


def _cycle(graph: Dict[str, Set[str]]) -> List[str]:
    """One cycle of ``graph`` (as a path that ends where it starts), or [] when there is none."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done
    path: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_the_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert {"m2clip_fast.train", "m2clip_fast.data.loader", "m2clip_fast.kernels.ted"} <= set(graph)
    # the graph sees real edges: "from . import x", and imports inside functions
    assert "m2clip_fast.data.decode" in graph["m2clip_fast.data.frames"]
    assert "m2clip_fast.model" in graph["m2clip_fast.checkpoint"]
    cycle = _cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert _cycle({"a": {"a"}}) == ["a", "a"]
