"""No import cycle in `server/`: every import the code can run (at module level or inside a function), read
with `ast`, makes an edge between two of its modules; imports under `if TYPE_CHECKING:` never run and
are left out."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "server"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(tree: ast.AST, here: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of `known` that `tree` imports: `from a import b` is a.b when that is a module, else a."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = here.split(".")[: len(here.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found if name in known}


def import_graph() -> dict[str, set[str]]:
    found = modules()
    known = set(found)
    return {name: imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known) - {name}
            for name, path in found.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := walk(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := walk(start)):
            return cycle
    return None


def test_server_has_no_import_cycle():
    graph = import_graph()
    assert "server.cli" in graph and "server.bootstrap" in graph["server.cli"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    tree = ast.parse("import server.x\nfrom . import y\nfrom typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from server import z\ndef f():\n    from server.w import thing\n")
    known = {"server", "server.x", "server.pkg", "server.pkg.y", "server.z", "server.w"}
    assert imported(tree, "server.pkg", True, known) == {"server.x", "server.pkg.y", "server.w"}


def package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def imports_of(graph: dict[str, set[str]], package: str) -> set[tuple[str, str]]:
    return {(a, b) for a, bs in graph.items() if package_of(a) == package for b in bs}


def test_layers_import_only_below_themselves():
    """docs/architecture.md's rules: the HTTP layer never reaches the model's packages; the LoRA layers and the
    adapter format never reach the engine or the HTTP layer; nothing reaches the entry points."""
    graph = import_graph()
    model_side = {"server.lora", "server.native", "server.quant", "server.models"}
    assert not {(a, b) for a, b in imports_of(graph, "server.api") if package_of(b) in model_side}
    for package in ("server.lora", "server.adapters"):
        assert not {(a, b) for a, b in imports_of(graph, package)
                    if package_of(b) in {"server.engine", "server.api", "server.deploy"}}
    entry = {"server.cli", "server.deploy", "server.bootstrap"}
    assert not {(a, b) for a, bs in graph.items() if package_of(a) not in entry for b in bs if package_of(b) in entry}


def test_the_http_layer_never_imports_torch():
    for path in sorted((PACKAGE / "api").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                 for alias in node.names}
        names |= {(node.module or "").split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "torch" not in names, f"{path.relative_to(ROOT)} imports torch"


def test_the_http_layer_takes_only_the_engines_plain_data():
    """`api/` is typed against `EngineAPI` (engine/protocol.py) and handed a built engine: of `engine/` and
    `adapters/` it imports only the torch-free modules of requests, streams, contracts and names."""
    plain = {"server.engine.request", "server.engine.contract", "server.engine.protocol", "server.engine.stream",
             "server.adapters.contract", "server.adapters.names"}
    graph = import_graph()
    reached = {b for a, b in imports_of(graph, "server.api") if package_of(b) in {"server.engine", "server.adapters"}}
    assert reached <= plain, reached - plain
