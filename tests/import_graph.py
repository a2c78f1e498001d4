"""facetron's import graph, read from the source with ``ast`` (nothing is
imported), counting imports inside function bodies too, and the layer rules
it must hold (docs/ARCHITECTURE.md "Layers"). Used by tests/test_layers.py.

A subprocess that runs facetron counts as an import too (``Import.subprocess``):
an argv list with ``"-m", "facetron.X"`` imports ``facetron.X``; an argv list
(``[...]``, two items or more) starting with ``"facetron"``,
``shutil.which("facetron")`` or a shell string ``facetron ...`` imports
``facetron.cli`` (the console script). Such an edge
couples the parts like an import does, but loads nothing into the caller's
process, so :func:`cycles` and :func:`closure` leave it out.

The rules (:func:`layer_violations`, :func:`served_model_violations`):

1. core (``facetron/`` minus ``cli/``) imports none of training, export,
   client, benchmarks, web, cli; each part imports only the parts in
   :data:`ALLOWED`; the client imports only :data:`CLIENT_CORE` from core, the
   web app only :data:`WEB_CORE`.
2. ``facetron.serving.<model>`` (one module per served model) is imported only
   by ``model_repository/<model>/1/model.py`` and tests, and imports no other
   serving module: what two served models share lives in ``facetron.pipeline``
   or ``facetron.triton``.
3. ``facetron.pipeline`` (the processing library) imports neither
   ``facetron.triton`` nor ``facetron.serving``: it runs the same inside Triton
   and in-process, the runtimes passed in as callables.
4. ``facetron.triton`` (python-backend glue) imports no ``facetron.serving``:
   the adapters sit on the glue, not the other way round.
5. Outside core and the CLI, only ``facetron.triton.server`` (the tritonserver
   launcher) may be imported from ``facetron.triton``: training, export,
   benchmarks, client and web never load the python-backend glue.
6. Only the CLI and the web app run the CLI as a subprocess (:data:`SUBPROCESS_ALLOWED`).
7. Served ``model.py`` files import core only, and of ``facetron.serving`` only
   their own model's module.
"""

from __future__ import annotations

import ast
import itertools
import re
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
SERVING = "facetron.serving"  # one module per served model (Triton adapters)
PIPELINE = "facetron.pipeline"  # the processing library
TRITON = "facetron.triton"  # python-backend glue + the tritonserver launcher
TRITON_LAUNCHER = "facetron.triton.server"
CLI = "facetron.cli"
#: functions that run a command line given as one string (``os.system("facetron demo")``, ``shell=True``)
SHELL_RUNNERS = {"system", "popen", "run", "Popen", "call", "check_call", "check_output", "create_subprocess_shell"}
_SHELL_FACETRON = re.compile(r"(?:^|[\s/])(?:-m\s+(facetron[\w.]*)|(facetron))(?:\s|$)")


@dataclass(frozen=True)
class Import:
    source: str  # importing module
    target: str  # imported module (facetron module, or the top-level name of an external one)
    line: int
    in_function: bool
    subprocess: bool = False  # a subprocess that runs the target (``-m facetron.X``, the ``facetron`` script)


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
            for target in _spawned(child):
                found.append(Import(name, _resolve(target, sources), child.lineno, in_function, subprocess=True))
            visit(child, inner)

    visit(tree, False)
    return found


def _text(node: ast.AST) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _spawned(node: ast.AST) -> list[str]:
    """The facetron modules a node runs as a subprocess: an argv list or tuple with
    ``"-m", "facetron.X"`` (-> facetron.X), or an argv list of two or more items
    starting with ``"facetron"`` (the console script -> facetron.cli); ``shutil.which("facetron")``; a shell
    string ``"facetron ..."`` / ``"python -m facetron.X ..."`` given to
    ``subprocess.run`` / ``os.system`` and kin."""
    if isinstance(node, (ast.List, ast.Tuple)):
        texts = [_text(e) for e in node.elts]
        found = [nxt for flag, nxt in itertools.pairwise(texts)
                 if flag == "-m" and nxt and (nxt == "facetron" or nxt.startswith("facetron."))]
        if isinstance(node, ast.List) and len(texts) > 1 and texts[0] == "facetron":
            found.append(CLI)  # an argv list; a tuple ("facetron", ...) is a command path (cli.conventions.walk)
        return found
    if isinstance(node, ast.Call):
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        first = _text(node.args[0]) if node.args else None
        if func == "which" and first == "facetron":
            return [CLI]
        if func in SHELL_RUNNERS and first:
            return [m[1] or CLI for m in _SHELL_FACETRON.finditer(first)]
    return []


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
CLIENT_CORE = {"facetron", "facetron.contract", "facetron.errors", "facetron.request", "facetron.token_store"}
#: the web app: the client's core modules + image io (uploads checked with prepare's rules) + atomic writes;
#: no model code
WEB_CORE = CLIENT_CORE | {"facetron.imageio", "facetron.atomic"}
#: part -> parts it may run as a subprocess beyond what it may import. The web app runs prepare and
#: training as the operator's CLI in a separate process, so torch never loads in the web process; it
#: imports nothing of training. Everything else calls the library (the CLI may run itself: ALLOWED).
SUBPROCESS_ALLOWED = {"facetron.web": {CLI}}


def within(module: str, package: str) -> bool:
    """``module`` is ``package`` or one of its modules."""
    return module == package or module.startswith(package + ".")


def layer_violations(imports: list[Import]) -> list[str]:
    """Every import that breaks a layer rule, as 'source:line -> target (rule)'."""
    bad = []
    for imp in imports:
        src, dst = part_of(imp.source), part_of(imp.target)
        where = f"{imp.source}:{imp.line} -> {imp.target}" + (" (inside a function)" if imp.in_function else "")
        where += " (a subprocess)" if imp.subprocess else ""
        spawn_ok = imp.subprocess and dst in SUBPROCESS_ALLOWED.get(src, ())
        if dst in PARTS and dst != src and dst not in ALLOWED[src] and not spawn_ok:
            bad.append(f"{where}: {src} may not " + ("run" if imp.subprocess else "import") + f" {dst}")
        if src == "facetron.client" and dst == "core" and imp.target not in CLIENT_CORE:
            bad.append(f"{where}: the client imports only {sorted(CLIENT_CORE)} from core")
        if src == "facetron.web" and dst == "core" and imp.target not in WEB_CORE:
            bad.append(f"{where}: the web app imports only {sorted(WEB_CORE)} from core")
        bad.extend(f"{where}: {rule}" for rule in _adapter_rules(imp, src))
    return bad


def _adapter_rules(imp: Import, src: str) -> list[str]:
    """Rules 2-5 of the module docstring: serving, pipeline and triton, each with its reason."""
    s, t = imp.source, imp.target
    broken = []
    if within(t, SERVING) and t != s:
        if within(s, SERVING):
            broken.append(f"a serving module imports no other {SERVING} module (shared code lives in "
                          f"{PIPELINE} or {TRITON})")
        else:
            broken.append(f"{SERVING}.<model> is imported only by model_repository/<model>/1/model.py and tests")
    if within(s, PIPELINE) and (within(t, TRITON) or within(t, SERVING)):
        broken.append(f"the processing library imports neither {TRITON} nor {SERVING}: it runs the same in Triton "
                      "and in-process; runtimes are passed in as callables")
    if within(s, TRITON) and within(t, SERVING):
        broken.append(f"{TRITON} imports no {SERVING}: the adapters use the glue, not the other way round")
    if src not in ("core", CLI) and within(t, TRITON) and t != TRITON_LAUNCHER:
        broken.append(f"outside core and the CLI only {TRITON_LAUNCHER} (the tritonserver launcher) is imported "
                      f"from {TRITON}, never the python-backend glue")
    return broken


def served_model_violations(sources: dict[str, str], modules: dict[str, str]) -> list[str]:
    """Served model.py files (``model_repository/<model>``) import core only, and
    of facetron.serving only ``facetron.serving.<model>``, the module of the model they serve."""
    bad = []
    for name, text in sources.items():
        own = f"{SERVING}.{name.rpartition('/')[2]}"
        for imp in imports_of(name, text, modules):
            if part_of(imp.target) in PARTS:
                bad.append(f"{name}:{imp.line} -> {imp.target}: served models import core only")
            if within(imp.target, SERVING) and imp.target != own:
                bad.append(f"{name}:{imp.line} -> {imp.target}: a served model imports only its own module {own}")
    return bad


def cycles(imports: list[Import]) -> list[list[str]]:
    """Import cycles among facetron modules (deferred imports count; a subprocess is no import cycle)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if imp.target.startswith("facetron") and imp.target != imp.source and not imp.subprocess:
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
    """Every facetron module ``start`` loads into its process, transitively
    (deferred imports too; subprocesses load into their own)."""
    edges: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.subprocess:
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
