"""Layers point one way, and no module imports itself back (DESIGN.md, STYLE.md habits 11 and 15).

The import graph is read from the source (every import statement, inside functions too), one
node per module; a package's node is its `__init__`. Importing `a.b.c` runs `a/__init__` and
`a/b/__init__` first, but those implicit edges are left out: a room's `__init__` importing its
methods once (so they register) is the pattern, not a circle.
"""

import ast
from pathlib import Path

import lilliput

FLOOR = {"core": 1, "data": 1, "infer": 2, "eval": 3, "train": 4, "compress": 5, "export": 6, "jobs": 7,
         "serve": 7}
ROOT = Path(lilliput.__file__).parent


def module_names() -> dict[str, Path]:
    """'lilliput.core.model' -> its file, 'lilliput.core' -> core/__init__.py."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("lilliput",) + path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module that `import name` runs last: name itself, else its longest importable prefix."""
    parts = name.split(".")
    while parts:
        if ".".join(parts) in modules:
            return ".".join(parts)
        parts.pop()
    return None


def import_graph() -> dict[str, set[str]]:
    """module -> the lilliput modules it imports (at the top or inside functions)."""
    modules = module_names()
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from .x import y, from .. import z
                    up = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                for a in node.names:  # `from pkg import mod` imports the module pkg.mod
                    targets.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
        graph[name] = {t for t in map(lambda t: _resolve(t, modules), targets)
                       if t is not None and t != name and t.startswith("lilliput")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_no_room_imports_a_higher_one():
    wrong = []
    for module, targets in import_graph().items():
        if room(module) not in FLOOR:
            continue
        for t in targets:
            other = room(t)
            if other in ("cli", "demo") or FLOOR.get(other, 0) > FLOOR[room(module)]:
                wrong.append(f"{module} imports {t}")
    assert not wrong, wrong


def test_no_import_circles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
