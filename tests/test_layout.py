"""The shape of the code base: arrows between modules point one way, servicers stay thin, no file grows unbounded.

Imports are read from the source (every import statement, including those inside functions: a deferred import is
still an arrow), so these checks need no installed server dependencies. Imports under TYPE_CHECKING carry
annotations only: they make no circle, but they count for what a service may import.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"genloom": ROOT / "sdk" / "genloom", "genloom.services": ROOT / "services"}
MAX_LINES = 800
MAX_SERVICER_LINES = 400
# The composition root: it wires every service's servicer into one server process.
COMPOSITION_ROOTS = {"genloom.services.launch"}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if "v1" in parts[:1] or (package == "genloom" and parts[:1] == ("services",)):
                continue  # generated stubs; services/ is read under its own name
            name = ".".join((package, *parts))
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _typing_only(tree: ast.Module) -> set[int]:
    """Ids of the import nodes under `if TYPE_CHECKING:` (annotations only: no arrow at run time)."""
    return {
        id(child)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
        for stmt in node.body
        for child in ast.walk(stmt)
    }


def _imports(name: str, path: Path, *, typing: bool = True) -> Iterator[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import in `path` (with `typing=False`,
    not those under TYPE_CHECKING)."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if typing else _typing_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, None, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            for alias in node.names:
                yield module, alias.name, node.lineno


def _target(module: str, imported: str | None) -> str | None:
    """The first-party module an import statement depends on (a submodule where `from pkg import sub` names one)."""
    if imported and f"{module}.{imported}" in MODULES:
        return f"{module}.{imported}"
    return module if module in MODULES else None


# Run-time arrows. An import under TYPE_CHECKING (annotations only) is no arrow here, but the checks of what a
# service may import read every import.
GRAPH: dict[str, set[str]] = {
    name: {t for m, n, _ in _imports(name, path, typing=False) if (t := _target(m, n)) and t != name}
    for name, path in MODULES.items()
}


def _service(module: str) -> str | None:
    parts = module.split(".")
    return parts[2] if module.startswith("genloom.services.") and len(parts) > 3 else None


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_the_module_list_is_read() -> None:
    assert "genloom.services.inference.servicer" in MODULES and "genloom._transport" in MODULES
    assert "genloom.services.server.errors" in GRAPH["genloom.services.inference.servicer"]


def test_no_import_circles() -> None:
    # A package's __init__ re-exporting its own modules is not a circle through them unless they import it back.
    assert _cycles() == []


def test_no_service_imports_another_services_servicer_or_private_names() -> None:
    crossings = []
    for name, path in MODULES.items():
        here = _service(name)
        if name in COMPOSITION_ROOTS or here is None:
            continue
        for module, imported, line in _imports(name, path):
            there = _service(_target(module, imported) or "")
            if there is None or there == here:
                continue
            target = _target(module, imported) or module
            if target.endswith(".servicer") or (imported or "").startswith("_") or "._" in target:
                what = f"{target}.{imported}" if imported and target == module else target
                crossings.append(f"{path.relative_to(ROOT)}:{line} imports {what}")
    assert crossings == []


def test_services_reach_no_private_attribute_of_another_object() -> None:
    """`x._name` only on self or cls: what another module may use is public, so a split can't hide a back door."""
    reached = [
        f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}"
        for name, path in MODULES.items()
        if name.startswith("genloom.services")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute)
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "os"))  # os._Environ: a type
    ]
    assert reached == []


def test_services_do_not_depend_on_the_sdk_client() -> None:
    """The servers share the protos (genloom.v1) with the SDK, never its client code."""
    leaks = [
        f"{name} -> {target}"
        for name in MODULES
        if name.startswith("genloom.services")
        for target in GRAPH[name]
        if not target.startswith("genloom.services")
    ]
    assert leaks == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_stay_readable(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    limit = MAX_SERVICER_LINES if name.endswith(".servicer") else MAX_LINES
    assert lines <= limit, f"{MODULES[name].relative_to(ROOT)} has {lines} lines (limit {limit}): split it"
