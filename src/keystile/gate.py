"""Keystile: the store, hasher, policy and clock that the middleware, the management API,
the admin router and the command line share.

One ``Keystile`` per app: the middleware reads keys through its cache, and the manager
writes through the same cache, so a key revoked in this process is refused on the very
next request.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from pydantic import SecretStr

from keystile.alerts import Alerter, AlertRules
from keystile.backends import backend_for
from keystile.clock import Clock, system_clock, to_datetime
from keystile.cors import OriginIndex
from keystile.exceptions import StoreError, StoreMisconfigured
from keystile.fallback import Health
from keystile.keys import KeyHasher
from keystile.manager import KeyManager
from keystile.models import DEFAULT_POLICY, KeyPolicy
from keystile.principal import MAX_ORIGIN_MEMO, KeyUser, Principal, principal_of
from keystile.quotas import Quotas
from keystile.ratelimit import Limiter
from keystile.settings import KeystileSettings
from keystile.stores import (
    CachedStore,
    CacheEntry,
    KeyStore,
    MemoryStore,
    open_store,
)
from keystile.usage import UsageRecorder

__all__ = ["MAX_ORIGIN_MEMO", "GateHealth", "KeyUser", "Keystile", "Principal"]

logger = logging.getLogger("keystile")


def _hasher(secret: str | bytes | SecretStr | None, store: KeyStore) -> KeyHasher:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if secret is None:
        if not isinstance(store, MemoryStore):
            raise ValueError(
                "a server secret is required with a shared store: pass secret= or set "
                "KEYSTILE_SECRET"
            )
        # Keys in a memory store die with the process, and so may the secret.
        secret = secrets.token_bytes(32)
    return KeyHasher(secret)


@dataclass(frozen=True, slots=True)
class GateHealth:
    """:meth:`Keystile.health`: what the rate limiter, the token quotas and the key store
    each know of Redis (a :class:`keystile.fallback.Health` apiece)."""

    limiter: Health
    quotas: Health
    store: Health

    @property
    def ok(self) -> bool:
        return self.limiter.ok and self.quotas.ok and self.store.ok

    @property
    def status(self) -> Literal["ok", "degraded"]:
        return "ok" if self.ok else "degraded"


class Keystile:
    """Everything keystile needs to authenticate and manage keys, configured once."""

    def __init__(
        self,
        *,
        store: KeyStore | str | None = None,
        secret: str | bytes | SecretStr | None = None,
        policy: KeyPolicy = DEFAULT_POLICY,
        clock: Clock = system_clock,
        settings: KeystileSettings | None = None,
        lookup_timeout: float = 1.0,
        limiter: Limiter | None = None,
        alert_rules: AlertRules | None = None,
    ) -> None:
        settings = settings or KeystileSettings()
        if store is None or isinstance(store, str):
            cached = open_store(store, settings)
        elif isinstance(store, CachedStore):
            cached = store
        else:
            cached = CachedStore(
                store,
                max_size=settings.cache_size,
                ttl=settings.cache_ttl,
                announced_ttl=settings.cache_announced_ttl,
                negative_size=settings.negative_cache_size,
                negative_ttl=settings.negative_cache_ttl,
            )
        self.store = cached
        self.hasher = _hasher(secret if secret is not None else settings.secret, cached.store)
        self.policy = policy
        self.clock = clock
        self.lookup_timeout = lookup_timeout
        # Where every other part keeps its state follows from the key store.
        backend = backend_for(cached)
        self.backend = backend
        self.limiter = limiter if limiter is not None else backend.limiter(settings, clock)
        self._origins: OriginIndex | None = None
        self.alerts = Alerter(
            alert_rules or AlertRules(),
            backend.alert_state(clock),
            cached.cached,
            cached.get,
            policy,
            clock=clock,
            webhook_url=settings.alert_webhook_url,
        )
        self.usage = UsageRecorder(
            backend.usage_store(clock, settings),
            clock=clock,
            interval=settings.usage_flush_interval,
            max_buckets=settings.usage_max_buckets,
            top_n=settings.usage_top_n,
            on_flush=[self.alerts.on_flush],  # each flush's counts go through the rules
        )
        # Tokens spent and quota refusals count in usage; spends raise the 80/90/100 % alerts.
        self.quotas = Quotas(
            backend.quota_store(clock),
            policy,
            usage=self.usage,
            alerts=self.alerts,
            **settings.fallback_options,
        )
        self.manager = KeyManager(
            cached, self.hasher, policy=policy, clock=clock, usage=self.usage.reader()
        )
        self._started = False  # startup() ran: the cache follows key changes

    @property
    def origin_index(self) -> OriginIndex:
        """The union of every active key's allowed origins (built on first use)."""
        if self._origins is None:
            self._origins = OriginIndex(self.store, clock=self.clock, max_age=self.store.ttl)
        return self._origins

    def principal(self, entry: CacheEntry) -> Principal:
        """The derived view of a cache entry, built once per entry."""
        return principal_of(entry, self.policy)

    def now(self) -> datetime:
        return to_datetime(self.clock())

    async def startup(self) -> None:
        """Subscribe the cache to change announcements and load the limiter's script.

        Called by the middleware when the app starts (lifespan). Everything works without
        it, only the first requests pay for what it prepares; a store that is down now is
        logged, not raised, so the app still starts.
        """
        try:
            await self.backend.check()
        except StoreMisconfigured:
            raise  # the app must not start on a store it cannot use
        except StoreError as exc:  # down now: logged, and everything recovers when it is back
            logger.warning("could not check the store: %s", exc)
        await self.store.start()
        self._started = True
        try:
            await self.limiter.start()
            await self.quotas.store.start()
        except StoreError as exc:
            logger.warning("could not prepare the rate limiter: %s", type(exc).__name__)

    def health(self) -> GateHealth:
        """Whether Redis is answering, as each part that needs it last found: the rate
        limiter and the token quotas are ``"degraded"`` while they back off from a failing
        Redis (decisions take the failure mode), the key store while it no longer hears of
        key changes (every lookup then asks Redis). No round trip: cheap enough for a
        health endpoint."""
        health = getattr(self.limiter, "health", None)  # a limiter without Redis has none
        limiter = health() if callable(health) else Health("rate limiter")
        store = Health("key store")
        if self._started and self.backend.shared and not self.store.listening:
            why = "not hearing of key changes (the events channel is down)"
            store = Health("key store", "degraded", last_error=why)
        return GateHealth(limiter, self.quotas.health(), store)

    async def shutdown(self) -> None:
        """Flush usage (and the alerts it raises) and close the limiter's own connection.
        Called by the middleware when the app stops (lifespan); a graceful shutdown loses
        no count. The store stays open (it may be shared): :meth:`aclose` closes it too."""
        await self.usage.close()
        await self.alerts.drain()
        await self.limiter.close()

    async def aclose(self) -> None:
        await self.shutdown()
        await self.store.close()

    def __repr__(self) -> str:
        return f"Keystile({self.store!r})"
