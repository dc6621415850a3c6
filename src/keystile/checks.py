"""Start-up checks: every scope a route asks for exists in the gate's catalogue.

A typo in a route's scope (``require("vec:raed")``) would otherwise refuse every key, even a
``*`` one, and only in production. :func:`route_problems` walks an app's routes — Starlette
``Route``, ``WebSocketRoute`` and ``Mount``, endpoints decorated with
:func:`~keystile.routing.scopes_required` (functions and ``HTTPEndpoint`` methods), FastAPI
``Security(api_key, scopes=[...])`` dependencies at any depth — and the middleware's rule
table, and names each route whose scope the catalogue does not know, with the closest valid
one. :class:`~keystile.middleware.KeystileMiddleware` runs it when the app starts and stops
start-up with :class:`~keystile.exceptions.ConfigurationError` if anything is wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from keystile.exceptions import ConfigurationError
from keystile.routing import ANY_METHOD, Rule
from keystile.scopes import ScopeCatalogue

__all__ = ["check_routes", "route_problems", "route_scopes"]

_ENDPOINT_METHODS = ("get", "head", "post", "put", "patch", "delete", "options", "websocket")


def _declared(function: Any) -> tuple[str, ...]:
    scopes = getattr(function, "__keystile_scopes__", ())
    return tuple(scopes) if isinstance(scopes, tuple) else ()


def _security_scopes(dependant: Any, seen: set[int] | None = None) -> Iterator[str]:
    """The scopes FastAPI gives :func:`keystile.fastapi.api_key` anywhere under a route."""
    from keystile.fastapi import api_key  # FastAPI is optional

    seen = set() if seen is None else seen
    if id(dependant) in seen:
        return
    seen.add(id(dependant))
    if getattr(dependant, "call", None) is api_key:
        own = getattr(dependant, "own_oauth_scopes", None)
        if own is None:  # FastAPI before 0.120 kept them in one list
            yield from getattr(dependant, "security_scopes", None) or ()
        else:
            yield from [*(getattr(dependant, "parent_oauth_scopes", None) or ()), *own]
    for sub in getattr(dependant, "dependencies", None) or ():
        yield from _security_scopes(sub, seen)


def _label(route: Route | WebSocketRoute, prefix: str) -> str:
    if isinstance(route, WebSocketRoute):
        return f"WEBSOCKET {prefix}{route.path}"
    methods = sorted((route.methods or {"GET"}) - {"HEAD"} or {"HEAD"})
    return f"{'|'.join(methods)} {prefix}{route.path}"


def route_scopes(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """``(route, scope)`` for every scope a route requires, ``route`` written like
    ``"GET /cloud/vec/databases"``; mounted apps are walked too."""
    for route in routes:
        if isinstance(route, Mount):
            yield from route_scopes(route.routes, prefix + route.path)
            continue
        if not isinstance(route, (Route, WebSocketRoute)):
            continue
        label = _label(route, prefix)
        endpoint = route.endpoint
        found = list(_declared(endpoint))
        if isinstance(endpoint, type):  # an HTTPEndpoint / WebSocketEndpoint class
            for name in _ENDPOINT_METHODS:
                for scope in _declared(getattr(endpoint, name, None)):
                    method = "WEBSOCKET" if name == "websocket" else name.upper()
                    yield f"{method} {prefix}{route.path}", scope
        dependant = getattr(route, "dependant", None)
        if dependant is not None:
            found += _security_scopes(dependant)
        for scope in dict.fromkeys(found):
            yield label, scope


def route_problems(app: Any, catalogue: ScopeCatalogue, rules: Sequence[Rule] = ()) -> list[str]:
    """One line per route (or rule) that requires a scope ``catalogue`` does not know."""
    problems = []
    routes = getattr(app, "routes", None)
    for label, scope in route_scopes(routes if isinstance(routes, list) else ()):
        if (problem := catalogue.explain(scope)) is not None:
            problems.append(f"route {label}: {problem}")
    for rule in rules:
        methods = "|".join(sorted(rule.method_set - {"HEAD"} or {ANY_METHOD}))
        for scope in rule.scopes:
            if (problem := catalogue.explain(scope)) is not None:
                problems.append(f"rule {methods} {rule.path}: {problem}")
    return problems


def check_routes(app: Any, catalogue: ScopeCatalogue, rules: Sequence[Rule] = ()) -> None:
    """Raise :class:`ConfigurationError` listing :func:`route_problems`, if any."""
    problems = route_problems(app, catalogue, rules)
    if problems:
        raise ConfigurationError(problems)
