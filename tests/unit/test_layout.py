"""The package layout rules of the design ("Principles"), checked on the source with `ast`.

Every .py file of the six packages is parsed (generated `*_pb2*.py` stubs skipped) and every
import is read: at module level, inside functions and under `if TYPE_CHECKING:` alike (a
deferred import hides a dependency, it does not remove it); relative imports are resolved
against the importing module. The rules:

1. every import of our packages names a module that exists;
2. no import circles between modules;
3. no `_private` name of one of our modules is imported by another module (a `_module` is
   private to its package: its siblings may import it);
4. a package imports only what `ALLOWED` below lists for it.

This file is the rules' one source: change the table here, not a copy elsewhere.
"""

from __future__ import annotations

import ast
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("controller", "trainer", "sampler", "reshard", "rewards", "deploy")

# Which of our modules each package may import, besides its own modules. An entry allows that
# module and anything under it ("trainer.model" also allows a future trainer/model/ package).
#   controller: the one place that knows the whole loop, so anything.
#   controller.config: the ground everyone stands on; nothing else of controller/.
#   reshard: moves a pytree between layouts; trainer and sampler may use it.
#   trainer.model: the sampler runs the trainer's forward; nothing else of trainer/.
# So sampler and trainer never import each other otherwise; rewards and deploy stand on the
# config alone; reshard knows no model, only pytrees.
ALLOWED: dict[str, tuple[str, ...]] = {
    "controller": ("*",),
    "trainer": ("controller.config", "reshard"),
    "sampler": ("controller.config", "reshard", "trainer.model"),
    "reshard": ("controller.config",),
    "rewards": ("controller.config",),
    "deploy": ("controller.config",),
}

# (importing module, "module._name") pairs allowed to cross a module boundary on purpose; keep
# it empty unless a review agrees. Only our own packages are checked: a private name of a
# third-party library (`jax._src`, ...) is that library's business, not a layout rule of ours.
PRIVATE_IMPORT_ALLOWLIST: frozenset[tuple[str, str]] = frozenset()


@dataclass(frozen=True)
class Import:
    """One edge: `importer` imports `target`, one of our modules (as written, resolved)."""

    importer: str
    target: str  # for `from a.b import c`: "a.b.c" if that is a module, else "a.b"
    names: tuple[str, ...]  # the names taken from `target` by `from target import ...`
    where: str  # "path.py:line", plus " (in a function)" or " (under TYPE_CHECKING)"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((REPO / pkg).rglob("*.py")):
            if "_pb2" in path.name:  # generated protobuf / gRPC stubs
                continue
            out[_module_name(path)] = path
    return out


SOURCES = _sources()
MODULES = frozenset(SOURCES)


def _package(module: str) -> str:
    return module.split(".")[0]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _walk(node: ast.AST, context: str = "") -> Iterator[tuple[ast.AST, str]]:
    """Every node, with where it sits: "" (module level), " (in a function)" or
    " (under TYPE_CHECKING)". All count alike; the note is for whoever reads a failure."""
    yield node, context
    for child in ast.iter_child_nodes(node):
        inner = context
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            inner = context or " (in a function)"
        elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            inner = " (under TYPE_CHECKING)"
        yield from _walk(child, inner)


def parse_imports(module: str, text: str, *, is_package: bool, rel: str) -> list[Import]:
    """The imports of our packages in one module's source."""
    out = []
    for node, context in _walk(ast.parse(text, rel)):
        where = f"{rel}:{getattr(node, 'lineno', 0)}{context}"
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, (), where) for a in node.names
                    if _package(a.name) in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` in a.b.c is `from a.b import x`
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if _package(source) not in PACKAGES:
                continue
            names = []
            for alias in node.names:  # `from a.b import c`: the module a.b.c, or a name of a.b
                sub = f"{source}.{alias.name}"
                if sub in MODULES:
                    out.append(Import(module, sub, (), where))
                else:
                    names.append(alias.name)
            if names:
                out.append(Import(module, source, tuple(names), where))
    return [imp for imp in out if imp.target != module]


IMPORTS = [
    imp
    for module, path in sorted(SOURCES.items())
    for imp in parse_imports(module, path.read_text(encoding="utf-8"),
                             is_package=path.name == "__init__.py",
                             rel=str(path.relative_to(REPO)))
]


# ---------------------------------------------------------------------------------------------
# The rules, as functions of the import edges (tested on made-up edges at the bottom)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle (a, b, ..., a) per strongly connected component of >1 module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            connect(v)

    cycles = []
    for component in components:
        # Breadth first from the component's first module back to itself: a shortest cycle.
        members, start = set(component), component[0]
        parent: dict[str, str] = {}
        frontier, last = [start], None
        while last is None:
            nxt = []
            for v in frontier:
                succ = sorted(edges.get(v, set()) & members)
                if start in succ:
                    last = v
                    break
                for w in succ:
                    if w not in parent:
                        parent[w] = v
                        nxt.append(w)
            frontier = nxt
        path = [last]
        while path[-1] != start:
            path.append(parent[path[-1]])
        cycles.append([*reversed(path), start])
    return cycles


def cycle_report(imports: Iterable[Import]) -> list[str]:
    edges: dict[str, set[str]] = {}
    where: dict[tuple[str, str], str] = {}
    for imp in imports:
        if imp.target in MODULES:
            edges.setdefault(imp.importer, set()).add(imp.target)
            where.setdefault((imp.importer, imp.target), imp.where)
    return [f"  {' -> '.join(c)}: " + "; ".join(f"{a} -> {b} at {where[a, b]}"
                                               for a, b in itertools.pairwise(c))
            for c in find_cycles(edges)]


def private_violations(imports: Iterable[Import]) -> list[str]:
    bad = set()
    for imp in imports:
        # A private module (`a._b`, `a._b.c`) is private to its package `a`.
        parts = imp.target.split(".")
        for i, part in enumerate(parts):
            owner = ".".join(parts[:i])
            if _is_private(part) and not _within(imp.importer, owner):
                bad.add(f"  {imp.where}: {imp.importer} imports {imp.target}, private to "
                        f"{owner}")
                break
        # A private name of a module (`from a.b import _c`) is private to that module.
        for name in imp.names:
            if _is_private(name) and (imp.importer,
                                      f"{imp.target}.{name}") not in PRIVATE_IMPORT_ALLOWLIST:
                bad.add(f"  {imp.where}: {imp.importer} imports {name} from {imp.target}")
    return sorted(bad)


def direction_violations(imports: Iterable[Import], package: str) -> list[str]:
    allowed = ALLOWED[package]
    if allowed == ("*",):
        return []
    return sorted({
        f"  {imp.where}: {imp.importer} imports {imp.target}"
        for imp in imports
        if _package(imp.importer) == package and _package(imp.target) != package
        and not any(_within(imp.target, a) for a in allowed)
    })


# ---------------------------------------------------------------------------------------------
# The tests


def test_the_scan_sees_the_packages():
    # A guard against a walk that silently finds nothing (a moved repo root, a renamed folder).
    assert set(ALLOWED) == set(PACKAGES)
    assert {_package(m) for m in MODULES} == set(PACKAGES)
    assert any(i.target == "controller.config" for i in IMPORTS)


def test_imports_of_our_packages_resolve():
    # An import of a module that was moved or renamed would otherwise hide from the rules below.
    bad = sorted({f"  {imp.where}: {imp.importer} imports {imp.target}, which does not exist"
                  for imp in IMPORTS if imp.target not in MODULES})
    assert not bad, "imports of missing modules (fix: import the new path):\n" + "\n".join(bad)


def test_no_import_cycles():
    bad = cycle_report(IMPORTS)
    assert not bad, ("import cycles (fix: move what both sides need into a module neither "
                     "imports):\n" + "\n".join(bad))


def test_no_private_names_cross_module_boundaries():
    bad = private_violations(IMPORTS)
    assert not bad, ("private names imported across modules (fix: make the name public, or "
                     "move the code that needs it):\n" + "\n".join(bad))


@pytest.mark.parametrize("package", [p for p in PACKAGES if ALLOWED[p] != ("*",)])
def test_package_imports_only_what_the_table_allows(package):
    bad = direction_violations(IMPORTS, package)
    assert not bad, (f"{package}/ may import only {', '.join(ALLOWED[package])} of our "
                     f"packages (see ALLOWED in tests/unit/test_layout.py):\n" + "\n".join(bad))


# The checks themselves, on made-up sources and edges.


def test_parse_resolves_relative_and_function_level_imports():
    text = ("from __future__ import annotations\n"
            "from typing import TYPE_CHECKING\n"
            "import jax._src\n"
            "from . import base\n"
            "from ..trainer import model\n"
            "if TYPE_CHECKING:\n"
            "    from reshard.plan import ReshardPlan\n"
            "def f():\n"
            "    from controller.config import _hidden, JobConfig\n")
    got = parse_imports("sampler.fake", text, is_package=False, rel="sampler/fake.py")
    assert [(i.target, i.names, i.where) for i in got] == [
        ("sampler.base", (), "sampler/fake.py:4"),
        ("trainer.model", (), "sampler/fake.py:5"),
        ("reshard.plan", ("ReshardPlan",), "sampler/fake.py:7 (under TYPE_CHECKING)"),
        ("controller.config", ("_hidden", "JobConfig"), "sampler/fake.py:9 (in a function)"),
    ]
    # In a package's __init__, `.` is the package itself.
    got = parse_imports("sampler", "from .base import Sampler\n", is_package=True,
                        rel="sampler/__init__.py")
    assert [(i.target, i.names) for i in got] == [("sampler.base", ("Sampler",))]


def test_rules_flag_made_up_violations():
    def imp(importer, target, *names):
        return Import(importer, target, names, f"{importer}.py:1")

    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c",
                                                                              "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
    assert private_violations([imp("trainer.loss", "trainer.model", "_rope")])
    assert private_violations([imp("controller.loop", "rewards._sandbox_boot")])
    assert not private_violations([imp("rewards.sandbox", "rewards._sandbox_boot")])
    assert not private_violations([imp("trainer.loss", "trainer.model", "__all__")])
    assert direction_violations([imp("sampler.jax_sampler", "trainer.loss")], "sampler")
    assert not direction_violations([imp("sampler.jax_sampler", "trainer.model")], "sampler")
    assert direction_violations([imp("trainer.step", "sampler.base")], "trainer")
    assert direction_violations([imp("rewards.pool", "reshard.plan")], "rewards")
    assert direction_violations([imp("deploy.xpk", "controller.topology")], "deploy")
    assert not direction_violations([imp("deploy.xpk", "controller.config")], "deploy")
