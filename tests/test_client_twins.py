"""The client's deliberate sync/asyncio twins stay twins.

Code written twice — once for threads, once for asyncio — is marked on both
sides with ``# twin: <module>.<qualname>`` (module relative to ``client/``)
on the line above the ``def``/``class`` (or its decorators). This test finds
every marker, checks the partner exists and points back, and compares the
two after normalising away what may differ:

* ``async def`` / ``await`` / ``async with`` / ``async for``;
* ``asyncio.sleep`` <-> ``time.sleep``, ``asynccontextmanager`` <-> ``contextmanager``;
* the twins' own names (``unregister_async`` <-> ``unregister``);
* docstrings and type annotations (the clients' types differ);
* what only the threaded side has: ``SYNC_ONLY`` (portrait's progress
  stream — there is no asyncio stream client): such parameters, methods,
  and ``if`` blocks testing them are dropped.

A marked class pair is compared whole (every method, same set of methods).
Anything else — a default, a step, an argument, an extra statement — fails.
"""

from __future__ import annotations

import ast
import copy
import difflib
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

CLIENT = Path(__file__).resolve().parent.parent / "client"
MARKER = re.compile(r"^\s*# twin: (\w+)\.([\w.]+)\s*$")
SYNC_ONLY = {"on_progress", "_streamed"}
RENAMES = {"asynccontextmanager": "contextmanager"}


@dataclass(frozen=True)
class Side:
    module: str
    qualname: str
    node: ast.AST

    @property
    def key(self) -> str:
        return f"{self.module}.{self.qualname}"


def _definitions(tree: ast.Module) -> dict[int, tuple[str, ast.AST]]:
    """First line (decorators included) -> (qualname, node) of every def/class."""
    found: dict[int, tuple[str, ast.AST]] = {}

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                start = min([child.lineno] + [d.lineno for d in child.decorator_list])
                found[start] = (prefix + child.name, child)
                walk(child, prefix + child.name + ".")

    walk(tree, "")
    return found


def find_twins(folder: Path = CLIENT) -> dict[str, tuple[Side, str]]:
    """marked side's key -> (that side, the key its marker names)."""
    marked: dict[str, tuple[Side, str]] = {}
    for path in sorted(folder.glob("*.py")):
        text = path.read_text()
        defs = _definitions(ast.parse(text))
        for number, line in enumerate(text.splitlines(), start=1):
            m = MARKER.match(line)
            if not m:
                continue
            assert number + 1 in defs, f"{path.name}:{number}: a twin marker must sit right above a def or class"
            qualname, node = defs[number + 1]
            side = Side(path.stem, qualname, node)
            marked[side.key] = (side, f"{m.group(1)}.{m.group(2)}")
    return marked


def pairs(marked: dict[str, tuple[Side, str]]) -> list[tuple[Side, Side]]:
    """(sync side, async side) of every twin pair; markers must point both ways."""
    out = []
    for key, (side, partner) in sorted(marked.items()):
        assert partner in marked, f"{key} names {partner}, which has no twin marker (or does not exist)"
        assert marked[partner][1] == key, f"{key} -> {partner}, but {partner} -> {marked[partner][1]}"
        if _is_async(side.node):
            continue  # taken from the sync side
        other = marked[partner][0]
        assert _is_async(other.node), f"{key} and {partner}: exactly one side must be the asyncio one"
        out.append((side, other))
    return out


def _is_async(node: ast.AST) -> bool:
    if isinstance(node, ast.ClassDef):
        return any(isinstance(n, ast.AsyncFunctionDef) for n in node.body)
    return isinstance(node, ast.AsyncFunctionDef)


class Normalise(ast.NodeTransformer):
    """The parts of a twin that must match (see the module doc)."""

    def __init__(self, renames: dict[str, str]):
        self.renames = {**RENAMES, **renames}

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            body = body[1:]
        kept = []
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name in SYNC_ONLY:
                continue
            if isinstance(stmt, ast.If) and any(isinstance(n, ast.Name) and n.id in SYNC_ONLY for n in ast.walk(stmt.test)):
                continue
            kept.append(stmt)
        return kept or [ast.Pass()]

    def visit_AsyncFunctionDef(self, node: ast.AsyncFunctionDef) -> ast.AST:
        return self.visit_FunctionDef(ast.FunctionDef(**{f: getattr(node, f, None) for f in ast.FunctionDef._fields}))

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.name = self.renames.get(node.name, node.name)
        node.returns = None
        node.type_comment = None
        args = node.args
        assert not any(a.arg in SYNC_ONLY for a in args.posonlyargs + args.args), "sync-only parameters must be keyword-only"
        keep = [i for i, a in enumerate(args.kwonlyargs) if a.arg not in SYNC_ONLY]
        args.kwonlyargs = [args.kwonlyargs[i] for i in keep]
        args.kw_defaults = [args.kw_defaults[i] for i in keep]
        node.body = self._body(node.body)
        self.generic_visit(node)
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.name = self.renames.get(node.name, node.name)
        node.body = self._body(node.body)
        self.generic_visit(node)
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        node.annotation = None
        return node

    def visit_Await(self, node: ast.Await) -> ast.AST:
        return self.visit(node.value)

    def visit_AsyncWith(self, node: ast.AsyncWith) -> ast.AST:
        return self.visit(ast.With(items=node.items, body=node.body, type_comment=None))

    def visit_AsyncFor(self, node: ast.AsyncFor) -> ast.AST:
        return self.visit(ast.For(target=node.target, iter=node.iter, body=node.body, orelse=node.orelse, type_comment=None))

    def visit_comprehension(self, node: ast.comprehension) -> ast.AST:
        node.is_async = 0
        self.generic_visit(node)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        if isinstance(node.value, ast.Name) and node.value.id == "asyncio" and node.attr == "sleep":
            return ast.Attribute(value=ast.Name(id="time", ctx=ast.Load()), attr="sleep", ctx=node.ctx)
        self.generic_visit(node)
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        node.id = self.renames.get(node.id, node.id)
        return node


def normalised(node: ast.AST, renames: dict[str, str]) -> ast.AST:
    tree = Normalise(renames).visit(copy.deepcopy(node))
    return ast.fix_missing_locations(tree)


def divergence(sync: ast.AST, asyn: ast.AST, renames: dict[str, str]) -> str:
    """'' when the twins match, else a diff of their normalised source."""
    a, b = normalised(sync, renames), normalised(asyn, renames)
    if ast.dump(a) == ast.dump(b):
        return ""
    return "\n".join(difflib.unified_diff(ast.unparse(a).splitlines(), ast.unparse(b).splitlines(), "sync", "asyncio", lineterm=""))


def _renames(found: list[tuple[Side, Side]]) -> dict[str, str]:
    """The async twin's own name -> the sync one's (where they differ)."""
    out = {}
    for sync, asyn in found:
        s, a = sync.qualname.split(".")[-1], asyn.qualname.split(".")[-1]
        if s != a:
            out[a] = s
    return out


MARKED = find_twins()
PAIRS = pairs(MARKED)
RENAMED = _renames(PAIRS)


def test_twins_are_marked_both_ways() -> None:
    # api's two classes, the one-server drivers, the pools' loop, shm's helpers
    assert len(PAIRS) >= 8, [(s.key, a.key) for s, a in PAIRS]
    assert len(MARKED) == 2 * len(PAIRS)


@pytest.mark.parametrize("sync, asyn", PAIRS, ids=[s.key for s, _ in PAIRS])
def test_twins_match(sync: Side, asyn: Side) -> None:
    if isinstance(sync.node, ast.ClassDef):
        names = lambda c: {n.name for n in c.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))} - SYNC_ONLY  # noqa: E731
        assert names(sync.node) == names(asyn.node), f"{sync.key} and {asyn.key} must offer the same methods"
    diff = divergence(sync.node, asyn.node, RENAMED)
    assert not diff, f"{sync.key} and {asyn.key} diverge beyond async/await:\n{diff}"


# --- the comparison has teeth ----------------------------------------------------------


def _pair(text: str) -> tuple[ast.AST, ast.AST]:
    a, b = ast.parse(text).body
    return a, b


def test_only_async_spelling_is_ignored() -> None:
    same = _pair(
        "def f(x, *, t: int = 1, on_progress=None):\n"
        "    '''doc'''\n"
        "    if on_progress is not None:\n"
        "        return stream(x)\n"
        "    with registered(x):\n"
        "        time.sleep(g(x))\n"
        "    return [h(i) for i in x]\n"
        "async def f_async(x, *, t=1):\n"
        "    async with registered_async(x):\n"
        "        await asyncio.sleep(await g(x))\n"
        "    return [await h(i) for i in x]\n"
    )
    assert divergence(*same, {"f_async": "f", "registered_async": "registered"}) == ""


@pytest.mark.parametrize(
    "change",
    [
        ("top_k: int = 0", "top_k: int = 1"),  # a default
        ("timeout_s=timeout_s, use_shm=use_shm, shm_output_bytes", "timeout_s=timeout_s, shm_output_bytes"),  # an argument
        ("return await self._run(tokenize_op(prompts), timeout_s)", "return await self._run(tokenize_op(prompts[:1]), timeout_s)"),
    ],
)
def test_a_divergence_is_caught(change: tuple[str, str]) -> None:
    text = (CLIENT / "api.py").read_text()
    assert text.count(change[0]) >= 1
    head, sep, tail = text.partition("class AsyncClientAPI")
    mutated = ast.parse(head + sep + tail.replace(change[0], change[1]))
    classes = {n.name: n for n in mutated.body if isinstance(n, ast.ClassDef)}
    assert divergence(classes["ClientAPI"], classes["AsyncClientAPI"], {"AsyncClientAPI": "ClientAPI"})
