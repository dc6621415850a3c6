"""The public surface: what keystile exports, and that no object shows a secret."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import keystile
from keystile import KeyHasher, KeyManager, exceptions
from keystile.stores import CachedStore

PUBLIC = {
    "ApiKey",
    "CachedStore",
    "ConfigurationError",
    "CreatedKey",
    "FieldError",
    "KeyChanged",
    "KeyConflict",
    "KeyFormatError",
    "KeyHasher",
    "KeyInfo",
    "KeyManager",
    "KeyNotFound",
    "KeyPage",
    "KeyPolicy",
    "KeySettings",
    "KeyStatus",
    "KeyStore",
    "KeyType",
    "KeyTypePolicy",
    "KeyUser",
    "KeyValidationError",
    "Keystile",
    "KeystileError",
    "KeystileMiddleware",
    "KeystileSettings",
    "ManualClock",
    "MemoryStore",
    "Principal",
    "RedisStore",
    "Refusal",
    "RotatedKey",
    "RotationRefused",
    "Rule",
    "RuleTable",
    "ScopeCatalogue",
    "ScopeRefused",
    "StoreError",
    "StoreMisconfigured",
    "StoreUnavailable",
    "__version__",
    "check_scopes",
    "generate_key",
    "open_store",
    "parse_key",
    "public",
    "scopes_required",
}
"""Every name ``keystile`` exports: adding or removing one is a decision, made here too."""


def test_all_is_sorted_and_complete() -> None:
    """__all__ is sorted, and every name in it exists."""
    assert keystile.__all__ == sorted(keystile.__all__)
    for name in keystile.__all__:
        assert hasattr(keystile, name), name


def test_the_exported_names_are_exactly_the_public_surface() -> None:
    """__all__ is the pinned list, no more and no less; and every public class or function
    the package's top level holds is in it (none exported by accident, none forgotten)."""
    assert set(keystile.__all__) == PUBLIC
    held = {
        name
        for name, value in vars(keystile).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert held == PUBLIC - {"__version__"}


def _all_errors() -> set[type[BaseException]]:
    for module in pkgutil.walk_packages(keystile.__path__, "keystile."):
        if not module.name.endswith("__main__"):  # (runs the command line)
            importlib.import_module(module.name)
    found: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [keystile.KeystileError]
    while todo:
        error = todo.pop()
        found.add(error)
        todo.extend(error.__subclasses__())
    return found


def _drawn_tree() -> dict[str, str | None]:
    """Each class the exceptions module's docstring draws, with the class drawn as its
    parent (None for the root)."""
    assert exceptions.__doc__ is not None
    tree: dict[str, str | None] = {}
    parents: list[str] = []
    for line in exceptions.__doc__.splitlines():
        match = re.match(
            r"^    (?P<lead>(?:[│ ]   )*)(?:[├└]── )?(?P<name>[A-Z]\w+)(?:\s|$)", line
        )
        if match is None or ("──" not in line and match["name"] != "KeystileError"):
            continue
        depth = len(match["lead"]) // 4 + ("──" in line)
        del parents[depth:]
        tree[match["name"]] = parents[-1] if parents else None
        parents.append(match["name"])
    return tree


def test_the_exception_tree_draws_every_error_class_under_its_parent() -> None:
    """The drawing in keystile.exceptions names every KeystileError subclass of the package,
    each under the keystile class it derives from."""
    tree = _drawn_tree()
    errors = {error.__name__: error for error in _all_errors()}
    assert set(tree) == set(errors)
    for name, parent in tree.items():
        error = errors[name]
        bases = [b.__name__ for b in error.__bases__ if issubclass(b, keystile.KeystileError)]
        assert bases == ([] if parent is None else [parent]), name


def test_every_error_derives_from_the_root() -> None:
    """Every exception keystile exports derives from KeystileError."""
    names = [n for n in keystile.__all__ if n.endswith(("Error", "Unavailable"))]
    errors = [getattr(keystile, n) for n in names if n != "FieldError"]
    errors += [keystile.KeyNotFound, keystile.KeyConflict]
    for error in errors:
        assert issubclass(error, keystile.KeystileError), error


async def test_no_repr_or_str_shows_the_secret(manager: KeyManager, cached: CachedStore) -> None:
    """The created-key result, its record, the cache entry and the hasher never show the key."""
    created = await manager.create({"name": "n", "type": "prod"})
    secret = created.secret.get_secret_value()
    entry = await cached.lookup(manager.hasher.digest(secret))
    shown = [
        repr(created),
        str(created),
        repr(created.key),
        str(created.key),
        created.key.model_dump_json(),
        repr(created.secret),
        str(created.secret),
        repr(entry),
        repr(cached),
        repr(manager.hasher),
        repr(KeyHasher(secret)),
    ]
    for text in shown:
        assert secret not in text
        assert secret[5:13] not in text


def test_the_console_module_exports_its_mounting_api() -> None:
    """keystile.console offers its app, its mount, the middleware rules it needs, the
    Console class and the headers it sends."""
    from keystile import console

    assert console.__all__ == [
        "SECURITY_HEADERS",
        "Console",
        "console_app",
        "console_mount",
        "console_rules",
    ]
