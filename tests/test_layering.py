"""The floors of fwl_scale (docs/design.md §5), read from the source with ast: no import climbs a floor, and
the modules' import-time dependencies form no circle.

A module may import its own floor and the floors below it, never one above: every import counts here,
function-level (the commands' lazy heavy imports) and type-checking ones included, since a lazy import
climbs as much as one at the top. Within a floor, packages may use each other as long as no circle forms.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "fwl_scale"

# Lowest first. A module's floor is its area: the first name under fwl_scale (atomic, config, model, ...).
FLOORS = [
    # ground: what every floor uses (file writes, configs, the device, the test signal points)
    {"", "atomic", "typed_yaml", "config", "device", "signal_points"},
    {"parallel", "data"},   # process groups and tp/cp primitives; tokenizer, shards, loader
    {"model"},              # the math: body, FWL, vocabulary losses, FLOP count
    {"checkpoint"},         # the formats, read and written without a training engine
    {"eval"},               # evaluation of a model and its checkpoints
    {"train"},              # the engine and the loop (conversion between layouts rebuilds the engine)
    {"hf", "study"},        # export/import through the trainer; studies of training runs
    {"plan"},               # layouts and scaling fits, from the FLOP count and studies
]
# `fwl_scale/cli.py`, every area's cli.py and what they share (cli_support.py) wire commands to whatever
# they run: the entry floor, above all.
ENTRY = len(FLOORS)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def floor_of(module: str) -> int:
    parts = module.split(".")
    if parts[-1] in ("cli", "cli_support"):
        return ENTRY
    area = parts[1] if len(parts) > 1 else ""
    for level, areas in enumerate(FLOORS):
        if area in areas:
            return level
    raise AssertionError(f"{module}: area {area!r} is on no floor; add it to FLOORS in {Path(__file__).name}")


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The fwl_scale modules an import statement loads (`from pkg import sub` loads pkg.sub when it is a module)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".")
            anchor = anchor[:len(anchor) - node.level + (1 if is_package else 0)]
            base = ".".join(anchor + ([node.module] if node.module else []))
        names = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in MODULES]
    out = []
    for name in names:
        if name.split(".")[0] != "fwl_scale":
            continue
        while name not in MODULES:  # `import fwl_scale.x.Name`-like spellings: the module that holds the name
            name = name.rsplit(".", 1)[0]
        out.append(name)
    return out


def imports(module: str) -> tuple[set[str], set[str]]:
    """(every fwl_scale module `module` imports anywhere, those it imports when it is itself imported)."""
    path = MODULES[module]
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    everywhere: set[str] = set()
    at_import: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found = _targets(child, module, is_package)
                everywhere.update(found)
                if top:
                    at_import.update(found)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, False)
            elif isinstance(child, ast.If) and _is_type_checking(child):
                visit(child, False)
            else:  # a class body, try/except, an `if` at module level run at import
                visit(child, top)

    visit(tree, True)
    everywhere.discard(module)
    at_import.discard(module)
    return everywhere, at_import


IMPORTS = {m: imports(m) for m in MODULES}


def test_the_floors_cover_every_module():
    for module in MODULES:
        floor_of(module)


def test_no_import_climbs_a_floor():
    climbs = [f"{m} (floor {floor_of(m)}) imports {t} (floor {floor_of(t)})"
              for m, (everywhere, _) in IMPORTS.items() for t in sorted(everywhere) if floor_of(t) > floor_of(m)]
    assert not climbs, "\n".join(climbs)


def import_time_graph() -> dict[str, set[str]]:
    """Who runs whom at import: a module's top-level imports, plus the packages above each imported module
    that Python runs first (not the importer's own packages, which are already being imported)."""
    graph = {}
    for module, (_, at_import) in IMPORTS.items():
        own = {".".join(module.split(".")[:k]) for k in range(1, module.count(".") + 1)}
        runs = set()
        for target in at_import:
            parts = target.split(".")
            runs.update(".".join(parts[:k]) for k in range(2, len(parts) + 1))
        graph[module] = {t for t in runs - own - {module} if t in MODULES}
    return graph


def find_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """A circle of the graph (depth-first; the first one met), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = walk(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = walk(node)
            if found:
                return found
    return None


def test_no_import_circle():
    circle = find_circle(import_time_graph())
    assert circle is None, " -> ".join(circle)


@pytest.mark.parametrize("graph, circle", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_the_circle_finder(graph, circle):
    assert find_circle(graph) == circle


def test_the_reader_sees_every_kind_of_import():
    """The checks above would pass on a reader that missed imports: the known kinds are seen."""
    everywhere, at_import = IMPORTS["fwl_scale.train.cli"]
    assert "fwl_scale.train.signals" in everywhere - at_import  # function-level (after the stop handler)
    assert "fwl_scale.config" in at_import
    assert "fwl_scale.model.gpt" in IMPORTS["fwl_scale.model"][1]  # a package's __init__
    assert "fwl_scale.study.store" in IMPORTS["fwl_scale.plan.scaling"][1]  # `from fwl_scale.study import store`
