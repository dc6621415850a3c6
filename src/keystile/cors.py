"""CORS for browser keys: preflights answered before authentication from the
union of every active key's allowed origins (plus the app's own), and the headers of
actual responses. Origin parsing and matching live in :mod:`keystile.origins`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from keystile.clock import Clock, system_clock
from keystile.models import ApiKey
from keystile.origins import (
    Origin,
    OriginPattern,
    PatternIndex,
    origin_allowed,
    parse_origin_pattern,
)
from keystile.stores.protocol import KeyStore

__all__ = ["CorsPolicy", "OriginIndex"]

_Entry = tuple[tuple[OriginPattern, ...], float]  # a key's allowed origins, its expiry


class OriginIndex:
    """The union of the allowed origins of every *active* key in a store: the policy that
    answers preflights, which never carry a key.

    Loaded in full once, then kept current from the store's change announcements (this
    process at once, others through Redis pub/sub): each announced key is re-read. A resync
    reloads everything; while announcements are not arriving, the index reloads whenever
    it is older than ``max_age`` seconds. Expiry is checked at match time.

    The origins live in a :class:`~keystile.origins.PatternIndex`, so answering costs the
    same with 20,000 keys as with 10: preflights and refusals before authentication are
    anonymous, and must not cost in proportion to the keys.
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        clock: Clock = system_clock,
        max_age: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ):
        self.store = store
        self.clock = clock  # wall time: when keys expire
        self.max_age = max_age
        self.monotonic = monotonic  # how old the index is
        self._keys: dict[str, _Entry] = {}  # what each key added to the index
        self._patterns = PatternIndex()
        self._loaded_at: float | None = None  # monotonic
        self._stale: set[str] = set()
        self._reload = True
        self._lock = asyncio.Lock()
        store.add_listener(self)

    # -- StoreListener ---------------------------------------------------------------------

    def key_changed(self, key_id: str, digest: str | None) -> None:
        self._stale.add(key_id)

    def resync(self) -> None:
        self._reload = True

    def connection_lost(self) -> None:
        return None

    # -- queries ---------------------------------------------------------------------------

    async def allows(self, origin: Origin) -> bool:
        """Whether some active key (or nothing else) allows ``origin``."""
        await self.refresh()
        return self._patterns.matches(origin, self.clock())

    async def refresh(self) -> None:
        """Bring the index up to date with what was announced (or reload it all)."""
        loaded = self._loaded_at
        if (
            loaded is not None
            and not self.store.listening
            and self.monotonic() - loaded > self.max_age
        ):
            self._reload = True
        if not self._reload and not self._stale and not self._lock.locked():
            return
        # Whoever finds a refresh under way waits for it: answering from the index it is
        # replacing (empty, on the first load) would refuse origins that are allowed.
        async with self._lock:
            if self._reload:
                self._reload = False
                self._stale.clear()
                await self._load_all()
            while self._stale:
                key_id = self._stale.pop()
                self._track(key_id, await self.store.get(key_id))

    async def _load_all(self) -> None:
        started = self.monotonic()
        keys: dict[str, _Entry] = {}
        after = None
        while True:
            page = await self.store.list_keys(after=after, limit=500)
            for record in page:
                entry = _entry(record)
                if entry is not None:
                    keys[record.id] = entry
            if len(page) < 500:
                break
            after = page[-1].id
        self._keys = keys
        self._patterns = PatternIndex(
            (pattern, expires) for patterns, expires in keys.values() for pattern in patterns
        )
        self._loaded_at = started

    def _track(self, key_id: str, record: ApiKey | None) -> None:
        """Replace what ``key_id`` holds in the index with what ``record`` allows now."""
        entry = None if record is None else _entry(record)
        old = self._keys.pop(key_id, None)
        if old is not None:
            patterns, expires = old
            for pattern in patterns:
                self._patterns.discard(pattern, expires)
        if entry is not None:
            self._keys[key_id] = entry
            patterns, expires = entry
            for pattern in patterns:
                self._patterns.add(pattern, expires)


def _entry(record: ApiKey) -> _Entry | None:
    if record.revoked or not record.allowed_origins:
        return None
    expires = record.expires_at.timestamp() if record.expires_at else float("inf")
    return tuple(dict.fromkeys(parse_origin_pattern(o) for o in record.allowed_origins)), expires


class _HasOriginIndex(Protocol):
    @property
    def origin_index(self) -> OriginIndex: ...


class CorsPolicy:
    """How keystile answers browsers: preflights from the union of active keys' origins and
    the app's own, and the headers of actual responses."""

    def __init__(
        self,
        gate: _HasOriginIndex,
        *,
        origins: Iterable[str] = (),
        methods: Iterable[str] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"),
        headers: Iterable[str] = ("Content-Type",),
        expose: Iterable[str] = (),
        max_age: int = 600,
        require_origin: bool = False,
    ) -> None:
        self._gate = gate
        self.origins = tuple(parse_origin_pattern(o) for o in origins)
        self.methods = tuple(dict.fromkeys(m.upper() for m in methods))
        # A "*" in Access-Control-Allow-Headers never covers Authorization (Fetch standard).
        allowed = ["Authorization", *(h for h in headers if h.lower() != "authorization")]
        self.allow_headers = ", ".join(dict.fromkeys(allowed)).encode()
        self._allowed_lower = {h.lower() for h in allowed}
        expose_list = [
            "RateLimit",
            "RateLimit-Policy",
            "Retry-After",
            "X-RateLimit-Limit",
            "X-RateLimit-Remaining",
            "X-RateLimit-Reset",
            "WWW-Authenticate",
            *expose,
        ]
        self.expose = ", ".join(dict.fromkeys(expose_list)).encode()
        self.max_age = str(max_age).encode()
        self.require_origin = require_origin

    async def preflight_allows(self, origin: Origin, method: bytes, headers: bytes) -> bool:
        """Whether a preflight from ``origin`` for ``method`` and ``headers`` is allowed."""
        if method.decode("latin-1").upper() not in self.methods:
            return False
        asked = {h.strip().lower() for h in headers.decode("latin-1").split(",") if h.strip()}
        if not asked <= self._allowed_lower:
            return False
        return origin_allowed(origin, self.origins) or await self._gate.origin_index.allows(origin)

    def preflight_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-methods", ", ".join(self.methods).encode()),
            (b"access-control-allow-headers", self.allow_headers),
            (b"access-control-max-age", self.max_age),
            (b"vary", b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers"),
        ]

    def response_headers(self, origin: bytes) -> list[tuple[bytes, bytes]]:
        """The headers of an actual response to an allowed origin."""
        return [
            (b"access-control-allow-origin", origin),
            (b"access-control-expose-headers", self.expose),
            (b"vary", b"Origin"),
        ]

    async def union_allows(self, origin: Origin) -> bool:
        """The key-independent policy (for answers given before a key is known)."""
        return origin_allowed(origin, self.origins) or await self._gate.origin_index.allows(origin)
