"""The modules of `rewards` import each other without a circle, and no `_private` name.

Imports are read from the source with `ast`, so the ones inside functions, `try` blocks and
`if TYPE_CHECKING:` count too, as do `importlib.import_module("rewards....")` calls.
"""

import ast
from pathlib import Path

import rewards

PACKAGE = "rewards"
ROOT = Path(rewards.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> list[tuple[str, str]]:
    """(imported module, imported name or "") for each import of a `rewards` module."""
    this = _module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    out: list[tuple[str, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # a relative import: resolved against this module's package
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            for a in node.names:
                # `from rewards import pool` imports the module rewards.pool.
                sub = f"{base}.{a.name}"
                out.append((sub, "") if sub in modules else (base, a.name))
        elif (isinstance(node, ast.Call) and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module"
                   or getattr(node.func, "id", None) in ("import_module", "__import__"))):
            out.append((node.args[0].value, ""))
    return [(m, name) for m, name in out if m == PACKAGE or m.startswith(PACKAGE + ".")]


def _graph() -> tuple[dict[str, set[str]], dict[str, list[tuple[str, str]]]]:
    paths = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    imports = {_module_name(p): _imports(p, modules) for p in paths}
    edges = {m: {target for target, _ in found if target != m and target in modules}
             for m, found in imports.items()}
    return edges, imports


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None when the graph is a DAG."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return [*path[path.index(n):], n]
            if n not in state and (cycle := visit(n)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_find_cycle_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_rewards_modules_import_each_other_without_a_circle():
    edges, _ = _graph()
    # The reader sees the package's imports (a check that it is not vacuously empty).
    assert "rewards.pool" in edges["rewards.registry"]
    assert "rewards.base" in edges["rewards.pool"]
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_private_name_is_imported_across_modules():
    _, imports = _graph()
    private = sorted(
        f"{m} imports {target}{'.' + name if name else ''}"
        for m, found in imports.items() for target, name in found
        if name.startswith("_") or any(p.startswith("_") and p != "__init__"
                                       for p in target.split("."))
    )
    assert private == []
