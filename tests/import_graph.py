"""facetron's import graph, read from the source with ``ast`` (nothing is
imported), counting imports inside function bodies too, and the layer rules
it must hold (docs/ARCHITECTURE.md "Layers"). Used by tests/test_layers.py.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: source folder -> import name (pyproject.toml's package-dir)
PACKAGE_DIRS = {
    "facetron": "facetron",
    "training": "facetron.training",
    "export": "facetron.export",
    "client": "facetron.client",
    "benchmarks": "facetron.benchmarks",
    "web": "facetron.web",
}
PARTS = ("facetron.cli", "facetron.training", "facetron.export", "facetron.client", "facetron.benchmarks",
         "facetron.web")
#: heavy frameworks the runtime-LoRA ``unet`` model must not load at request time
TORCH_STACK = ("torch", "diffusers", "peft", "transformers", "accelerate")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (facetron module, or the top-level name of an external one)
    line: int
    in_function: bool


def module_sources(root: Path = ROOT) -> dict[str, str]:
    """Every facetron module's import name -> its source text."""
    out = {}
    for folder, name in PACKAGE_DIRS.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(base).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "facetron" and parts and parts[0] in ("training", "export", "client", "benchmarks", "web"):
                continue  # not a real folder of the facetron package
            out[".".join([name, *parts])] = path.read_text()
    return out


def served_model_sources(root: Path = ROOT) -> dict[str, str]:
    """model_repository/<model>/1/model.py -> source (Triton loads these)."""
    return {f"model_repository/{p.parent.parent.name}": p.read_text()
            for p in sorted((root / "model_repository").glob("*/1/model.py"))}


def _is_package(name: str, sources: dict[str, str]) -> bool:
    return any(m.startswith(name + ".") for m in sources)


def imports_of(name: str, text: str, sources: dict[str, str]) -> list[Import]:
    """The imports of one module; ``from pkg import mod`` counts as ``pkg.mod``."""
    tree = ast.parse(text)
    package = name if _is_package(name, sources) else name.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    found.append(Import(name, _resolve(alias.name, sources), child.lineno, in_function))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in child.names:
                    full = f"{base}.{alias.name}"
                    target = full if full in sources else _resolve(base, sources)
                    found.append(Import(name, target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def _resolve(module: str, sources: dict[str, str]) -> str:
    if module.startswith("facetron"):
        while module and module not in sources:
            module = module.rpartition(".")[0]
        return module or "facetron"
    return module.split(".")[0]


def graph(sources: dict[str, str]) -> list[Import]:
    return [imp for name, text in sources.items() for imp in imports_of(name, text, sources)]


def part_of(module: str) -> str:
    """'core' or the part (facetron.cli, facetron.training, ...) a module belongs to."""
    for part in PARTS:
        if module == part or module.startswith(part + "."):
            return part
    return "core" if module.startswith("facetron") else "external"


# --- the rules -----------------------------------------------------------------------

#: part -> parts it may import (core and externals are always allowed, except where noted)
ALLOWED = {
    "core": set(),
    "facetron.client": set(),
    "facetron.training": set(),
    "facetron.export": {"facetron.training"},
    "facetron.benchmarks": {"facetron.training", "facetron.export", "facetron.client"},
    "facetron.web": {"facetron.client"},
    "facetron.cli": set(PARTS),
}
#: the client uses only these core modules (no torch, no model code)
CLIENT_CORE = {"facetron", "facetron.contract", "facetron.errors"}
#: the web app: the client's core modules + image io (uploads checked with prepare's rules); no model code
WEB_CORE = CLIENT_CORE | {"facetron.imageio"}


def layer_violations(imports: list[Import]) -> list[str]:
    """Every import that breaks a layer rule, as 'source:line -> target (rule)'."""
    bad = []
    for imp in imports:
        src, dst = part_of(imp.source), part_of(imp.target)
        where = f"{imp.source}:{imp.line} -> {imp.target}" + (" (inside a function)" if imp.in_function else "")
        if dst in PARTS and dst != src and dst not in ALLOWED[src]:
            bad.append(f"{where}: {src} may not import {dst}")
        if src == "facetron.client" and dst == "core" and imp.target not in CLIENT_CORE:
            bad.append(f"{where}: the client imports only {sorted(CLIENT_CORE)} from core")
        if src == "facetron.web" and dst == "core" and imp.target not in WEB_CORE:
            bad.append(f"{where}: the web app imports only {sorted(WEB_CORE)} from core")
    return bad


def served_model_violations(sources: dict[str, str], modules: dict[str, str]) -> list[str]:
    """Served model.py files import core only (facetron.serving, contract, ...)."""
    bad = []
    for name, text in sources.items():
        for imp in imports_of(name, text, modules):
            if part_of(imp.target) in PARTS:
                bad.append(f"{name}:{imp.line} -> {imp.target}: served models import core only")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Import cycles among facetron modules (deferred imports count)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target.startswith("facetron") and imp.target != imp.source:
            edges.setdefault(imp.source, set()).add(imp.target)
    found, state = [], {}

    def dfs(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt, stack)
        stack.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            dfs(node, [])
    return found


def closure(start: str, imports: list[Import]) -> set[str]:
    """Every facetron module ``start`` loads, transitively (deferred imports too)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        edges.setdefault(imp.source, set()).add(imp.target)
    seen, todo = set(), [start]
    while todo:
        node = todo.pop()
        if node in seen:
            continue
        seen.add(node)
        todo.extend(t for t in edges.get(node, ()) if t.startswith("facetron"))
        # importing a module runs its packages' __init__ first
        parent = node.rpartition(".")[0]
        if parent:
            todo.append(parent)
    return seen
