"""Per-route scopes, configured at the endpoint or centrally:

- :func:`scopes_required` decorates a Starlette endpoint (function or method taking a
  ``request`` or ``websocket``);
- :mod:`keystile.fastapi` offers the ``Security`` dependency that FastAPI shows in OpenAPI;
- :class:`Rule` and :class:`RuleTable` give the middleware a central table: method + path
  pattern → scopes, public paths, and (``deny_unmatched``) a refusal for any
  authenticated request no rule covers.

Path patterns use Starlette's syntax: ``/cloud/kev/{key}``, ``/cloud/files/{path:path}``.
Rules are tried in order; the first match wins. A rule for GET also covers HEAD. A rule's
methods are HTTP's own (or ``"*"``): a typo such as ``"GETT"`` is refused when the rule is
made.
Methods match whatever their case: a request sent as ``get`` or ``Delete`` is held to the
rule for GET or DELETE, since frameworks dispatch it there (Starlette's ``HTTPEndpoint``
up to 1.0.1 calls ``get`` for ``get``; WSGI bridges upper-case it).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import HTTPConnection
from starlette.types import Scope
from starlette.websockets import WebSocket

from keystile.principal import PRINCIPAL, REFUSALS
from keystile.responses import Refusal, Refusals

__all__ = [
    "PRINCIPAL",
    "REFUSALS",
    "Rule",
    "RuleTable",
    "check_scopes",
    "public",
    "route_path",
    "scopes_required",
]

_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::([a-z]+))?\}")
_CONVERTERS = {
    "str": "[^/]+",
    "path": ".*",
    "int": "[0-9]+",
    "float": r"[0-9]+(?:\.[0-9]+)?",
    # As Starlette's UUIDConvertor: the hyphens are optional.
    "uuid": "[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}",
}
ANY_METHOD = "*"
#: The methods a rule may name (RFC 9110's, and PATCH), or ``"*"`` for any.
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


def _pattern(path: str) -> str:
    if not path.startswith("/"):
        raise ValueError(f"a rule path starts with '/': {path!r}")
    out, last = [], 0
    for match in _PARAM.finditer(path):
        out.append(re.escape(path[last : match.start()]))
        kind = match.group(2) or "str"
        if kind not in _CONVERTERS:
            raise ValueError(f"unknown path convertor {kind!r} in {path!r}")
        out.append(_CONVERTERS[kind])
        last = match.end()
    rest = path[last:]
    if "{" in rest or "}" in rest:
        raise ValueError(f"malformed parameter in rule path {path!r}")
    out.append(re.escape(rest))
    return "".join(out)


@dataclass(frozen=True)
class Rule:
    """Requests whose method is one of ``methods`` and whose path matches ``path`` need
    ``scopes`` (all of them) — or, when ``public``, no key at all."""

    methods: str | Iterable[str]
    path: str
    scopes: Sequence[str] = ()
    public: bool = False
    _methods: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = self.methods.split("|") if isinstance(self.methods, str) else list(self.methods)
        methods = {m.strip().upper() for m in raw if m.strip()}
        if not methods:
            raise ValueError(f"a rule needs at least one method: {self!r}")
        for method in sorted(methods - HTTP_METHODS - {ANY_METHOD}):
            near = difflib.get_close_matches(method, sorted(HTTP_METHODS), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown HTTP method {method!r} in the rule for {self.path!r}{hint}")
        if "GET" in methods:
            methods.add("HEAD")
        object.__setattr__(self, "_methods", frozenset(methods))
        object.__setattr__(self, "scopes", tuple(self.scopes))
        if self.public and self.scopes:
            raise ValueError(f"a public rule cannot require scopes: {self.path}")
        _pattern(self.path)  # fail at configuration time, not on the first request

    @property
    def method_set(self) -> frozenset[str]:
        return self._methods


def public(path: str, methods: str | Iterable[str] = ANY_METHOD) -> Rule:
    """A rule that lets every request to ``path`` through without a key."""
    return Rule(methods, path, public=True)


class RuleTable:
    """Rules compiled into one regular expression per method: one match per request."""

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.rules = tuple(rules)
        methods = {m for r in self.rules for m in r.method_set} - {ANY_METHOD}
        self._by_method = {m: self._compile(m) for m in methods}
        self._any = self._compile(ANY_METHOD)

    def _compile(self, method: str) -> tuple[re.Pattern[str] | None, tuple[Rule, ...]]:
        chosen = tuple(
            r for r in self.rules if method in r.method_set or ANY_METHOD in r.method_set
        )
        if not chosen:
            return None, ()
        regex = "|".join(f"(?P<r{i}>{_pattern(r.path)})" for i, r in enumerate(chosen))
        # Starlette routes with `^...$` and .match(), and `$` also matches before a final
        # newline: "/x\n" reaches the route "/x", so it must meet the rule for "/x" too.
        return re.compile(f"(?:{regex})\n?"), chosen

    def match(self, method: str, path: str) -> Rule | None:
        """The first rule covering this request, if any.

        ``path`` is the route path, as Starlette's router sees it (see :func:`route_path`).
        """
        # The exact spelling first: the one dict lookup of almost every request.
        compiled = self._by_method.get(method) or self._by_method.get(method.upper(), self._any)
        regex, rules = compiled
        if regex is None:
            return None
        found = regex.fullmatch(path)
        if found is None:
            return None
        group = found.lastgroup
        if group is None:  # every alternative of the regex is a named group
            raise RuntimeError(f"route regex matched {path!r} outside its rules' groups")
        return rules[int(group[1:])]

    def __bool__(self) -> bool:
        return bool(self.rules)


def route_path(scope: Scope) -> str:
    """The path the app's router matches: ``scope["path"]`` less the ``root_path`` prefix
    (as Starlette's own routing does), so rules are written like the app's routes."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    rest = path[len(root) :]
    if not rest:
        return ""
    return rest if rest[0] == "/" else path


def check_scopes(conn: HTTPConnection, scopes: Sequence[str]) -> Refusal | None:
    """The refusal for a request lacking ``scopes``, or ``None`` when it holds them all.

    Needs :class:`~keystile.middleware.KeystileMiddleware` in front of the app.
    """
    refusals: Refusals | None = conn.scope.get(REFUSALS)
    if refusals is None:
        raise RuntimeError("KeystileMiddleware must be installed for per-route scopes")
    principal = conn.scope.get(PRINCIPAL)
    if principal is None:
        return refusals.missing
    missing = principal.missing(scopes)
    return refusals.insufficient_scope(missing) if missing else None


F = TypeVar("F", bound=Callable[..., Any])


def scopes_required(*scopes: str) -> Callable[[F], F]:
    """Refuse requests to the decorated Starlette endpoint unless the key holds ``scopes``.

    HTTP requests get the library's 403 ``insufficient_scope``; websockets are closed with
    1008 (policy violation) before they are accepted.
    """

    def decorator(func: F) -> F:
        params = list(inspect.signature(func).parameters)
        names = [p for p in params if p in ("request", "websocket")]
        if not names:
            raise TypeError(f"{func.__qualname__} takes no 'request' or 'websocket' parameter")
        name = names[0]
        index = params.index(name)

        if not inspect.iscoroutinefunction(func):
            # A plain `def` endpoint stays plain, so Starlette still runs it in a thread.
            @functools.wraps(func)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                refusal = check_scopes(kwargs[name] if name in kwargs else args[index], scopes)
                return func(*args, **kwargs) if refusal is None else refusal.response()

            sync_wrapper.__keystile_scopes__ = tuple(scopes)  # type: ignore[attr-defined]
            return sync_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            conn = kwargs[name] if name in kwargs else args[index]
            refusal = check_scopes(conn, scopes)
            if refusal is None:
                return await func(*args, **kwargs)
            if isinstance(conn, WebSocket):
                await conn.close(code=1008, reason=refusal.code)
                return None
            return refusal.response()

        wrapper.__keystile_scopes__ = tuple(scopes)  # type: ignore[attr-defined]
        return wrapper  # type: ignore[return-value]

    return decorator
