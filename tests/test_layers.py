"""The import graph of the library is layered and acyclic: evals < soups < {rl, vision}, recipes import no recipe.

Edges are read with `ast` from every module of `evals/`, `soups/`, `rl/` and `vision/`: top-level and
function-level (lazy) imports, and `importlib.import_module("<literal>")`. Module names kept as data in
registry tables (`EVALUATOR_MODULES`, `REWARD_MODULES`, `RECIPES`, ...) are launched by name, not imported:
they are not edges, but each must name a module that exists.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("evals", "soups", "rl", "vision")
LAYER = {"evals": 0, "soups": 1, "rl": 2, "vision": 2}  # rl and vision are peers: neither imports the other

# Present edges that run back up, each with the change that removes it. Keep this list shrinking (empty now).
ALLOWED_BACK_EDGES: set[tuple[str, str]] = set()
# Present imports of an entry point (a module with a Hydra main) by another module (none now).
ALLOWED_ENTRY_IMPORTS: set[tuple[str, str]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The library module that `import name` loads (a `from pkg import sub` names pkg.sub), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _is_import_module(call: ast.Call) -> bool:
    f = call.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (
        isinstance(f, ast.Name) and f.id == "import_module"
    )


def imports_of(name: str, tree: ast.Module, modules: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported library module, line) for every import in the module, at any depth."""
    package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]  # anchor of `from . import`
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Call) and _is_import_module(node) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                targets = [arg.value]
        for target in targets:
            found = resolve(target, modules)
            if found is not None and found != name:
                yield found, node.lineno


def registry_names(tree: ast.Module) -> Iterator[tuple[str, int]]:
    """Dotted module names that module-level tables named `*_MODULES` or `RECIPES` map to."""
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        if not any(isinstance(t, ast.Name) and (t.id.endswith("_MODULES") or t.id == "RECIPES") for t in targets):
            continue
        if isinstance(node.value, ast.Dict):
            for value in node.value.values:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    yield value.value, node.lineno


def is_entry_point(tree: ast.Module) -> bool:
    """A recipe: a top-level function decorated with `@hydra.main(...)` or `soups.cli`'s `@entry(...)`."""
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            for deco in node.decorator_list:
                func = deco.func if isinstance(deco, ast.Call) else deco
                name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
                owner = getattr(func, "value", None)
                if name == "entry" or (name == "main" and isinstance(owner, ast.Name) and owner.id == "hydra"):
                    return True
    return False


@functools.cache
def graph() -> tuple[dict[str, dict[str, int]], set[str], list[tuple[str, str, int]]]:
    """(edges {module: {imported: line}}, entry points, registry names (module, named, line))."""
    modules = library_modules()
    edges: dict[str, dict[str, int]] = {}
    entries, named = set(), []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges[name] = {}
        for target, line in imports_of(name, tree, modules):
            edges[name].setdefault(target, line)
        named += [(name, target, line) for target, line in registry_names(tree)]
        if is_entry_point(tree):
            entries.add(name)
    return edges, entries, named


def layer(module: str) -> int:
    return LAYER[module.split(".")[0]]


def back_edges(edges: dict[str, dict[str, int]]) -> set[tuple[str, str]]:
    """Imports of a higher layer, or across the peers rl and vision."""
    bad = set()
    for src, targets in edges.items():
        for dst in targets:
            top_src, top_dst = src.split(".")[0], dst.split(".")[0]
            if layer(dst) > layer(src) or (top_src != top_dst and layer(src) == layer(dst) and layer(src) == 2):
                bad.add((src, dst))
    return bad


def find_cycle(edges: dict[str, dict[str, int]]) -> list[str] | None:
    """One circle of imports between modules (depth-first search), or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, {})):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def _fmt(edges: dict[str, dict[str, int]], pairs: set[tuple[str, str]]) -> str:
    return "\n".join(f"  {s} -> {d}  ({s.replace('.', '/')}.py:{edges[s][d]})" for s, d in sorted(pairs))


def test_no_import_runs_back_up_a_layer() -> None:
    edges, _, _ = graph()
    bad = back_edges(edges) - ALLOWED_BACK_EDGES
    assert not bad, "imports from a lower layer to a higher one (evals < soups < rl, vision):\n" + _fmt(edges, bad)


def test_no_import_circle() -> None:
    edges, _, _ = graph()
    cycle = find_cycle(edges)
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_no_module_imports_an_entry_point() -> None:
    edges, entries, _ = graph()
    bad = {(src, dst) for src, targets in edges.items() for dst in targets if dst in entries}
    bad -= ALLOWED_ENTRY_IMPORTS
    assert not bad, "imports of an entry point (launch it by name instead):\n" + _fmt(edges, bad)


def test_allow_lists_hold_only_present_edges() -> None:
    edges, entries, _ = graph()
    stale = {e for e in ALLOWED_BACK_EDGES if e not in back_edges(edges)}
    stale |= {(s, d) for s, d in ALLOWED_ENTRY_IMPORTS if d not in edges.get(s, {}) or d not in entries}
    assert not stale, f"allow-listed edges no longer present; remove them: {sorted(stale)}"


def test_registry_tables_name_existing_modules() -> None:
    modules = library_modules()
    _, _, named = graph()
    named_modules = {"rl.text.evaluator", "rl.text.reward_models", "rl.text.quickstart", "vision.pareto_eval"}
    assert {n for _, n, _ in named} >= named_modules | {"vision.train"}
    missing = [(src, target, line) for src, target, line in named if target not in modules]
    assert not missing, f"registry tables name modules that do not exist: {missing}"


# The checker itself, on hand-made graphs: it must find what it is for.
def test_checker_finds_a_circle_and_back_edges() -> None:
    edges = {"soups.a": {"soups.b": 1}, "soups.b": {"soups.c": 2}, "soups.c": {"soups.a": 3}, "evals.x": {}}
    assert find_cycle(edges) == ["soups.a", "soups.b", "soups.c", "soups.a"]
    assert find_cycle({"soups.a": {"soups.b": 1}, "soups.b": {}}) is None
    edges = {"evals.x": {"soups.a": 1}, "soups.a": {"rl.t": 2, "evals.x": 3}, "rl.t": {"vision.v": 4, "soups.a": 5},
             "vision.v": {"soups.a": 6}}  # fmt: skip
    assert back_edges(edges) == {("evals.x", "soups.a"), ("soups.a", "rl.t"), ("rl.t", "vision.v")}


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from soups.utils import SoupsError", {"soups.utils"}),
        ("def f():\n    from rl.text.rewards import REWARDS", {"rl.text.rewards"}),
        ("import importlib\nimportlib.import_module('vision.train')", {"vision.train"}),
        ("from vision import train", {"vision.train"}),
        ("import torch\nimport evals", {"evals"}),
    ],
)
def test_checker_reads_static_lazy_and_importlib_imports(source: str, expected: set[str]) -> None:
    modules = library_modules()
    found = {target for target, _ in imports_of("soups.probe", ast.parse(source), {**modules, "soups.probe": ROOT})}
    assert found == expected


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ('@hydra.main(config_path="c")\n@cli_errors\ndef main(cfg): ...', True),
        ('@entry("../configs/x")\ndef main(cfg): ...', True),
        ("@functools.cache\ndef main(cfg): ...", False),
    ],
)
def test_checker_recognises_entry_points(source: str, expected: bool) -> None:
    assert is_entry_point(ast.parse(source)) is expected
