"""The scope catalogue: which ``service:action`` scopes exist, and what a held scope grants.

``service:*`` grants every action of a service and ``*`` grants everything.
The catalogue is configuration: apps with other services pass their own, and the admin
scopes (``admin:manage_keys``, ``admin:view_usage``) are in every catalogue, so the
management API works whatever an app's services are.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping

__all__ = ["ADMIN_SCOPES", "DEFAULT_CATALOGUE", "WILDCARD", "ScopeCatalogue"]

WILDCARD = "*"
# Names as scopes are written in tokens (RFC 6750 scope-token characters, less ':' and '*').
_NAME = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
ADMIN_SERVICE = "admin"
ADMIN_ACTIONS = ("manage_keys", "view_usage")
#: The scopes of the management API: part of every catalogue.
ADMIN_SCOPES = frozenset(f"{ADMIN_SERVICE}:{a}" for a in ADMIN_ACTIONS)


class ScopeCatalogue:
    """The services and actions that scopes may name, e.g.
    ``ScopeCatalogue({"orders": ["read", "write"]})``; the admin scopes are always added."""

    __slots__ = ("_all", "_services")

    def __init__(self, services: Mapping[str, Iterable[str]]) -> None:
        self._services: dict[str, tuple[str, ...]] = {}
        if isinstance(services, (str, bytes)) or not isinstance(services, Mapping):
            raise ValueError("a scope catalogue maps each service to its actions")
        services = {**services}
        admin = tuple(services.get(ADMIN_SERVICE, ()))
        services[ADMIN_SERVICE] = (*admin, *(a for a in ADMIN_ACTIONS if a not in admin))
        for service, actions in services.items():
            if isinstance(actions, (str, bytes)) or not isinstance(actions, Iterable):
                raise ValueError(f"the actions of {service!r} must be a list of names")
            acts = tuple(dict.fromkeys(actions))
            if not acts:
                raise ValueError(f"service {service!r} in the scope catalogue has no actions")
            for part in (service, *acts):
                if not isinstance(part, str) or not _NAME.fullmatch(part):
                    raise ValueError(
                        f"invalid name in the scope catalogue: {part!r} (names are 1 to 64 "
                        "letters, digits, '_', '.' or '-')"
                    )
            self._services[service] = acts
        self._all = frozenset(f"{s}:{a}" for s, acts in self._services.items() for a in acts)

    @property
    def services(self) -> Mapping[str, tuple[str, ...]]:
        return self._services

    @property
    def all_scopes(self) -> frozenset[str]:
        """Every concrete scope, e.g. ``vec:read``."""
        return self._all

    def check(self, scope: str) -> str | None:
        """Why ``scope`` is not a valid scope, or ``None`` when it is."""
        if scope == WILDCARD or scope in self._all:
            return None
        service, sep, action = scope.partition(":")
        if not sep:
            return f"{scope!r} is not a scope: scopes look like 'service:action'"
        if service not in self._services:
            known = ", ".join(sorted(self._services))
            return f"unknown service {service!r} in scope {scope!r} (known: {known})"
        if action == WILDCARD:
            return None
        actions = ", ".join(self._services[service])
        return f"unknown action {action!r} in scope {scope!r} ({service} has: {actions})"

    def closest(self, scope: str) -> str | None:
        """The valid scope that ``scope`` most looks like (for "did you mean"), if any."""
        known = [*sorted(self._all), *(f"{s}:*" for s in sorted(self._services))]
        found = difflib.get_close_matches(scope, known, n=1, cutoff=0.75)
        return found[0] if found else None

    def explain(self, scope: str) -> str | None:
        """:meth:`check`'s problem with a "did you mean" when a valid scope is close."""
        problem = self.check(scope)
        if problem is not None and (near := self.closest(scope)) is not None:
            problem += f"; did you mean {near!r}?"
        return problem

    def unknown(self, scopes: Iterable[str]) -> list[str]:
        """Those of ``scopes`` this catalogue does not know (e.g. held by a key stored
        before a service was removed): they grant only themselves, never more."""
        return [s for s in scopes if self.check(s) is not None]

    def expand(self, scopes: Iterable[str]) -> frozenset[str]:
        """The concrete scopes that ``scopes`` grant, wildcards resolved."""
        granted: set[str] = set()
        for scope in scopes:
            if scope == WILDCARD:
                return self._all
            service, _, action = scope.partition(":")
            if action == WILDCARD:
                granted.update(f"{service}:{a}" for a in self._services.get(service, ()))
            elif scope in self._all:
                granted.add(scope)
        return frozenset(granted)

    def grants(self, held: Iterable[str], required: str) -> bool:
        """Whether holding ``held`` grants ``required`` (itself possibly a wildcard).

        A scope outside the catalogue is granted only by holding exactly that scope.
        """
        needed = self.expand([required])
        if not needed:
            return required in held
        return needed <= self.expand(held)

    def __repr__(self) -> str:
        return f"ScopeCatalogue({self._services!r})"


DEFAULT_CATALOGUE = ScopeCatalogue(
    {
        "vec": ("read", "write", "delete"),
        "kev": ("read", "write", "delete"),
        "data": ("read", "write", "admin"),
        "ai": ("inference", "agents", "workflows"),
        "files": ("read", "write", "delete"),
        ADMIN_SERVICE: ADMIN_ACTIONS,
    }
)
