"""The app's own keystile configuration, read by the app and the command line alike.

Python apps pass a :class:`~keystile.models.KeyPolicy` (``Keystile(policy=...)``); apps that
would rather declare it in a file, and every ``keystile`` command, read it from the first of:

- the file named by ``KEYSTILE_CONFIG``;
- ``keystile.toml`` in the current directory (its top-level table);
- the ``[tool.keystile]`` table of ``pyproject.toml`` in the current directory.

::

    [tool.keystile]
    app = "service.main:gate"      # what `keystile --app` loads when not given: a Keystile,
                                   # or an ASGI app with KeystileMiddleware(gate=...)
    default_scopes = false         # true: the demo platform's services as well as these

    [tool.keystile.scopes]         # service = its actions; the admin scopes are always there
    orders = ["read", "write"]

    [tool.keystile.types.client]   # any field of a key type's policy, over its default
    rate_limit = "50/minute"
    forbidden_scopes = ["admin:*", "orders:write", "*"]

    [tool.keystile.types.partner]  # a type of the app's own: a prefix and its rules
    prefix = "partner_"
    rate_limit = "600/minute"

    [tool.keystile.types]
    dev = false                    # a built-in type the app does not issue

A mistake (an unknown table or field, a malformed value) is one :class:`ConfigurationError`
naming the file, the field and, where one is close, the right spelling.
"""

from __future__ import annotations

import difflib
import importlib
import os
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from keystile.exceptions import ConfigurationError
from keystile.models import (
    DEFAULT_POLICY,
    DEFAULT_TYPE_POLICIES,
    KeyPolicy,
    KeyTypePolicy,
    field_errors,
)
from keystile.scopes import DEFAULT_CATALOGUE, ScopeCatalogue

__all__ = ["AppConfig", "build_policy", "find_config", "load_config", "load_object"]

CONFIG_VARIABLE = "KEYSTILE_CONFIG"
_FIELDS = ("app", "default_scopes", "scopes", "types")


@dataclass(frozen=True, slots=True)
class AppConfig:
    """What a configuration file says (defaults where there is none)."""

    policy: KeyPolicy = DEFAULT_POLICY
    app: str | None = None  # "module:attribute"
    path: Path | None = None


def find_config(directory: Path | None = None) -> tuple[Path, bool] | None:
    """The configuration file in force and whether it is a ``pyproject.toml``, if any."""
    named = os.environ.get(CONFIG_VARIABLE)
    if named:
        path = Path(named)
        if not path.is_file():
            raise ConfigurationError(f"{CONFIG_VARIABLE}={named}: no such file")
        return path, path.name == "pyproject.toml"
    directory = Path.cwd() if directory is None else directory
    own = directory / "keystile.toml"
    if own.is_file():
        return own, False
    project = directory / "pyproject.toml"
    if project.is_file() and "keystile" in _read(project).get("tool", {}):
        return project, True
    return None


def _read(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as file:
            return tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(f"{path}: cannot be read: {exc}") from None


def _closest(name: str, known: tuple[str, ...] | list[str]) -> str:
    near = difflib.get_close_matches(name, known, n=1)
    return f"; did you mean {near[0]!r}?" if near else f" (known: {', '.join(known)})"


def build_policy(
    scopes: Mapping[str, Any] | None = None,
    types: Mapping[str, Any] | None = None,
    *,
    default_scopes: bool = False,
) -> KeyPolicy:
    """A policy from an app's services (``{"orders": ["read", "write"]}``; with
    ``default_scopes``, beside the demo platform's) and its key types over the built-in
    ones: a built-in type's fields override its defaults (``{"client": {"rate_limit":
    "50/minute"}}``), a new name declares a type (its ``prefix`` required), ``False``
    leaves a built-in type out (``{"dev": False}``)."""
    if scopes is None:
        catalogue = DEFAULT_CATALOGUE
    else:
        base = dict(DEFAULT_CATALOGUE.services) if default_scopes else {}
        catalogue = ScopeCatalogue({**base, **scopes})
    table: dict[str, KeyTypePolicy] = dict(DEFAULT_TYPE_POLICIES)
    for name, overrides in (types or {}).items():
        if overrides is False:
            if name not in table:
                known = [str(t) for t in DEFAULT_TYPE_POLICIES]
                raise ValueError(f"types.{name} = false: no such key type{_closest(name, known)}")
            del table[name]
            continue
        if isinstance(overrides, KeyTypePolicy):
            table[name] = overrides
            continue
        if not isinstance(overrides, Mapping):
            raise ValueError(
                f"types.{name} must be a table of policy fields, or false to leave it out"
            )
        fields = list(KeyTypePolicy.model_fields)
        for field in overrides:
            if field not in fields:
                raise ValueError(f"types.{name}: unknown field {field!r}{_closest(field, fields)}")
        base = table[name].model_dump() if name in DEFAULT_TYPE_POLICIES else {}
        if not base and "prefix" not in overrides:
            near = difflib.get_close_matches(name, [str(t) for t in DEFAULT_TYPE_POLICIES], n=1)
            hint = f" (or did you mean {near[0]!r}?)" if near else ""
            raise ValueError(f"types.{name}: a new key type needs its prefix{hint}")
        try:
            table[name] = KeyTypePolicy.model_validate({**base, **overrides})
        except ValidationError as exc:
            problems = "; ".join(f"types.{name}.{e}" for e in field_errors(exc))
            raise ValueError(problems) from None
    return KeyPolicy(table, catalogue)


def load_config(path: Path | str | None = None) -> AppConfig:
    """The configuration in ``path`` (a ``keystile.toml`` or a ``pyproject.toml``), else
    the one :func:`find_config` finds, else the defaults."""
    if path is None:
        found = find_config()
        if found is None:
            return AppConfig()
        file, in_project = found
    else:
        file = Path(path)
        in_project = file.name == "pyproject.toml"
    data = _read(file)
    if in_project:
        data = data.get("tool", {}).get("keystile", {})
    where = f"{file}{' [tool.keystile]' if in_project else ''}"
    for name in data:
        if name not in _FIELDS:
            raise ConfigurationError(f"{where}: unknown field {name!r}{_closest(name, _FIELDS)}")
    app = data.get("app")
    if app is not None and (not isinstance(app, str) or ":" not in app):
        raise ConfigurationError(f"{where}: app must be 'module:attribute', not {app!r}")
    try:
        policy = build_policy(
            data.get("scopes"),
            data.get("types"),
            default_scopes=bool(data.get("default_scopes", False)),
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"{where}: {'; '.join(exc.problems)}") from None
    except ValueError as exc:
        raise ConfigurationError(f"{where}: {exc}") from None
    return AppConfig(policy, app, file)


def load_object(spec: str) -> Any:
    """``module:attribute`` imported as uvicorn does (the current directory first on the
    path); the attribute may be dotted."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"{spec!r}: write the object as 'module:attribute'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from None
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    return found
