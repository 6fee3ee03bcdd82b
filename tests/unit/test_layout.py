"""The package tree is the architecture: layers import one way, no import loop, only cluster/ imports ray.

Every import of a dist_sae module is read from the source (module level and inside functions alike),
so a lazy import that goes up a layer fails here as surely as a top-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dist_sae"

# Lowest first. A module may import from its own layer or any layer before it, never after.
LAYERS = [
    ("dist_sae.errors", "dist_sae.config", "dist_sae.sections", "dist_sae.progress", "dist_sae.version"),
    ("dist_sae.data",),
    ("dist_sae.sae",),
    ("dist_sae.train",),
    ("dist_sae.cluster",),
    ("dist_sae.session",),
    ("dist_sae.report",),
    ("dist_sae.api",),
    ("dist_sae.apps", "dist_sae.bench"),
    ("dist_sae.commands", "dist_sae.__main__"),
]
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def layer_of(module: str) -> int | None:
    """The layer index of a module; None for the package's own __init__ (the public facade on top)."""
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    if module == "dist_sae":
        return None
    raise AssertionError(f"{module} is in no layer: add its folder to LAYERS (and to the README's layout)")


def imports_of(module: str) -> set[str]:
    """The dist_sae modules `module` imports anywhere in its source (package __init__s left out)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import name`: name may be a submodule
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in MODULES else origin for a in node.names]
        else:
            continue
        for target in targets:
            if target == "dist_sae" or target.startswith("dist_sae."):
                while target not in MODULES:  # `import dist_sae.x.y` of a name inside a module
                    target = target.rpartition(".")[0]
                if MODULES[target].name != "__init__.py" or target == "dist_sae":
                    found.add(target)
    found.discard(module)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_module_is_in_a_layer():
    for module in MODULES:
        layer_of(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_run_down_the_layers(module):
    mine = layer_of(module)
    if mine is None:
        return
    upward = [(t, layer_of(t)) for t in sorted(GRAPH[module]) if layer_of(t) is None or layer_of(t) > mine]
    assert not upward, f"{module} (layer {mine}) imports from higher layers: {upward}"


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if state.get(target) is None:
                visit(target)
        path.pop()
        state[module] = 2

    for module in sorted(MODULES):
        if module not in state:
            visit(module)


def test_only_the_cluster_layer_imports_ray():
    offenders = []
    for module, path in MODULES.items():
        if module.startswith("dist_sae.cluster"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "ray" or n.startswith("ray.") for n in names):
                offenders.append(module)
    assert not offenders, f"ray imported outside dist_sae.cluster: {sorted(set(offenders))}"


def test_no_file_is_too_long():
    files = list(PACKAGE.rglob("*.py")) + list((ROOT / "scripts").glob("*.py"))
    long = {str(p.relative_to(ROOT)): n for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    """The graph includes imports inside functions (the layout rule covers them too)."""
    assert "dist_sae.cluster.ray_session" in GRAPH["dist_sae.session"]  # imported inside open_session
    assert layer_of("dist_sae.cluster.ray_session") < layer_of("dist_sae.session")
