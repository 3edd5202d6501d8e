"""The package layout is the architecture: layers import only downwards, and nothing circles.

Every ``import`` of a ``batchspec`` module is read with ``ast`` (inside functions and under
``TYPE_CHECKING`` too), so a lazy import cannot hide a cycle or a wrong direction.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "batchspec"

#: what each layer may import besides itself (``batchspec`` itself: only ``__version__``)
ALLOWED: dict[str, set[str]] = {
    "cli": {"core", "workspace", "state", "providers", "engine", "wire", "storage", "errors"},
    "core": {"workspace", "state", "providers", "wire", "storage", "errors"},
    # a provider is built from the project file's provider config; the local one runs the engine
    "providers": {"workspace", "engine", "wire", "storage", "errors"},
    "state": {"wire", "storage", "errors"},
    "workspace": {"wire", "storage", "errors"},
    "engine": {"wire", "storage", "errors"},
    "wire": {"errors"},
    "storage": {"errors"},
    "errors": set(),
    "__main__": {"cli"},
}

#: modules held to a narrower rule than their layer's
NARROWER: dict[str, set[str]] = {
    # the pure plan: a function of desired and recorded state, no I/O
    "batchspec.core.plan": {"batchspec.wire", "batchspec.errors"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, modules: set[str]) -> set[str]:
    """The batchspec modules ``name`` imports; ``from pkg import mod`` counts as ``pkg.mod``."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("batchspec"))
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            if not target.startswith("batchspec"):
                continue
            named = {f"{target}.{a.name}" for a in node.names}
            found.update(named & modules)
            if named - modules:  # names defined by the module (or package __init__) itself
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    names = set(modules)
    return {name: imports_of(name, path, names) - {name} for name, path in modules.items()}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*stack[stack.index(dep) :], dep]
            if dep in graph and dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def forbidden_edges(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, deps in sorted(graph.items()):
        layer = layer_of(module)
        for dep in sorted(deps):
            dep_layer = layer_of(dep)
            if dep == "batchspec" or dep_layer == layer:
                continue  # the package root holds only __version__
            if module in NARROWER:
                if not any(dep == p or dep.startswith(p + ".") for p in NARROWER[module]):
                    bad.append(f"{module} -> {dep} (kept pure: {sorted(NARROWER[module])})")
                continue
            if layer not in ALLOWED:
                bad.append(f"{module}: module outside every layer ({layer!r})")
            elif dep_layer not in ALLOWED[layer]:
                bad.append(f"{module} -> {dep} ({layer} may import {sorted(ALLOWED[layer])})")
    return bad


def test_the_package_has_no_import_cycle() -> None:
    """No module reaches itself through imports, lazy imports included."""
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_every_import_runs_down_the_layers() -> None:
    """The face is imported by no one, the engine never sees core or state, plan stays pure."""
    assert forbidden_edges(import_graph()) == []


def test_every_module_belongs_to_a_layer() -> None:
    """A new top-level module must be placed in a layer folder (or be errors/__main__)."""
    layers = {layer_of(m) for m in all_modules() if m != "batchspec"}
    assert layers <= set(ALLOWED), sorted(layers - set(ALLOWED))


def test_every_module_says_what_it_is_for() -> None:
    """Each module opens with a docstring."""
    modules = all_modules().items()
    missing = [m for m, p in modules if ast.get_docstring(ast.parse(p.read_text())) is None]
    assert missing == []


def test_the_package_holds_no_leftover_of_a_patch() -> None:
    """No ``.orig``/``.rej`` copy of a module is left in the package (a merge's or a patch's
    leftover, shipped in the wheel and mistaken for the source by whoever greps it)."""
    leftovers = [
        str(p.relative_to(PACKAGE.parent))
        for suffix in ("*.orig", "*.rej")
        for p in PACKAGE.rglob(suffix)
    ]
    assert leftovers == []


# --- the checker itself must be able to fail -------------------------------------------------


def test_the_checker_reports_a_cycle_with_its_path() -> None:
    """A planted cycle is reported as the path of modules that closes it."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]


@pytest.mark.parametrize(
    ("module", "dep"),
    [
        pytest.param("batchspec.core.reconcile", "batchspec.cli.render", id="core-imports-face"),
        pytest.param("batchspec.engine.core", "batchspec.state.store", id="engine-imports-state"),
        pytest.param("batchspec.core.plan", "batchspec.providers.base", id="plan-imports-provider"),
        pytest.param("batchspec.providers.openai", "batchspec.state.store", id="provider-state"),
        pytest.param("batchspec.state.store", "batchspec.core.plan", id="state-imports-core"),
    ],
)
def test_the_checker_refuses_a_wrong_direction(module: str, dep: str) -> None:
    """Each rule of DESIGN.md's layout is enforced: a planted edge against it is reported."""
    assert forbidden_edges({module: {dep}})


def test_from_package_import_module_counts_as_the_module(tmp_path: Path) -> None:
    """``from pkg import mod`` depends on the submodule; a name of ``pkg`` on the package."""
    path = tmp_path / "x.py"
    path.write_text("from batchspec.engine import jsonfast\n")
    modules = {"batchspec.engine.jsonfast"}
    assert imports_of("batchspec.engine.upstreams", path, modules) == {"batchspec.engine.jsonfast"}
    path.write_text("from batchspec.engine import jsonfast, Engine\n")
    found = imports_of("batchspec.engine.upstreams", path, modules)
    assert found == {"batchspec.engine.jsonfast", "batchspec.engine"}
