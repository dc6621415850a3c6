"""How keystile's modules import each other (issue #14): one way, and no more than needed."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import keystile

PACKAGE = Path(keystile.__file__).parent
# exceptions.py imports keys.redact_keys inside a function, and keys.py imports the
# exceptions: an older cycle, left for its own change. Nothing may add to it.
KNOWN_CYCLES = {frozenset({"keystile.exceptions", "keystile.keys"})}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The keystile modules ``path`` imports anywhere (in functions too), but for imports
    made for type checking only."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
        for inner in ast.walk(node)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found & modules - {"keystile"}


def _cycles() -> set[frozenset[str]]:
    """Every set of modules that import one another in a ring."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {name: _imports(path, set(paths)) - {name} for name, path in paths.items()}
    cycles: set[frozenset[str]] = set()
    for start in graph:
        stack = [(start, (start,))]
        seen: set[str] = set()
        while stack:
            name, path = stack.pop()
            for target in graph[name]:
                if target == start:
                    cycles.add(frozenset(path))
                elif target not in seen:
                    seen.add(target)
                    stack.append((target, (*path, target)))
    return cycles


def test_no_module_imports_one_that_imports_it_back() -> None:
    """No ring of imports among keystile's modules, lazy imports included, beyond the known
    one (admin and admin_fastapi once imported each other)."""
    added = sorted(" <-> ".join(sorted(cycle)) for cycle in _cycles() - KNOWN_CYCLES)
    assert added == []


def _loaded_after(statement: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running ``statement``."""
    code = f"import sys; {statement}; print('\\n'.join(sys.modules))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return set(result.stdout.split())


def test_the_fastapi_router_does_not_load_the_starlette_admin_routes() -> None:
    """keystile.admin_fastapi and keystile.admin share the handlers' module, and neither
    loads the other; keystile.admin loads no FastAPI until its fastapi_router is called."""
    loaded = _loaded_after("import keystile.admin_fastapi")
    assert "keystile.admin_handlers" in loaded
    assert "keystile.admin" not in loaded
    loaded = _loaded_after("import keystile.admin")
    assert "keystile.admin_handlers" in loaded
    assert not {"keystile.admin_fastapi", "fastapi"} & loaded


def test_the_key_commands_do_not_load_the_demo() -> None:
    """The command line loads the demo app and its server only for ``keystile demo``."""
    loaded = _loaded_after("import keystile.cli")
    assert not {"keystile.demo", "keystile.demo_server", "uvicorn"} & loaded
    assert {"keystile.cli.parser", "keystile.cli.commands"} <= loaded


@pytest.mark.parametrize(
    "module",
    [
        "keystile.admin",
        "keystile.admin_fastapi",
        "keystile.admin_handlers",
        "keystile.cli",
        "keystile.cli.commands",
        "keystile.cli.parser",
        "keystile.demo_server",
    ],
)
def test_every_name_a_module_exports_exists(module: str) -> None:
    """Each module's __all__ names only what the module has."""
    loaded = importlib.import_module(module)
    for name in loaded.__all__:
        assert hasattr(loaded, name), name


def test_every_module_holds_one_concern_of_readable_size() -> None:
    """No module under src/ grows past ~500 lines (one concern each): a module that must
    says why in its docstring, with the words "one concern"."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        lines = text.count("\n")
        if lines > 520 and "one concern" not in (ast.get_docstring(ast.parse(text)) or ""):
            long.append(f"{path.relative_to(PACKAGE)}: {lines} lines")
    assert long == []
