"""What a key store brings with it: where every other part keeps its state.

On the memory store, the rate limiter, token quotas, usage and alert state live in this
process; on a Redis store they live in the same Redis, under the same namespace, shared by
every process that uses it. :func:`backend_for` is the one place that choice is made: the
gate, the manager and the usage readers ask it, and never look at the store's type.
Another deployment (Cluster, Sentinel) changes how the store's connection is made, not
this: each part asks :func:`keystile.redis.connect.is_cluster` where a cluster needs
another way (one slot per script, transaction and pipeline of scripts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from keystile.alert_state import AlertState, MemoryAlertState, RedisAlertState
from keystile.audit import AuditTrail, MemoryAuditTrail, RedisAuditTrail
from keystile.clock import Clock
from keystile.exceptions import StoreError, StoreMisconfigured
from keystile.projects import MemoryProjectStore, ProjectStore, RedisProjectStore
from keystile.quotas import MemoryQuotaStore, QuotaStore, RedisQuotaStore
from keystile.ratelimit import Limiter, MemoryLimiter, RedisLimiter
from keystile.redis.connect import RedisClient, is_cluster
from keystile.redis.errors import redis_errors
from keystile.settings import KeystileSettings
from keystile.stores.redis import RedisStore
from keystile.usage import MemoryUsageStore, RedisUsageStore, UsageStore

__all__ = ["Backend", "MemoryBackend", "RedisBackend", "backend_for"]


class Backend(Protocol):
    """Builds the state of every part that lives beside the key records."""

    @property
    def shared(self) -> bool:
        """Whether other processes see the same state (a Redis), or only this one."""

    def limiter(self, settings: KeystileSettings, clock: Clock) -> Limiter: ...

    def quota_store(self, clock: Clock) -> QuotaStore: ...

    def usage_store(self, clock: Clock, settings: KeystileSettings | None = None) -> UsageStore:
        """Where usage is kept; ``settings`` gives its retention (the defaults without)."""

    def alert_state(self, clock: Clock) -> AlertState: ...

    def project_store(self) -> ProjectStore:
        """Where project records and alert rules are kept."""

    def audit_trail(self, clock: Clock, settings: KeystileSettings | None = None) -> AuditTrail:
        """Where management actions are recorded (``settings``: retention and bound)."""

    async def check(self) -> None:
        """:class:`~keystile.exceptions.StoreMisconfigured` when the store cannot be used as
        configured (one round trip; a store that is down raises StoreUnavailable)."""


def _retention(settings: KeystileSettings | None) -> dict[str, Any]:
    if settings is None:
        return {}
    return {
        "minute_retention": settings.usage_minute_retention,
        "day_retention": settings.usage_day_retention,
        "top_n": settings.usage_top_n,
    }


def _audit_bounds(settings: KeystileSettings | None) -> dict[str, Any]:
    settings = settings or KeystileSettings.model_construct()
    return {"retention": settings.audit_retention, "max_events": settings.audit_max_events}


class MemoryBackend:
    """Everything in this process."""

    shared = False

    def limiter(self, settings: KeystileSettings, clock: Clock) -> Limiter:
        return MemoryLimiter(clock=clock)

    def quota_store(self, clock: Clock) -> QuotaStore:
        return MemoryQuotaStore(clock=clock)

    def usage_store(self, clock: Clock, settings: KeystileSettings | None = None) -> UsageStore:
        return MemoryUsageStore(clock=clock, **_retention(settings))

    def alert_state(self, clock: Clock) -> AlertState:
        return MemoryAlertState(clock=clock)

    def project_store(self) -> ProjectStore:
        return MemoryProjectStore()

    def audit_trail(self, clock: Clock, settings: KeystileSettings | None = None) -> AuditTrail:
        return MemoryAuditTrail(clock=clock, **_audit_bounds(settings))

    async def check(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class RedisBackend:
    """Everything in the key store's Redis, under its namespace."""

    client: RedisClient
    namespace: str
    shared = True

    def limiter(self, settings: KeystileSettings, clock: Clock) -> Limiter:
        return RedisLimiter(
            self.client,
            namespace=self.namespace,
            timeout=settings.rate_limit_timeout,
            **settings.fallback_options,
        )

    def quota_store(self, clock: Clock) -> QuotaStore:
        return RedisQuotaStore(self.client, namespace=self.namespace)

    def usage_store(self, clock: Clock, settings: KeystileSettings | None = None) -> UsageStore:
        return RedisUsageStore(self.client, namespace=self.namespace, **_retention(settings))

    def alert_state(self, clock: Clock) -> AlertState:
        return RedisAlertState(self.client, namespace=self.namespace)

    def project_store(self) -> ProjectStore:
        return RedisProjectStore(self.client, namespace=self.namespace)

    def audit_trail(self, clock: Clock, settings: KeystileSettings | None = None) -> AuditTrail:
        return RedisAuditTrail(
            self.client, namespace=self.namespace, clock=clock, **_audit_bounds(settings)
        )

    async def check(self) -> None:
        """A node of a Redis Cluster answers a plain connection only for its own slots:
        every other key is a MOVED error, so keystile refuses to start on one (a cluster
        client finds its nodes here)."""
        if is_cluster(self.client):
            try:
                with redis_errors("finding the cluster's nodes"):
                    await self.client.initialize()
            except StoreError as exc:
                if "Cluster mode is not enabled" in str(exc.__cause__):
                    raise StoreMisconfigured(
                        "the Redis at the store's redis+cluster:// URL is not a node of a "
                        "Redis Cluster: use redis:// (or rediss://) for a standalone Redis"
                    ) from None
                raise
            return
        with redis_errors("checking the deployment"):
            info = await self.client.info("cluster")
        if int(info.get("cluster_enabled", 0)) == 1:
            raise StoreMisconfigured(
                "the Redis at the store URL is a node of a Redis Cluster: reach the cluster "
                "with redis+cluster://host:port[,host:port...] (rediss+cluster:// for TLS)"
            )


def backend_for(store: object) -> Backend:
    """The backend of a key store (cached or not): its Redis's, or this process's."""
    inner = getattr(store, "store", store)  # a CachedStore's own
    if isinstance(inner, RedisStore):
        return RedisBackend(inner.client, inner.namespace)
    return MemoryBackend()
