"""AI token quotas: an hourly token budget per key, spent by handlers.

The budget is the key's own ``token_quota`` or its type's default. Spending is counted in
one-minute buckets over a rolling hour: a request is measured against the tokens spent in
the current minute and the 59 before it.

Two styles, on :class:`Quotas` (``gate.quotas``):

- before spending, when the cost is known: :meth:`Quotas.reserve` atomically checks that
  ``tokens`` fit and counts them, or answers 429 ``quota_exceeded`` and counts nothing;
- when the cost is known only afterwards: :meth:`Quotas.check` first (429 when the budget
  is already gone; counts nothing), then :meth:`Quotas.record` with what was spent (counts
  it, never refuses: the work is done — not even when the store is down and the failure
  mode is ``"deny"``).

Each returns a :class:`QuotaState` whose :meth:`~QuotaState.headers` a handler may add to
its response; the 429 carries them, with ``Retry-After``.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict, defaultdict
from dataclasses import dataclass
from typing import Literal, Protocol

from starlette.requests import HTTPConnection

from keystile.alerts import Alerter
from keystile.clock import Clock, system_clock
from keystile.exceptions import StoreUnavailable
from keystile.fallback import FailureMode, Fallback, FallingBack, redis_address
from keystile.models import ApiKey, KeyPolicy
from keystile.principal import PRINCIPAL, REFUSALS
from keystile.redis.connect import RedisClient
from keystile.redis.errors import translated
from keystile.redis.schema import RedisSchema
from keystile.redis.scripts import lua
from keystile.responses import Headers, Refusal, Refusals, raise_refusal
from keystile.usage import UsageRecorder
from keystile.usage.models import check_tokens

__all__ = ["MemoryQuotaStore", "QuotaState", "QuotaStore", "Quotas", "RedisQuotaStore"]

logger = logging.getLogger("keystile.quotas")

WINDOW = 3600
_BUCKET = 60
POLICY = "ai-tokens"
Mode = Literal["reserve", "check", "record"]


@dataclass(frozen=True, slots=True)
class QuotaState:
    """Where a key stands against its budget after a call."""

    allowed: bool
    quota: int
    remaining: int
    reset: int  # seconds until the oldest counted minute leaves the rolling hour
    degraded: bool = False

    def headers(self) -> Headers:
        """The ``RateLimit-Policy`` / ``RateLimit`` pair for the token budget (plus
        ``Retry-After`` and ``Cache-Control`` when refused)."""
        headers = [
            (b"ratelimit-policy", f'"{POLICY}";q={self.quota};w={WINDOW}'.encode()),
            (b"ratelimit", f'"{POLICY}";r={max(self.remaining, 0)};t={self.reset}'.encode()),
        ]
        if not self.allowed:
            headers += [(b"retry-after", str(max(self.reset, 1)).encode())]
            headers += [(b"cache-control", b"no-store")]
        return headers

    def header_dict(self) -> dict[str, str]:
        """:meth:`headers` for a Starlette ``Response(headers=...)``."""
        return {k.decode(): v.decode() for k, v in self.headers()}


class QuotaStore(Protocol):
    """Counts tokens per key in minute buckets over a rolling hour."""

    async def spend(self, key_id: str, tokens: int, quota: int, mode: Mode) -> QuotaState: ...

    async def start(self) -> None: ...


def _admits(mode: Mode, spent: int, tokens: int, quota: int) -> bool:
    if mode == "reserve":
        return spent + tokens <= quota
    if mode == "check":
        return spent < quota
    return True  # record: the tokens are already spent


def _state(spent: int, oldest_minute: int | None, now: float, quota: int, ok: bool) -> QuotaState:
    if oldest_minute is None:
        reset = WINDOW
    else:  # the oldest minute counted leaves the rolling hour at its start + 1 hour
        reset = max(1, math.ceil(oldest_minute * _BUCKET + WINDOW - now))
    return QuotaState(ok, quota, quota - spent, reset)


class MemoryQuotaStore:
    """Token buckets in this process (bounded to ``max_keys`` keys, least recent first)."""

    def __init__(self, *, clock: Clock = system_clock, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, dict[int, int]] = OrderedDict()

    async def spend(self, key_id: str, tokens: int, quota: int, mode: Mode) -> QuotaState:
        now = self._clock()
        minute = int(now // _BUCKET)
        buckets = self._buckets.setdefault(key_id, {})
        self._buckets.move_to_end(key_id)
        for old in [m for m in buckets if m <= minute - WINDOW // _BUCKET]:
            del buckets[old]
        spent = sum(buckets.values())
        ok = _admits(mode, spent, tokens, quota)
        if ok and mode != "check":
            buckets[minute] = buckets.get(minute, 0) + tokens
            spent += tokens
        while len(self._buckets) > self._max_keys:
            self._buckets.popitem(last=False)
        return _state(spent, min(buckets) if buckets else None, now, quota, ok)

    async def start(self) -> None:
        return None


# The token-quota script (keystile/redis/lua/token_quota.lua): one atomic call per spend.
_SCRIPT = lua("token_quota")


class RedisQuotaStore:
    """Token buckets in Redis: one atomic script per call, on Redis' clock."""

    def __init__(self, client: RedisClient, *, namespace: str = "keystile") -> None:
        self.client = client
        self.namespace = namespace
        self.names = RedisSchema(namespace)
        self._script = client.register_script(_SCRIPT)

    def bucket_key(self, key_id: str) -> str:
        return self.names.quota(key_id)

    @translated("spending AI tokens")
    async def spend(
        self, key_id: str, tokens: int, quota: int, mode: Mode, now_ms: int | None = None
    ) -> QuotaState:
        """Count on Redis' own clock, or (tests) at ``now_ms``."""
        args = [tokens, quota, mode, "" if now_ms is None else now_ms]
        raw = await self._script(keys=[self.bucket_key(key_id)], args=args)
        ok, spent, oldest, now = (int(v) for v in raw)
        return _state(spent, oldest if oldest >= 0 else None, now / 1000, quota, ok == 1)

    @translated("loading the token-quota script")
    async def start(self) -> None:
        await self.client.script_load(_SCRIPT)


class Quotas(FallingBack):
    """The token budgets of authenticated keys, for handlers to spend."""

    def __init__(
        self,
        store: QuotaStore,
        policy: KeyPolicy,
        *,
        usage: UsageRecorder | None = None,
        alerts: Alerter | None = None,
        failure: FailureMode = "allow",
        log_interval: float = 60.0,
        trip_after: int = 3,
        backoff: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        self.store = store
        self.policy = policy
        self.usage = usage  # tokens spent and quota refusals count in the key's usage
        self.alerts = alerts  # spends past 80/90/100 % of the budget raise alerts
        # (mode, "allowed" | "refused" | "none" (no quota) | "unavailable") -> decisions
        self.decisions: defaultdict[tuple[str, str], int] = defaultdict(int)
        # When the store fails: "allow" (counted in passes, logged) or "deny"; after
        # trip_after failures in a row it is not asked for a while (keystile.fallback).
        self.fallback = Fallback(
            "token quotas",
            logger,
            failure=failure,
            log_interval=log_interval,
            trip_after=trip_after,
            backoff=backoff,
            where=redis_address(getattr(store, "client", None)),
        )

    def quota_of(self, key: ApiKey) -> int | None:
        """The hourly token budget in force for a key (``None``: unlimited)."""
        return self.policy.token_quota(key, key.type)

    async def spend(self, key: ApiKey, tokens: int, mode: Mode) -> QuotaState | None:
        """Count ``tokens`` for ``key`` in ``mode``; ``None`` when the key has no budget."""
        check_tokens(tokens)
        quota = self.quota_of(key)
        if quota is None:
            return None
        # What was spent is spent: a record is let through even with failure="deny".
        allow = mode == "record"
        state = await self.fallback.ask(self.store.spend, key.id, tokens, quota, mode, allow=allow)
        if state is None:  # the store did not answer, and the failure mode is "allow"
            return QuotaState(True, quota, quota, WINDOW, degraded=True)
        counted = state.allowed and mode != "check"
        if self.usage is not None:
            if counted and tokens:
                self.usage.record_tokens(key.id, tokens)
            elif not state.allowed:
                self.usage.record_refusal(key.id, "quota")
        if self.alerts is not None and counted and tokens:
            used = quota - state.remaining
            self.alerts.quota_spent(key.id, used - tokens, used, quota)
        return state

    async def reserve(self, conn: HTTPConnection, tokens: int) -> QuotaState | None:
        """Before spending: count ``tokens`` if they fit the budget, else answer 429."""
        return await self._charge(conn, tokens, "reserve")

    async def check(self, conn: HTTPConnection) -> QuotaState | None:
        """Before spending an amount not yet known: answer 429 if the budget is gone."""
        return await self._charge(conn, 0, "check")

    async def record(self, conn: HTTPConnection, tokens: int) -> QuotaState | None:
        """After spending: count ``tokens`` (never refuses; the work is done)."""
        return await self._charge(conn, tokens, "record")

    async def _charge(self, conn: HTTPConnection, tokens: int, mode: Mode) -> QuotaState | None:
        if PRINCIPAL not in conn.scope:
            raise RuntimeError("token quotas need a request authenticated by KeystileMiddleware")
        refusals: Refusals = conn.scope[REFUSALS]  # the middleware's realm and Retry-After
        try:
            state = await self.spend(conn.scope[PRINCIPAL].key, tokens, mode)
        except StoreUnavailable:  # failure="deny", and the store did not answer
            self.decisions[(mode, "unavailable")] += 1
            raise_refusal(conn, refusals.quota_unavailable)
        verdict = "none" if state is None else "allowed" if state.allowed else "refused"
        self.decisions[(mode, verdict)] += 1
        if state is not None and not state.allowed:
            base = refusals.quota_exceeded
            raise_refusal(conn, Refusal(base.status, base.code, base.message, state.headers()))
        return state
