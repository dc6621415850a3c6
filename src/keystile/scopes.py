"""The scope catalogue: which ``service:action`` scopes exist, and what a held scope grants.

``service:*`` grants every action of a service and ``*`` grants everything.
The catalogue is configuration: apps with other services pass their own.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

__all__ = ["DEFAULT_CATALOGUE", "WILDCARD", "ScopeCatalogue"]

WILDCARD = "*"


class ScopeCatalogue:
    """The services and actions that scopes may name."""

    __slots__ = ("_all", "_services")

    def __init__(self, services: Mapping[str, Iterable[str]]) -> None:
        self._services: dict[str, tuple[str, ...]] = {}
        for service, actions in services.items():
            acts = tuple(actions)
            for part in (service, *acts):
                if not part or ":" in part or part == WILDCARD or not part.isascii():
                    raise ValueError(f"invalid name in the scope catalogue: {part!r}")
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
        "admin": ("manage_keys", "view_usage"),
    }
)
