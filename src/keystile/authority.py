"""What a calling key may do to keys: ``admin:manage_keys`` is not root.

A key (the admin API's caller) may grant only scopes it holds itself (wildcards
resolved), may not change its own scopes, allowlists, limits or expiry, and may not update
or rotate a key holding scopes it lacks — each a :class:`~keystile.exceptions.ScopeRefused`
naming what is missing. A ``*`` key, and no key at all (the operator: Python code, the
command line), may do everything.
"""

from __future__ import annotations

from collections.abc import Iterable

from keystile.exceptions import ScopeRefused
from keystile.models import ApiKey
from keystile.scopes import WILDCARD, ScopeCatalogue

__all__ = ["SELF_GUARDED", "Authority"]

# What a key may not change on itself unless it holds everything ("*"): else a key with
# admin:manage_keys could widen its own scopes or lift its own restrictions and limits.
SELF_GUARDED = (
    "scopes",
    "allowed_origins",
    "allowed_ips",
    "rate_limit",
    "address_rate_limit",
    "token_quota",
    "expires_at",
)


class Authority:
    """The rules above, over one scope catalogue."""

    __slots__ = ("catalogue",)

    def __init__(self, catalogue: ScopeCatalogue) -> None:
        self.catalogue = catalogue

    def lacks(self, actor: ApiKey | None, scopes: Iterable[str]) -> tuple[str, ...]:
        """Those of ``scopes`` that ``actor`` does not hold (wildcards resolved); none for
        the operator (``None``) or a ``*`` key."""
        if actor is None or WILDCARD in actor.scopes:
            return ()
        catalogue = self.catalogue
        return tuple(s for s in dict.fromkeys(scopes) if not catalogue.grants(actor.scopes, s))

    def may_grant(self, actor: ApiKey | None, scopes: Iterable[str]) -> None:
        missing = self.lacks(actor, scopes)
        if actor is not None and missing:
            raise ScopeRefused(
                missing,
                f"key {actor.id} cannot grant scopes it does not hold: it lacks "
                + " ".join(missing),
            )

    def may_manage(self, actor: ApiKey | None, target: ApiKey, action: str) -> None:
        missing = self.lacks(actor, target.scopes)
        if actor is not None and missing:
            raise ScopeRefused(
                missing,
                f"key {actor.id} cannot {action} key {target.id}, which holds scopes it "
                f"lacks: {' '.join(missing)}",
            )

    def may_change_itself(self, actor: ApiKey | None, record: ApiKey, updated: ApiKey) -> None:
        if actor is None or actor.id != record.id or not self.lacks(actor, [WILDCARD]):
            return
        changed = [f for f in SELF_GUARDED if getattr(updated, f) != getattr(record, f)]
        if changed:
            raise ScopeRefused(
                (WILDCARD,),
                f"key {actor.id} cannot change its own {', '.join(changed)}: that takes "
                f"the scope {WILDCARD}",
            )
