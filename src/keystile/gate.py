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
from typing import TYPE_CHECKING, Literal, Protocol

from pydantic import SecretStr

from keystile.alerts import Alerter, AlertRules
from keystile.backends import backend_for
from keystile.clock import Clock, system_clock, to_datetime
from keystile.config import load_config
from keystile.cors import OriginIndex
from keystile.exceptions import StoreError, StoreMisconfigured
from keystile.fallback import Health, failure_cause, redis_address
from keystile.keys import KeyHasher
from keystile.logs import fields
from keystile.manager import KeyManager
from keystile.models import ApiKey, KeyPolicy
from keystile.principal import MAX_ORIGIN_MEMO, KeyUser, Principal, principal_of
from keystile.projects import RuleBook
from keystile.quotas import Quotas
from keystile.ratelimit import Limiter
from keystile.settings import KeystileSettings, SettingsOptions, closest_setting
from keystile.stores import (
    CachedStore,
    CacheEntry,
    KeyStore,
    MemoryStore,
    open_store,
)
from keystile.telemetry import Telemetry
from keystile.usage import UsageRecorder

if TYPE_CHECKING:
    from typing_extensions import Unpack

__all__ = [
    "MAX_ORIGIN_MEMO",
    "Extension",
    "GateHealth",
    "KeyUser",
    "Keystile",
    "Principal",
]

logger = logging.getLogger("keystile")


def _hasher(secret: str | bytes | SecretStr | None, store: KeyStore) -> KeyHasher | None:
    """The hasher under ``secret``; ``None`` when there is none and the store is in memory
    (the caller then makes one up)."""
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    if secret is None:
        if not isinstance(store, MemoryStore):
            raise ValueError(
                "a server secret is required with a shared store: pass secret= or set "
                "KEYSTILE_SECRET"
            )
        return None
    return KeyHasher(secret)


class Extension(Protocol):
    """Something that lives as long as the gate: started by :meth:`Keystile.startup`,
    closed by :meth:`Keystile.shutdown` after the last usage flush."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _settings(settings: KeystileSettings | None, options: dict[str, object]) -> KeystileSettings:
    """``settings`` (default: from the environment) with the keyword ``options`` on top;
    ``TypeError`` naming the closest setting for an option that is none."""
    fields = KeystileSettings.model_fields
    for name in options:
        if name not in fields or name.startswith("_"):
            close = closest_setting(name, fields)
            hint = f"; did you mean {close!r}?" if close else ""
            raise TypeError(f"Keystile() got an unknown setting {name!r}{hint}")
    if settings is None:
        return KeystileSettings(**options)
    if not options:
        return settings
    return KeystileSettings(**{**settings.model_dump(), **options})


def store_description(store: KeyStore, namespace: str | None = None) -> str:
    """Where keys are kept, for the start-up log: host, port, database and namespace of a
    Redis (never a password), or the memory store."""
    if isinstance(store, MemoryStore):
        return "the memory store (keys live and die with this process)"
    client = getattr(store, "client", None)
    pool = getattr(client, "connection_pool", None)
    options = getattr(pool, "connection_kwargs", None)
    where = redis_address(client)
    service = getattr(pool, "service_name", None)  # a Sentinel pool follows a master
    if isinstance(service, str):
        where = f"the master of Sentinel service {service!r}"
    db = options.get("db", 0) if isinstance(options, dict) else 0
    namespace = getattr(store, "namespace", namespace)
    return f"Redis at {where or 'an unnamed address'}, database {db}, namespace {namespace!r}"


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
    """Everything keystile needs to authenticate and manage keys, configured once.

    ``policy`` holds the app's scopes and key types; without it, they are read from the
    app's configuration file (``[tool.keystile]`` in ``pyproject.toml``, ``keystile.toml``
    or ``KEYSTILE_CONFIG``; see :mod:`keystile.config`), which the command line reads too,
    else the defaults."""

    def __init__(
        self,
        *,
        store: KeyStore | str | None = None,
        secret: str | bytes | SecretStr | None = None,
        policy: KeyPolicy | None = None,
        clock: Clock = system_clock,
        settings: KeystileSettings | None = None,
        lookup_timeout: float = 1.0,
        limiter: Limiter | None = None,
        alert_rules: AlertRules | None = None,
        **options: Unpack[SettingsOptions],
    ) -> None:
        """Every setting of :class:`~keystile.settings.KeystileSettings` may be passed as a
        keyword argument (``Keystile(namespace="shop", redis_url="redis://...")``); they
        take precedence over ``settings`` (default: read from the environment), and
        ``store=``/``secret=`` over ``redis_url``/the settings' secret."""
        settings = _settings(settings, dict(options))
        self.settings = settings
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
        hasher = _hasher(secret if secret is not None else settings.secret, cached.store)
        # Keys in a memory store die with the process, and so may the secret.
        self.generated_secret = hasher is None
        self._store_named = False  # startup() names the store once, however often it runs
        self.hasher = hasher or KeyHasher(secrets.token_bytes(32))
        # The app's own scopes and key types: given, or from its configuration file.
        policy = policy if policy is not None else load_config().policy
        self.policy = policy
        self.clock = clock
        self.lookup_timeout = lookup_timeout
        # Where every other part keeps its state follows from the key store.
        backend = backend_for(cached)
        self.backend = backend
        self.limiter = limiter if limiter is not None else backend.limiter(settings, clock)
        self._origins: OriginIndex | None = None
        alert_rules = alert_rules or AlertRules()
        # Project names and alert rules, shared by the manager (which changes them) and the
        # alerter (which reads them, cached: a change made here is seen at the next flush).
        self.projects = backend.project_store()
        self.alerts = Alerter(
            alert_rules,
            backend.alert_state(clock),
            cached.cached,
            cached.get,
            policy,
            clock=clock,
            webhook_url=settings.alert_webhook_url,
            webhook_secret=(
                settings.alert_webhook_secret.get_secret_value()
                if settings.alert_webhook_secret
                else None
            ),
            rulebook=RuleBook(self.projects),
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
            cached,
            self.hasher,
            policy=policy,
            clock=clock,
            usage=self.usage.reader(),
            audit=backend.audit_trail(clock, settings),
            projects=self.projects,
            alert_rules=alert_rules,
        )
        self._started = False  # startup() ran: the cache follows key changes
        self._undeclared: set[str] = set()  # keys refused for their type, told once each
        # What the middleware counts of its decisions (keystile.metrics reads it).
        self.telemetry = Telemetry()
        # Started with the gate and closed after its last usage flush (keystile.metrics).
        self.extensions: list[Extension] = []

    @property
    def started(self) -> bool:
        """Whether :meth:`startup` ran (and :meth:`shutdown` did not)."""
        return self._started

    @property
    def origin_index(self) -> OriginIndex:
        """The union of every active key's allowed origins (built on first use)."""
        if self._origins is None:
            self._origins = OriginIndex(self.store, clock=self.clock, max_age=self.store.ttl)
        return self._origins

    def undeclared_type(self, key: ApiKey) -> None:
        """Say once per key (a bounded number of them) why a stored key is refused: the
        policy no longer declares its type."""
        if key.id in self._undeclared or len(self._undeclared) >= 1000:
            return
        self._undeclared.add(key.id)
        logger.warning(
            "refused key %s: its type %r is not declared by the policy (declared: %s)",
            key.id,
            str(key.type),
            ", ".join(self.policy.types),
            extra=fields("auth.undeclared_type", key_id=key.id, code="invalid_api_key"),
        )

    def principal(self, entry: CacheEntry) -> Principal:
        """The derived view of a cache entry, built once per entry."""
        return principal_of(entry, self.policy)

    def now(self) -> datetime:
        return to_datetime(self.clock())

    async def startup(self) -> None:
        """Subscribe the cache to change announcements and load the limiter's script.

        Called by the middleware when the app starts (lifespan). Everything works without
        it, only the first requests pay for what it prepares; a store that is down now is
        logged, not raised, so the app still starts. Logs one line naming the store in use,
        and a warning when it is the memory store under a secret made up for this process:
        once per gate, although the demo, or several apps sharing the gate, start it again.
        """
        where = store_description(self.store.store)
        if not self._store_named:
            self._store_named = True
            self._name_the_store(where)
        try:
            await self.backend.check()
        except StoreMisconfigured:
            raise  # the app must not start on a store it cannot use
        except StoreError as exc:  # down now: logged, and everything recovers when it is back
            logger.warning(
                "cannot reach the key store, %s: %s; starting anyway, it is retried as "
                "requests need it",
                where,
                failure_cause(exc),
                extra=fields("gate.store_unreachable", store=where),
            )
        await self.store.start()
        self._started = True
        for extension in self.extensions:
            await extension.start()
        try:
            await self.limiter.start()
            await self.quotas.store.start()
        except StoreError as exc:
            logger.warning(
                "could not prepare the rate limiter: %s",
                failure_cause(exc),
                extra=fields("gate.limiter_unprepared"),
            )

    def _name_the_store(self, where: str) -> None:
        """The store in use, and a warning when its keys and secret die with the process."""
        logger.info("keys are kept in %s", where, extra=fields("gate.store", store=where))
        if self.generated_secret:
            logger.warning(
                "running on the MEMORY STORE with a secret made up for this "
                "process: keys vanish when it stops and no other process accepts them. "
                "Set KEYSTILE_REDIS_URL and KEYSTILE_SECRET to share keys between processes.",
                extra=fields("gate.memory_store"),
            )

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
        self._started = False
        await self.usage.close()
        await self.alerts.drain()
        await self.limiter.close()
        for extension in self.extensions:
            await extension.close()

    async def aclose(self) -> None:
        await self.shutdown()
        await self.store.close()

    def __repr__(self) -> str:
        return f"Keystile({self.store!r})"
