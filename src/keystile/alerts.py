"""Alerts, evaluated as usage is flushed.

Rules (each optional, see :class:`AlertRules`):

- ``requests_per_minute`` — a key made more requests in one minute than the threshold;
- ``error_rate`` — the share of 4xx+5xx answers in one minute passed the threshold, with
  at least ``error_min_requests`` requests that minute;
- ``inactive_key_in_use`` — a revoked or expired key was still presented;
- ``new_ip`` — a production key was used from an address it had not used before (the
  first address a key ever uses is its baseline, not an alert). Each key remembers at most
  10,000 addresses: once it has, a further address is neither remembered nor reported (a
  key used from that many addresses gets nothing from this rule; it cannot fire on every
  flush);
- ``quota`` — AI token use passed 80, 90 and 100 % of the key's hourly budget;
- ``rotation_due`` — a key is older than its type's rotation age (prod 90 days, dev a year).

Each alert fires once per condition per ``cooldown`` — across processes when the store is
Redis (``SET NX EX``) — and goes to the registered callbacks, to the ``keystile.alerts``
log (key id only, never a secret) and, optionally, to a webhook: a JSON POST signed as the
Standard Webhooks specification says, queued, retried with back-off (:mod:`keystile.webhooks`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Annotated, Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from keystile.alert_state import AlertState, MemoryAlertState, RedisAlertState
from keystile.clock import Clock, system_clock, to_datetime, to_timestamp
from keystile.exceptions import KeystileError, StoreError
from keystile.logs import fields
from keystile.models import ApiKey, KeyPolicy
from keystile.usage import ERRORS_4XX, ERRORS_5XX, REQUESTS, UsageBatch
from keystile.webhooks import WebhookSender

__all__ = ["Alert", "AlertRules", "Alerter", "MemoryAlertState", "RedisAlertState"]

logger = logging.getLogger("keystile.alerts")

AlertCallback = Callable[["Alert"], Awaitable[None] | None]


class Alert(BaseModel):
    """One alert: which rule, which key (by id), what happened."""

    model_config = ConfigDict(frozen=True)

    rule: str
    key_id: str
    message: str
    at: datetime
    details: dict[str, Any] = {}


class AlertRules(BaseModel):
    """Which rules run, and their thresholds (``None`` turns a rule off): the process's
    default; a key's overrides, else its project's rules, come first (:mod:`keystile.projects`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: Annotated[int, Field(ge=1, le=1_000_000_000)] | None = None
    error_rate: Annotated[float, Field(ge=0.0, le=1.0)] | None = 0.5
    error_min_requests: Annotated[int, Field(ge=1, le=1_000_000_000)] = 20
    inactive_key_in_use: bool = True
    new_ip_for_prod: bool = True
    quota_thresholds: Annotated[
        tuple[Annotated[float, Field(gt=0.0, le=1.0)], ...], Field(max_length=10)
    ] = (0.8, 0.9, 1.0)
    rotation_due: bool = True
    cooldown: Annotated[float, Field(gt=0.0, le=30 * 86_400)] = 3600.0


_LOOKUPS_PER_FLUSH = 20  # store reads a flush may make for keys not in the cache
_YIELD_EVERY = 200  # rows a flush's checks go through between yields to the event loop


# The fewest requests one key makes in one minute that may fire the per-minute rules: the
# requests_per_minute rule (any requests), and the error_rate rule (some of them failed).
Floors = tuple[float, float]


def minute_floors(rules: AlertRules) -> Floors:
    """The fewest requests in one minute that may fire ``rules``' ``requests_per_minute``
    and, with at least one failed, ``error_rate``."""
    busy = erring = math.inf
    if rules.requests_per_minute is not None:
        busy = rules.requests_per_minute + 1
    if rules.error_rate is not None:
        erring = rules.error_min_requests
    return busy, erring


def lowest(floors: Iterable[Floors]) -> Floors:
    """Each floor's lowest of ``floors``."""
    busy, erring = zip(*floors, strict=True)
    return min(busy), min(erring)


class RuleSource(Protocol):
    """Each key's rules by project, refreshed per flush (:class:`~keystile.projects.RuleBook`)."""

    async def refresh(self, projects: Iterable[str]) -> None: ...

    def rules(self, default: AlertRules, project: str, key_id: str) -> AlertRules: ...


class Alerter:
    """Evaluates the rules on each usage flush and delivers what fires. ``rules`` are the
    default; with a ``rulebook``, each key is judged by its own (its overrides, else its
    project's, else the default), cached: most flushes make no round trip for them."""

    def __init__(
        self,
        rules: AlertRules,
        state: AlertState,
        cached: Callable[[str], ApiKey | None],
        lookup: Callable[[str], Awaitable[ApiKey | None]],
        policy: KeyPolicy,
        *,
        clock: Clock = system_clock,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
        webhook_timeout: float = 2.0,
        webhook_retries: int = 3,
        monotonic: Callable[[], float] = time.monotonic,
        rulebook: RuleSource | None = None,
    ) -> None:
        self.rules = rules
        self.rulebook = rulebook
        self._projects: dict[str, str] = {}  # key id -> project (a key never changes it)
        self.state = state
        self.cached = cached
        self.lookup = lookup
        self.policy = policy
        self.clock = clock
        self.monotonic = monotonic  # when remembered lookups and claims run out
        # Signed deliveries, queued and retried (keystile.webhooks).
        self.webhook = (
            WebhookSender(
                webhook_url, webhook_secret, timeout=webhook_timeout, retries=webhook_retries
            )
            if webhook_url
            else None
        )
        self.callbacks: list[AlertCallback] = []
        self.fired = 0
        self._quota: list[tuple[str, int, int, int]] = []  # key id, before, after, quota
        self._claimed: dict[str, float] = {}  # claims known taken, until their cool-down ends
        self._remote = state.shared  # claims cost a round trip: remember those taken
        self._looked_up: dict[str, float] = {}
        self._lookups_left = 0
        self._candidates: list[tuple[str, str, str, str, dict[str, Any], float]] = []
        self._due: dict[str, float] = {}  # key id -> when its rotation falls due (records')

    def subscribe(self, callback: AlertCallback) -> AlertCallback:
        """Call ``callback(alert)`` (sync or async) for every alert; usable as a decorator."""
        self.callbacks.append(callback)
        return callback

    def quota_spent(self, key_id: str, before: int, after: int, quota: int) -> None:
        """Note a token spend; thresholds it crossed (the key's rules) fire at the next flush."""
        thresholds = self._known(key_id).quota_thresholds
        if quota > 0 and thresholds:
            crossed = any(before < t * quota <= after for t in thresholds)
            if crossed and len(self._quota) < 10_000:  # bounded while flushes fail
                self._quota.append((key_id, before, after, quota))

    def _project_of(self, key_id: str) -> str | None:
        """The key's project: remembered, else from the cached record (no round trip)."""
        project = self._projects.get(key_id)
        if project is None and (record := self.cached(key_id)) is not None:
            project = self._remember(key_id, record.project)
        return project

    def _remember(self, key_id: str, project: str) -> str:
        if len(self._projects) >= 100_000:  # bounded: forget all, re-learn them
            self._projects.clear()
        self._projects[key_id] = project
        return project

    def _known(self, key_id: str) -> AlertRules:
        """The key's rules from what is cached (the default when its project is unknown)."""
        project = self._project_of(key_id) if self.rulebook is not None else None
        if project is None or self.rulebook is None:
            return self.rules
        return self.rulebook.rules(self.rules, project, key_id)

    async def _resolve(self, key_ids: Iterable[str]) -> Floors:
        """Load the rules of every key's project for this flush (in one round trip at most;
        a key not cached is looked up, ``_LOOKUPS_PER_FLUSH`` at most, else judged by the
        default); the fewest requests in one minute that may fire a per-minute rule for
        any of them, :func:`minute_floors` (:meth:`_known` gives each key's rules)."""
        rulebook = self.rulebook
        if rulebook is None:
            return minute_floors(self.rules)
        keys = key_ids if isinstance(key_ids, dict) else dict.fromkeys(key_ids)
        projects = set(map(self._projects.get, keys))  # (the keys already known: C speed)
        if None in projects:
            projects.discard(None)
            lookups = _LOOKUPS_PER_FLUSH
            for n, key_id in enumerate(keys, 1):
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                project = self._project_of(key_id)
                if project is None and lookups > 0:
                    lookups -= 1
                    try:
                        record = await self.lookup(key_id)
                    except KeystileError:
                        continue
                    # A key no longer stored is judged by the default, and not looked up
                    # again.
                    project = self._remember(key_id, "" if record is None else record.project)
                projects.add(project)
        known = {p for p in projects if p}
        await rulebook.refresh(known)
        floors = getattr(rulebook, "floors", None)
        return (0.0, 0.0) if floors is None else floors(self.rules, known)

    async def on_flush(
        self, batch: UsageBatch, touched: Mapping[tuple[str, int], Sequence[int]]
    ) -> None:
        """Judge a flush. Only what may fire has its key's rules looked at: a key-minute
        with fewer requests than any per-minute rule needs, a row with no inactive
        attempt, a watched key seen from addresses the state already holds, a key younger
        than its type's rotation age (remembered from its record) cost one check each."""
        now = self.clock()
        keys: dict[str, None] = {}
        for table in batch.minutes.values():
            keys.update(dict.fromkeys(table.index))
        floors = await self._resolve(itertools.chain(keys, (spend[0] for spend in self._quota)))
        rules_of = self._known
        await self._per_minute(touched, floors)
        # What may fire, picked out a slice of the keys at a time, with the event loop let
        # run between: addresses not known to be in a watched key's set, keys whose
        # rotation may be due (what their record said); and the inactive attempts.
        inactive = list(batch.inactive.items())
        knowing = getattr(self.state, "knowing", None)
        knows = knowing() if knowing is not None else None
        seen = list(batch.seen.items())
        addresses: dict[str, set[str]] = {}
        due: list[str] = []
        due_at, listed = self._due.get, list(keys)
        for start in range(0, max(len(seen), len(listed)), _YIELD_EVERY):
            await asyncio.sleep(0)  # a flush of many keys lets requests run meanwhile
            addresses.update(
                (key_id, {ips} if isinstance(ips, str) else set(ips))
                for key_id, ips in seen[start : start + _YIELD_EVERY]
                if knows is None or not knows(key_id, ips)
            )
            part = listed[start : start + _YIELD_EVERY]
            due += [key_id for key_id in part if due_at(key_id, -math.inf) <= now]
        for key_id, attempts in inactive:
            if rules_of(key_id).inactive_key_in_use:
                await self._fire(
                    "inactive_key_in_use",
                    key_id,
                    "a revoked or expired key is still being used",
                    {"attempts": attempts},
                )
        watched = {}
        for n, (key_id, used) in enumerate(addresses.items(), 1):
            if n % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if rules_of(key_id).new_ip_for_prod:
                watched[key_id] = used
        if watched:
            # Every address a production key used since the last flush; only keys seen from
            # an address this process has not learnt their set holds go to the state's store.
            try:
                fresh = await self.state.new_addresses(watched)
            except StoreError as exc:
                logger.warning(
                    "alert state unavailable (%s)",
                    type(exc).__name__,
                    extra=fields("alert.state_unavailable"),
                )
                fresh = {}
            for key_id, ips in fresh.items():
                for ip in ips:
                    await self._fire(
                        f"new_ip:{ip}",
                        key_id,
                        f"the production key was used from a new address {ip}",
                        {"ip": ip},
                        rule="new_ip",
                    )
        self._lookups_left = _LOOKUPS_PER_FLUSH
        for n, key_id in enumerate(due, 1):
            if n % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if rules_of(key_id).rotation_due:
                await self._check_rotation(key_id, now)
        pending, self._quota = self._quota, []
        for key_id, before, after, quota in pending:
            for threshold in rules_of(key_id).quota_thresholds:
                line = threshold * quota
                if before < line <= after:
                    percent = round(threshold * 100)
                    await self._fire(
                        f"quota_{percent}",
                        key_id,
                        f"AI token use passed {percent} % of the hourly budget ({quota})",
                        {"used": after, "quota": quota},
                        rule="quota",
                    )
        await self._settle()

    # The flush's totals as the store gives them (keystile.usage.totals.FlushTotals: the
    # busy minutes picked out, no others unpacked).
    on_flush.lazy_totals = True  # type: ignore[attr-defined]

    async def _per_minute(
        self, touched: Mapping[tuple[str, int], Sequence[int]], floors: Floors
    ) -> None:
        """The per-minute rules, over the key-minutes that may fire one: at least the
        ``floors`` of :func:`minute_floors` (a store's totals that can pick those out,
        :meth:`at_least`, unpack no others)."""
        busy, erring = floors
        if busy == erring == math.inf:
            return
        at_least = getattr(touched, "at_least", None)
        parts = [touched.items()] if at_least is None else at_least(busy, erring)
        n = 0
        for part in parts:  # (a chunk of the flush's buckets: let requests run between)
            await asyncio.sleep(0)
            for (key_id, minute), counts in part:
                n += 1
                if n % _YIELD_EVERY == 0:
                    await asyncio.sleep(0)
                requests = counts[REQUESTS]
                if requests >= busy or (
                    requests >= erring and (counts[ERRORS_4XX] or counts[ERRORS_5XX])
                ):
                    await self._judge_minute(key_id, minute, counts)

    async def _judge_minute(self, key_id: str, minute: int, counts: Sequence[int]) -> None:
        rules = self._known(key_id)
        requests = counts[REQUESTS]
        if rules.requests_per_minute is not None and requests > rules.requests_per_minute:
            await self._fire(
                "requests_per_minute",
                key_id,
                f"{requests} requests in one minute (threshold {rules.requests_per_minute})",
                {"minute": to_datetime(minute * 60).isoformat(), "requests": requests},
            )
        errors = counts[ERRORS_4XX] + counts[ERRORS_5XX]
        if (
            rules.error_rate is not None
            and requests >= rules.error_min_requests
            and errors / requests > rules.error_rate
        ):
            await self._fire(
                "error_rate",
                key_id,
                f"{errors} of {requests} requests failed in one minute",
                {"minute": to_datetime(minute * 60).isoformat(), "errors": errors},
            )

    async def _check_rotation(self, key_id: str, now: float) -> None:
        """A key past its type's rotation age, judged from the cached record (the middleware
        keeps every active key there). A key not cached is read from the store, at most
        ``_LOOKUPS_PER_FLUSH`` per flush and once an hour per key."""
        record = self.cached(key_id)
        if record is None:
            clock = self.monotonic()
            if self._lookups_left <= 0 or self._looked_up.get(key_id, -math.inf) > clock:
                return
            self._lookups_left -= 1
            if len(self._looked_up) >= 100_000:
                self._looked_up = {k: v for k, v in self._looked_up.items() if v > clock}
            self._looked_up[key_id] = clock + 3600
            try:
                record = await self.lookup(key_id)
            except KeystileError:  # the store follows the one error contract
                return
        if record is None:
            return
        rules = self.policy.types.get(record.type)
        age = None if rules is None else rules.rotation_age
        # A key's type and creation never change, nor does a replaced key come back: until
        # it is due (never, replaced or of a type with no rotation age) a flush does not
        # look at it again.
        if len(self._due) >= 100_000:
            self._due.clear()
        if age is None or record.replaced_by is not None:
            self._due[key_id] = math.inf
            return
        # (A second early: the check below is the exact one.)
        self._due[key_id] = to_timestamp(record.created_at) + age.total_seconds() - 1.0
        if now - to_timestamp(record.created_at) > age.total_seconds():
            await self._fire(
                "rotation_due",
                key_id,
                f"the key is older than its type's rotation age ({age.days} days)",
                {"created_at": record.created_at.isoformat()},
            )

    async def _fire(
        self, name: str, key_id: str, message: str, details: dict[str, Any], rule: str = ""
    ) -> None:
        """Queue an alert; :meth:`_settle` claims the flush's alerts in one round trip."""
        cooldown = self._known(key_id).cooldown
        claim = f"{key_id}|{name}"
        if self._remote:
            # A shared state costs a round trip per claim: remember the claims known taken
            # until their cool-down ends (in real time, as Redis keeps them).
            now = self.monotonic()
            if self._claimed.get(claim, -math.inf) > now:
                return
            if len(self._claimed) >= 100_000:
                self._claimed = {k: v for k, v in self._claimed.items() if v > now}
            self._claimed[claim] = now + cooldown
        self._candidates.append((claim, rule or name, key_id, message, details, cooldown))

    async def _settle(self) -> None:
        """Claim every queued alert at once (one pipeline with Redis), deliver the won ones."""
        candidates, self._candidates = self._candidates, []
        if not candidates:
            return
        try:
            won = [False] * len(candidates)
            # One claim per cool-down in use (usually one): keys may set their own.
            for cooldown in {c[5] for c in candidates}:
                at = [i for i, c in enumerate(candidates) if c[5] == cooldown]
                taken = await self.state.claim_many([candidates[i][0] for i in at], cooldown)
                for i, ok in zip(at, taken, strict=True):
                    won[i] = ok
        except StoreError as exc:
            logger.warning(
                "alert state unavailable (%s); alerts not sent",
                type(exc).__name__,
                extra=fields("alert.state_unavailable"),
            )
            return
        for (_, rule, key_id, message, details, _), ok in zip(candidates, won, strict=True):
            if ok:
                await self._deliver(rule, key_id, message, details)

    async def _deliver(
        self, rule: str, key_id: str, message: str, details: dict[str, Any]
    ) -> None:
        alert = Alert(
            rule=rule,
            key_id=key_id,
            message=message,
            at=to_datetime(self.clock()),
            details=details,
        )
        self.fired += 1
        payload = alert.model_dump(mode="json")
        logger.warning(
            "keystile alert %s for %s: %s",
            alert.rule,
            key_id,
            message,
            extra={"keystile_alert": payload, **fields("alert.fired", key_id=key_id, code=rule)},
        )
        for callback in self.callbacks:
            try:
                result = callback(alert)
                if asyncio.iscoroutine(result):
                    await result
            except Exception:  # one failing callback must not silence the others
                logger.exception("alert callback failed", extra=fields("alert.callback_failed"))
        if self.webhook is not None:
            self.webhook.send(payload)

    async def drain(self) -> None:
        """Wait for webhook deliveries in flight (each bounded by timeout and retries)."""
        if self.webhook is not None:
            await self.webhook.drain()
