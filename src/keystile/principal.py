"""The authenticated key as request-time code sees it: the :class:`Principal` derived once
per cached record (scopes expanded, limits and allowlists parsed), the :class:`KeyUser`
Starlette shows as ``request.user``, and the scope keys the middleware leaves them under.

Below the gate and the middleware, above the models: the key cache holds a principal per
entry, and code under the middleware (token quotas, the admin router, per-route scopes)
reads what it needs from the request scope, never the middleware itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from starlette.authentication import AuthCredentials, BaseUser

from keystile.addresses import AddressMode
from keystile.clock import to_timestamp
from keystile.models import ApiKey, KeyPolicy
from keystile.network import parse_ip_entry
from keystile.origins import origin_allowed, parse_origin, parse_origin_pattern
from keystile.ratelimit import LimitSet, limit_set

__all__ = ["MAX_ORIGIN_MEMO", "PRINCIPAL", "REFUSALS", "KeyUser", "Principal", "principal_of"]

# Request scope keys the middleware sets: the admitted key's Principal, and its Refusals
# (realm and Retry-After), for refusals raised further down (scopes, quotas, admin).
PRINCIPAL = "keystile.principal"
REFUSALS = "keystile.refusals"

# The longest Origin value a key's principal remembers its answer for (a scheme, a
# 253-character host and a port fit); longer ones are parsed each time.
MAX_ORIGIN_MEMO = 300


def _address_mode(policy: KeyPolicy, key_type: str) -> AddressMode:
    """Usage counts a browser type's keys by IP and origin, and notes the addresses of a
    type that watches new IPs (the new-IP alert); the key type's policy says which."""
    rules = policy.types.get(key_type)
    if rules is None:
        return AddressMode.IGNORE
    if rules.browser:
        return AddressMode.BY_CLIENT
    return AddressMode.WATCH_IPS if rules.watch_new_ips else AddressMode.IGNORE


class KeyUser(BaseUser):
    """``request.user`` after a key authenticated: carries the key record, never the secret."""

    __slots__ = ("key",)

    def __init__(self, key: ApiKey) -> None:
        self.key = key

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return self.key.name

    @property
    def identity(self) -> str:
        return self.key.id

    def __repr__(self) -> str:
        return f"KeyUser({self.key.id}, {self.key.hint})"


class Principal:
    """What the middleware derives once per cached record and reuses on every request."""

    __slots__ = (
        "_origin_memo",
        "auth",
        "catalogue",
        "expires",
        "ip_mode",
        "key",
        "key_id",
        "key_limits",
        "limits",
        "networks",
        "origins",
        "project",
        "restricted",
        "revoked",
        "scopes",
        "type_name",
        "user",
    )

    def __init__(self, key: ApiKey, policy: KeyPolicy) -> None:
        self.key = key
        # Read on every request that records usage; a pydantic model's attributes are
        # slower to read than a slot (its __getattr__ defeats the interpreter's shortcut).
        self.key_id = key.id
        self.type_name = str(key.type)  # a metrics label (keystile.telemetry)
        self.project = key.project  # what the request's data is scoped by
        text = policy.rate_limit(key, key.type)
        per_address = policy.address_rate_limit(key, key.type)
        # The policy is named after the key type: headers never carry key material.
        name = self.type_name
        # The key's windows and each client address's, decided together; the key's alone
        # for a request whose address is unknown (a Unix socket).
        self.limits: LimitSet | None = (
            limit_set(text, name, per_address) if text or per_address else None
        )
        self.key_limits: LimitSet | None = limit_set(text, name) if text else None
        self.catalogue = policy.catalogue
        self.scopes = policy.catalogue.expand(key.scopes) | frozenset(key.scopes)
        self.expires = to_timestamp(key.expires_at) if key.expires_at else float("inf")
        self.revoked = key.revoked_at is not None  # the record is frozen
        self.auth = AuthCredentials(sorted(self.scopes))
        self.user = KeyUser(key)
        self.origins = tuple(parse_origin_pattern(o) for o in key.allowed_origins)
        self.networks = tuple(parse_ip_entry(n) for n in key.allowed_ips)
        self._origin_memo: dict[bytes, bool] = {}
        self.restricted = bool(self.origins or self.networks)
        self.ip_mode = _address_mode(policy, key.type)

    def origin_ok(self, value: bytes) -> bool:
        """Whether this key's allowed origins match an ``Origin`` header value."""
        ok = self._origin_memo.get(value)
        if ok is None:
            origin = parse_origin(value)
            ok = origin is not None and origin_allowed(origin, self.origins)
            # Bounded, in bytes too: a key sees few distinct origins, each short (a client
            # key is public: anyone can send it with a megabyte of Origin).
            if len(self._origin_memo) < 64 and len(value) <= MAX_ORIGIN_MEMO:
                self._origin_memo[value] = ok
        return ok

    def grants(self, scope: str) -> bool:
        """Whether this key holds ``scope`` (wildcards resolved)."""
        return scope in self.scopes or self.catalogue.grants(self.key.scopes, scope)

    def missing(self, scopes: Sequence[str]) -> tuple[str, ...]:
        """Those of ``scopes`` this key does not hold."""
        return tuple(s for s in scopes if not self.grants(s))


class Derivable(Protocol):
    """A cached key record with room for its principal (a key cache entry)."""

    record: ApiKey
    principal: Principal | None


def principal_of(entry: Derivable, policy: KeyPolicy) -> Principal:
    """The principal of a cache entry, derived on first use and kept with the entry."""
    principal = entry.principal
    if principal is None:
        principal = entry.principal = Principal(entry.record, policy)
    return principal
