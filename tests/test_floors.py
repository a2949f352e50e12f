"""The package stands on its floors: each module imports only from its own floor or below, and
no import circle exists (docs/architecture.md). Read from the source with `ast`, every import
counted (module level, inside functions, under TYPE_CHECKING), so a lazy import that goes up a
floor fails here just as a top-level one would. Package `__init__` facades (lazy re-exports of
public names) are the one exception: they import nothing when loaded."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sparsebk"

# bottom to top; a module's floor is the first prefix it matches (most specific first)
FLOORS = [
    ("foundation", ["sparsebk.validation", "sparsebk.scheduler", "sparsebk._lazy"]),
    ("model", ["sparsebk.model"]),
    ("parallel", ["sparsebk.parallel"]),
    ("storage", ["sparsebk.storage"]),
    ("evaluation", ["sparsebk.evaluation"]),
    ("data", ["sparsebk.data"]),
    ("inference", ["sparsebk.inference"]),
    ("training", ["sparsebk.train"]),
    ("training on Ray", ["sparsebk.train.ray_train"]),
    ("tools", ["sparsebk.tune", "sparsebk.bench", "sparsebk.cli"]),
]
TOP = len(FLOORS) - 1


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def floor(module: str) -> int:
    """The module's floor; every command line (`*.cli`) is on the top floor."""
    if module.rsplit(".", 1)[-1] == "cli" or module == "sparsebk":  # the package's facade
        return TOP
    best, level = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is on no floor: add it to FLOORS"
    return level


def imports(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The sparsebk modules `module` imports, anywhere in its source."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()

    def resolve(name: str) -> str:
        while name not in known:
            name = name.rsplit(".", 1)[0]
        return name

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {resolve(a.name) for a in node.names if a.name.startswith("sparsebk")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            if base.startswith("sparsebk"):
                for a in node.names:
                    full = f"{base}.{a.name}"
                    found.add(full if full in known else resolve(base))
    found.discard(module)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def is_facade(module: str) -> bool:
    return (modules()[module].name == "__init__.py")


def test_every_module_has_a_floor():
    for m in modules():
        floor(m)


def test_no_import_goes_up_a_floor():
    up = sorted(f"{a} ({FLOORS[floor(a)][0]}) imports {b} ({FLOORS[floor(b)][0]})"
                for a, deps in graph().items() if not is_facade(a)
                for b in deps if floor(b) > floor(a))
    assert up == []


def test_internal_modules_import_no_facade_above_their_floor():
    """A lazy facade (`sparsebk`, `sparsebk.train`, ...) re-exports from many floors: a module
    that imports names through one may reach above itself unseen, so only callers on the
    facade's own floor or above use it."""
    g = graph()
    bad = sorted(f"{a} imports the facade {b}" for a, deps in g.items() if not is_facade(a)
                 for b in deps if is_facade(b) and b != "sparsebk" and floor(b) > floor(a))
    bad += sorted(f"{a} imports the top facade" for a, deps in g.items()
                  if not is_facade(a) and "sparsebk" in deps and floor(a) != TOP)
    assert bad == []


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    g = {a: {b for b in deps if not is_facade(b)} for a, deps in graph().items()
         if not is_facade(a)}
    assert cycles(g) == []


def test_cycle_finder_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("module", ["sparsebk.model.lm", "sparsebk.model.layers"])
def test_the_model_imports_only_the_foundation_and_itself(module):
    deps = graph()[module]
    assert all(floor(d) <= floor(module) for d in deps), deps
