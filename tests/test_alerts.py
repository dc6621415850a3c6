"""Alerts (docs/alerts.md): every rule fires once per cool-down as usage is flushed, and reaches
the callbacks, the log (key id, never the secret) and a webhook that cannot stall the app."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from conftest import REDIS_URL, cleanup_namespace, fake_redis, new_namespace, require_redis
from keystile import KeystileSettings, ManualClock, MemoryStore, RedisStore
from keystile.alerts import (
    Alert,
    Alerter,
    AlertRules,
    AlertState,
    MemoryAlertState,
    RedisAlertState,
)
from keystile.clock import to_datetime
from keystile.gate import Keystile
from keystile.models import DEFAULT_POLICY, ApiKey
from keystile.quotas import MemoryQuotaStore, RedisQuotaStore
from keystile.stores import KeyStore
from keystile.usage import MemoryUsageStore, UsageRecorder
from usage_app import build_app, http

SECRET = "x" * 20
# Seconds of real time Redis keeps a claim: longer than a loaded machine takes to run a
# scenario (0.2 s once ran out between a rule's second and third flush), so the cool-down
# ends when a test says so (Rig.cool_down).
REDIS_COOLDOWN = 120.0
MEMORY_COOLDOWN = 600.0  # seconds of the manual clock
WORKER = Path(__file__).with_name("alert_worker.py")
Headers = dict[str, str]


class Rig:
    """A gate with alert rules on one backend, and every alert it delivered."""

    def __init__(
        self, store: KeyStore, clock: ManualClock, rules: AlertRules, **settings: Any
    ) -> None:
        self.redis = store if isinstance(store, RedisStore) else None
        cooldown = MEMORY_COOLDOWN if self.redis is None else REDIS_COOLDOWN
        self.gate = Keystile(
            store=store,
            secret=SECRET,
            clock=clock,
            settings=KeystileSettings(usage_flush_interval=60.0, **settings),
            alert_rules=rules.model_copy(update={"cooldown": cooldown}),
        )
        if self.redis is None:
            self.gate.alerts.state = MemoryAlertState(clock=clock)
        # The process remembers claims it took until their cool-down ends, on its
        # monotonic clock: Rig.cool_down moves that clock on.
        self.elapsed = 0.0
        self.gate.alerts.monotonic = lambda: time.monotonic() + self.elapsed
        self.clock = clock
        self.app = build_app(self.gate)
        self.alerts: list[Alert] = []
        self.gate.alerts.subscribe(self.alerts.append)
        self.secrets: list[str] = []

    async def key(self, kind: str = "dev", **fields: Any) -> tuple[str, Headers]:
        """Create a key; its id and the headers that present it."""
        created = await self.gate.manager.create({"name": kind, "type": kind, **fields})
        secret = created.secret.get_secret_value()
        self.secrets.append(secret)
        return created.key.id, {"Authorization": f"Bearer {secret}"}

    async def send(
        self, headers: Headers, path: str = "/bytes/1", n: int = 1, ip: str = "198.51.100.7"
    ) -> list[int]:
        """Send ``n`` requests; their statuses."""
        method = "POST" if path.startswith("/infer/") else "GET"
        async with http(self.app, ip) as client:
            return [
                (await client.request(method, path, headers=headers)).status_code for _ in range(n)
            ]

    async def flush(self) -> list[str]:
        """Flush usage; the rules of the alerts this flush delivered."""
        before = len(self.alerts)
        assert await self.gate.usage.flush()
        return [alert.rule for alert in self.alerts[before:]]

    async def cool_down(self) -> None:
        """Let every alert's cool-down pass."""
        if self.redis is None:
            self.clock.advance(MEMORY_COOLDOWN + 1)
            return
        # What Redis does when the claims expire, now: each holds its cool-down as its TTL.
        client, pattern = self.redis.client, f"{self.redis.namespace}:alert:*"
        names = [name async for name in client.scan_iter(match=pattern)]
        assert names, "no claim to let pass"
        for name in names:
            assert 0 < await client.pttl(name) <= REDIS_COOLDOWN * 1000
            await client.delete(name)
        self.elapsed += REDIS_COOLDOWN + 1

    async def close(self) -> None:
        await self.gate.usage.close()
        await self.gate.alerts.drain()
        await self.gate.limiter.close()  # a client key's limiter connection, on Redis


@pytest.fixture
async def rig_for(store: KeyStore, clock: ManualClock) -> AsyncIterator[Callable[..., Rig]]:
    """Build a rig on each backend with the given rules (closed afterwards)."""
    made: list[Rig] = []

    def build(rules: AlertRules | None = None, **settings: Any) -> Rig:
        made.append(Rig(store, clock, rules or AlertRules(), **settings))
        return made[-1]

    yield build
    for rig in made:
        await rig.close()


# -- each rule, once per cool-down ----------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    """A rule, the rules that enable it, a key set up for it and a request pattern that
    meets its condition."""

    name: str
    rule: str
    rules: AlertRules
    setup: Callable[[Rig], Awaitable[Headers]]
    trigger: Callable[[Rig, Headers], Awaitable[None]]


async def dev_key(rig: Rig) -> Headers:
    return (await rig.key())[1]


async def revoked_key(rig: Rig) -> Headers:
    key_id, headers = await rig.key("prod")
    await rig.gate.manager.revoke(key_id)
    return headers


async def expired_key(rig: Rig) -> Headers:
    _, headers = await rig.key(expires_at=to_datetime(rig.clock() + 1))
    rig.clock.advance(2)
    return headers


async def old_prod_key(rig: Rig) -> Headers:
    """A production key created 91 days before the clock's now."""
    rig.clock.advance(-timedelta(days=91).total_seconds())
    _, headers = await rig.key("prod")
    rig.clock.advance(timedelta(days=91).total_seconds())
    return headers


async def six_requests(rig: Rig, headers: Headers) -> None:
    await rig.send(headers, n=6)


async def mostly_errors(rig: Rig, headers: Headers) -> None:
    """10 requests, 6 of them 404s."""
    assert await rig.send(headers, n=4) == [200] * 4
    assert await rig.send(headers, "/nowhere", 6) == [404] * 6


async def one_request(rig: Rig, headers: Headers) -> None:
    await rig.send(headers)


SCENARIOS = [
    Scenario(
        "requests_per_minute",
        "requests_per_minute",
        AlertRules(requests_per_minute=5),
        dev_key,
        six_requests,
    ),
    Scenario(
        "error_rate",
        "error_rate",
        AlertRules(error_rate=0.5, error_min_requests=10),
        dev_key,
        mostly_errors,
    ),
    Scenario("revoked", "inactive_key_in_use", AlertRules(), revoked_key, one_request),
    Scenario("expired", "inactive_key_in_use", AlertRules(), expired_key, one_request),
    Scenario("rotation_due", "rotation_due", AlertRules(), old_prod_key, one_request),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.name for s in SCENARIOS])
async def test_each_rule_fires_once_per_cooldown(
    rig_for: Callable[..., Rig], scenario: Scenario
) -> None:
    """The rule fires when its condition is met, stays silent while the condition repeats
    within the cool-down, and fires again once the cool-down has passed."""
    rig = rig_for(scenario.rules)
    headers = await scenario.setup(rig)
    await scenario.trigger(rig, headers)
    assert await rig.flush() == [scenario.rule]
    await scenario.trigger(rig, headers)
    assert await rig.flush() == []
    await scenario.trigger(rig, headers)
    assert await rig.flush() == []
    await rig.cool_down()
    await scenario.trigger(rig, headers)
    assert await rig.flush() == [scenario.rule]
    assert rig.gate.alerts.fired == 2


async def test_thresholds_are_exceeded_not_met(rig_for: Callable[..., Rig]) -> None:
    """Exactly the threshold fires nothing (5 requests with a limit of 5; 5 errors in 10
    requests with a rate of 0.5), and no error rate fires below the minimum volume."""
    busy = rig_for(AlertRules(requests_per_minute=5))
    _, headers = await busy.key()
    assert await busy.send(headers, n=5) == [200] * 5
    assert await busy.flush() == []
    assert await busy.send(headers) == [200]
    assert await busy.flush() == ["requests_per_minute"]
    failing = rig_for(AlertRules(error_rate=0.5, error_min_requests=10))
    _, half = await failing.key()
    _, few = await failing.key()
    assert await failing.send(half, n=5) == [200] * 5
    assert await failing.send(half, "/nowhere", 5) == [404] * 5  # exactly half fail
    assert await failing.send(few, "/nowhere", n=9) == [404] * 9  # all fail, but 9 < 10
    assert await failing.flush() == []
    assert await failing.send(few, "/nowhere") == [404]  # the 10th: the volume is reached
    assert await failing.flush() == ["error_rate"]


def judgements(rig: Rig, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The key ids ``rig``'s alert rules judge by the per-minute rules, as they do."""
    judged: list[str] = []
    judge = rig.gate.alerts._judge_minute

    async def counted(key_id: str, minute: int, counts: Any) -> None:
        judged.append(key_id)
        await judge(key_id, minute, counts)

    monkeypatch.setattr(rig.gate.alerts, "_judge_minute", counted)
    return judged


async def test_only_the_key_minutes_that_may_fire_a_per_minute_rule_are_judged(
    rig_for: Callable[..., Rig], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Work, not time (issue #19): a key-minute is judged by the per-minute rules (its
    key's rules looked up, its counters unpacked from a Redis flush's reply) only when it
    may fire one: more requests than ``requests_per_minute``, or the error rate's volume
    with at least one failure. Busy keys with nothing failing cost no judgement."""
    rig = rig_for(AlertRules(requests_per_minute=20, error_rate=0.5, error_min_requests=10))
    judged = judgements(rig, monkeypatch)
    ok_id, ok = await rig.key()  # 15 requests, none failing: judged by neither rule
    one_id, one = await rig.key()  # 12 requests, one failing: judged, fires nothing
    few_id, few = await rig.key()  # 5 requests, all failing: below the volume
    busy_id, busy = await rig.key()  # 21 requests: judged, fires
    assert await rig.send(ok, n=15) == [200] * 15
    assert await rig.send(one, n=11) == [200] * 11
    assert await rig.send(one, "/nowhere") == [404]
    assert await rig.send(few, "/nowhere", n=5) == [404] * 5
    assert await rig.send(busy, n=21) == [200] * 21
    assert await rig.flush() == ["requests_per_minute"]
    assert sorted(judged) == sorted([one_id, busy_id])
    assert [alert.key_id for alert in rig.alerts] == [busy_id]
    judged.clear()
    assert await rig.send(few, "/nowhere", n=5) == [404] * 5  # the volume: 10 of 10 failed
    assert await rig.send(ok) == [200]
    assert await rig.flush() == ["error_rate"]
    assert judged == [few_id] and rig.alerts[-1].key_id == few_id
    assert ok_id not in judged
    # With no requests_per_minute rule (the default), a busy key-minute with no failure is
    # passed over (on Redis, a chunk's reply with no failure in it is searched once, in C),
    # and one with failures in the same flush is still found.
    quiet = rig_for(AlertRules(error_rate=0.5, error_min_requests=10))
    judged_quietly = judgements(quiet, monkeypatch)
    _, calm = await quiet.key()
    failing_id, failing = await quiet.key()
    assert await quiet.send(calm, n=25) == [200] * 25
    assert await quiet.flush() == []
    assert judged_quietly == []
    assert await quiet.send(failing, "/nowhere", n=10) == [404] * 10
    assert await quiet.send(calm) == [200]
    assert await quiet.flush() == ["error_rate"]
    assert judged_quietly == [failing_id]


async def test_new_address_for_a_production_key(rig_for: Callable[..., Rig]) -> None:
    """A production key's first address is its baseline; each address not seen before fires
    once (whatever the cool-down); known addresses, and development keys, never fire."""
    rig = rig_for()
    prod_id, prod = await rig.key("prod")
    _, dev = await rig.key("dev")
    await rig.send(prod, ip="192.0.2.1")
    await rig.send(dev, ip="192.0.2.1")
    assert await rig.flush() == []
    await rig.send(prod, ip="192.0.2.2")
    await rig.send(dev, ip="192.0.2.2")
    assert await rig.flush() == ["new_ip"]
    assert (rig.alerts[-1].key_id, rig.alerts[-1].details) == (prod_id, {"ip": "192.0.2.2"})
    for ip in ("192.0.2.2", "192.0.2.1"):
        await rig.send(prod, ip=ip)
        assert await rig.flush() == []
    await rig.send(prod, ip="2001:db8::3")
    assert await rig.flush() == ["new_ip"]
    await rig.cool_down()
    await rig.send(prod, ip="192.0.2.2")
    assert await rig.flush() == []


async def test_a_client_key_on_new_addresses_fires_nothing(rig_for: Callable[..., Rig]) -> None:
    """Browser (client) keys come from every visitor's address: the new-IP rule is for
    production keys only, whatever addresses a client key is used from."""
    rig = rig_for()
    origin = "https://app.example.com"
    _, client = await rig.key("client", allowed_origins=[origin])
    for ip in ("192.0.2.1", "192.0.2.2", "2001:db8::3"):
        assert await rig.send({**client, "Origin": origin}, ip=ip) == [200]
        assert await rig.flush() == []


async def test_a_new_address_within_one_flush_interval_fires(
    rig_for: Callable[..., Rig],
) -> None:
    """A production key used from a new address and then again from its known address
    before the next flush still fires new_ip for the new address."""
    rig = rig_for()
    _, prod = await rig.key("prod")
    await rig.send(prod, ip="192.0.2.1")
    assert await rig.flush() == []
    await rig.send(prod, ip="203.0.113.66")
    await rig.send(prod, ip="192.0.2.1")
    assert await rig.flush() == ["new_ip"]


# -- item 10: the addresses a key has used are a bounded set -------------------------------


@pytest.fixture(params=["memory", "fakeredis", "redis"])
async def address_state(request: pytest.FixtureRequest) -> AsyncIterator[AlertState]:
    """The alert state of each backend (Redis ones under a fresh namespace)."""
    import redis.asyncio

    namespace = new_namespace()
    if request.param == "memory":
        yield MemoryAlertState()
        return
    if request.param == "redis":
        require_redis()
        client = redis.asyncio.Redis.from_url(REDIS_URL)
    else:
        client = fake_redis()
    yield RedisAlertState(client, namespace=namespace)
    await client.aclose()
    if request.param == "redis":
        cleanup_namespace(namespace)


async def known_addresses(state: AlertState, key_id: str) -> set[str]:
    """The addresses the state remembers for ``key_id``."""
    if isinstance(state, MemoryAlertState):
        return set(state._seen.get(key_id, set()))
    assert isinstance(state, RedisAlertState)
    name = f"{state.namespace}:usage:{{{key_id}}}:seen_ips"
    return {m.decode() for m in await state.client.smembers(name)}


async def test_item10_a_keys_known_addresses_stop_at_the_cap(address_state: AlertState) -> None:
    """300 flushes of 64 new addresses each (19,200 in all) leave at most 10,000 remembered
    — in Redis too, whose set the old pipeline grew without bound. Until the cap, each
    address is reported once; at it, the rest are neither remembered nor reported, so a key
    used from ever more addresses cannot fire on every flush."""
    key_id = "key_item10"
    cap = 10_000  # the default
    reported: list[str] = []
    for flush in range(300):
        batch = {f"10.{flush // 256}.{flush % 256}.{n}" for n in range(64)}
        fresh = await address_state.new_addresses({key_id: batch})
        reported += fresh.get(key_id, [])
        assert set(fresh.get(key_id, [])) <= batch
    known = await known_addresses(address_state, key_id)
    assert len(known) == cap
    assert len(reported) == len(set(reported)) == cap - 64  # the first 64 were the baseline
    assert set(reported) <= known
    # Full: a new address is ignored, a known one stays known; nothing is reported.
    assert await address_state.new_addresses({key_id: {"192.0.2.99", reported[0]}}) == {}
    assert await known_addresses(address_state, key_id) == known


@pytest.mark.parametrize("kind", ["fakeredis", "redis"])
async def test_item10_a_set_grown_past_the_cap_before_is_cut_back_to_it(kind: str) -> None:
    """A set the old pipeline grew to 19,200 members goes back to the cap at the key's next
    flush, and reports nothing."""
    import redis.asyncio

    namespace = new_namespace()
    if kind == "redis":
        require_redis()
        client = redis.asyncio.Redis.from_url(REDIS_URL)
    else:
        client = fake_redis()
    try:
        state = RedisAlertState(client, namespace=namespace)
        name = f"{namespace}:usage:{{key_old}}:seen_ips"
        await client.sadd(
            name, *(f"10.{n // 65536}.{n // 256 % 256}.{n % 256}" for n in range(19_200))
        )
        assert await state.new_addresses({"key_old": {"192.0.2.1"}}) == {}
        assert await client.scard(name) == 10_000
    finally:
        await client.aclose()
        if kind == "redis":
            cleanup_namespace(namespace)


@pytest.mark.parametrize("room", [0, 1, 5])
async def test_item10_a_batch_larger_than_the_room_left_fills_to_the_cap(
    address_state: AlertState, room: int
) -> None:
    """A batch holding more new addresses than the set has room for adds (and reports)
    exactly as many as fit, never more — whichever backend holds the set."""
    address_state.max_known = 20  # type: ignore[attr-defined]
    key_id = "key_item10_room"
    assert (
        await address_state.new_addresses({key_id: {f"10.0.0.{n}" for n in range(20 - room)}})
        == {}
    )
    fresh = await address_state.new_addresses({key_id: {f"10.0.1.{n}" for n in range(8)}})
    assert len(fresh.get(key_id, [])) == room
    assert len(await known_addresses(address_state, key_id)) == 20


@pytest.mark.parametrize("kind", ["fakeredis", "redis"])
async def test_a_key_on_its_known_addresses_costs_no_round_trip_until_the_recheck(
    kind: str,
) -> None:
    """Once a process has learnt which addresses a key's set holds, flushes where the key
    used only those send nothing to Redis (the set's TTL, shortened here, is left as it
    is); a new address is still noted and reported; an hour on, the known address is
    noted again, which renews the set's 90-day TTL."""
    import redis.asyncio

    namespace = new_namespace()
    if kind == "redis":
        require_redis()
        client = redis.asyncio.Redis.from_url(REDIS_URL)
    else:
        client = fake_redis()
    clock = [1000.0]
    try:
        state = RedisAlertState(client, namespace=namespace, monotonic=lambda: clock[0])
        name = f"{namespace}:usage:{{key_usual}}:seen_ips"
        assert await state.new_addresses({"key_usual": {"192.0.2.1", "192.0.2.2"}}) == {}
        await client.expire(name, 50)
        for _ in range(3):
            assert await state.new_addresses({"key_usual": {"192.0.2.1"}}) == {}
            assert await state.new_addresses({"key_usual": {"192.0.2.1", "192.0.2.2"}}) == {}
        assert 0 < await client.ttl(name) <= 50
        fresh = await state.new_addresses({"key_usual": {"192.0.2.1", "192.0.2.3"}})
        assert fresh == {"key_usual": ["192.0.2.3"]}
        assert await client.ttl(name) > 50
        await client.expire(name, 50)
        assert await state.new_addresses({"key_usual": {"192.0.2.3"}}) == {}
        assert 0 < await client.ttl(name) <= 50
        clock[0] += 3601
        assert await state.new_addresses({"key_usual": {"192.0.2.3"}}) == {}
        assert await client.ttl(name) > 89 * 86_400
        assert await client.smembers(name) == {b"192.0.2.1", b"192.0.2.2", b"192.0.2.3"}
    finally:
        await client.aclose()
        if kind == "redis":
            cleanup_namespace(namespace)


def percents(alerts: Iterable[Alert]) -> list[int]:
    """The thresholds quota alerts report, from their messages."""
    found = []
    for alert in alerts:
        assert alert.rule == "quota"
        match = re.search(r"passed (\d+) %", alert.message)
        assert match is not None, alert.message
        found.append(int(match[1]))
    return found


async def test_quota_crossings_fire_once_each(rig_for: Callable[..., Rig]) -> None:
    """Token use passing 80, 90 and 100 % of the hourly budget fires one alert per
    threshold; crossing them again within the cool-down fires nothing, after it fires again."""
    rig = rig_for()
    key_id, headers = await rig.key(token_quota=100)

    async def spend(tokens: int) -> list[int]:
        statuses = await rig.send(headers, f"/infer/{tokens}")
        fired = await rig.flush()
        return [*statuses, *percents(rig.alerts[len(rig.alerts) - len(fired) :])]

    assert await spend(79) == [200]
    assert await spend(6) == [200, 80]
    assert await spend(10) == [200, 90]
    assert await spend(5) == [200, 100]
    assert await spend(1) == [429]
    assert rig.alerts[-1].details == {"used": 100, "quota": 100}

    async def new_hour() -> None:
        """Start the key's rolling hour afresh."""
        quotas = rig.gate.quotas
        if isinstance(quotas.store, RedisQuotaStore):
            await quotas.store.client.delete(quotas.store.bucket_key(key_id))
        else:
            quotas.store = MemoryQuotaStore(clock=rig.clock)

    await new_hour()
    assert await spend(100) == [200]  # all three crossed again, within the cool-down
    await rig.cool_down()
    await new_hour()
    assert await spend(100) == [200, 80, 90, 100]


async def test_rotation_age_follows_the_key_type(rig_for: Callable[..., Rig]) -> None:
    """A production key is due after 90 days and a development key after a year; younger
    keys are not."""
    rig = rig_for()
    day = timedelta(days=1).total_seconds()
    made: dict[str, Headers] = {}
    for name, kind, age in (
        ("prod89", "prod", 89),
        ("dev200", "dev", 200),
        ("dev366", "dev", 366),
    ):
        rig.clock.advance(-age * day)
        made[name] = (await rig.key(kind))[1]
        rig.clock.advance(age * day)
    for name in ("prod89", "dev200"):
        await rig.send(made[name])
        assert await rig.flush() == []
    await rig.send(made["dev366"])
    assert await rig.flush() == ["rotation_due"]


async def test_a_flush_looks_at_the_rules_and_records_of_the_keys_that_may_fire_only(
    rig_for: Callable[..., Rig],
) -> None:
    """Work, not time (issue #19): once a flush has seen 40 production keys, the next
    flush of their ordinary use looks at no key's rules and reads no cached record — a
    key-minute with fewer requests than any per-minute rule needs, a key on addresses
    known to hold and a key younger than its rotation age are judged without them (the
    earlier code resolved each key's rules three times and read each record, per flush)
    — and a key used from a new address has its own looked at, and fires."""
    rig = rig_for()
    made = [await rig.key("prod") for _ in range(40)]
    for _, headers in made:
        await rig.send(headers)
    assert await rig.flush() == []  # each key's baseline address; each record read once
    alerter = rig.gate.alerts
    judged: list[str] = []
    read: list[str] = []
    known, cached = alerter._known, alerter.cached

    def counting_known(key_id: str) -> AlertRules:
        judged.append(key_id)
        return known(key_id)

    def counting_cached(key_id: str) -> Any:
        read.append(key_id)
        return cached(key_id)

    alerter._known = counting_known  # type: ignore[method-assign]
    alerter.cached = counting_cached
    for _, headers in made:
        await rig.send(headers, n=2)
    assert await rig.flush() == []
    assert (judged, read) == ([], [])
    await rig.send(made[0][1], ip="198.51.100.99")
    await rig.send(made[1][1])
    assert await rig.flush() == ["new_ip"]
    assert set(judged) == {made[0][0]} and read == []


# -- delivery: callbacks and the log --------------------------------------------------------


def assert_no_secret(texts: Iterable[str], secrets: Iterable[str]) -> None:
    """No 8-character piece of any secret appears in any of ``texts``."""
    pieces = {s[i : i + 8] for s in secrets for i in range(len(s) - 7)}
    for text in texts:
        leaked = [p for p in pieces if p in text]
        assert not leaked, f"a secret leaked: {text!r}"


async def test_alerts_reach_callbacks_and_the_log(
    rig_for: Callable[..., Rig], caplog: pytest.LogCaptureFixture
) -> None:
    """Every alert reaches sync and async callbacks (one failing callback silences none) and
    the keystile.alerts log with the key id; no log record holds any piece of the secret."""
    caplog.set_level(logging.DEBUG)
    rig = rig_for()
    synced: list[Alert] = []
    awaited: list[Alert] = []

    def failing(alert: Alert) -> None:
        raise RuntimeError("a subscriber failed")

    async def asynchronous(alert: Alert) -> None:
        await asyncio.sleep(0)
        awaited.append(alert)

    rig.gate.alerts.subscribe(failing)
    rig.gate.alerts.subscribe(synced.append)
    assert rig.gate.alerts.subscribe(asynchronous) is asynchronous
    key_id, headers = await rig.key("prod")
    await rig.gate.manager.revoke(key_id)
    assert await rig.send(headers) == [401]
    assert await rig.flush() == ["inactive_key_in_use"]
    assert synced == awaited == rig.alerts
    alert = synced[0]
    assert (alert.key_id, alert.at, alert.details) == (key_id, rig.gate.now(), {"attempts": 1})
    logged = [r for r in caplog.records if r.name == "keystile.alerts"]
    warnings = [r for r in logged if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and key_id in warnings[0].getMessage()
    assert "inactive_key_in_use" in warnings[0].getMessage()
    assert any(r.getMessage() == "alert callback failed" and r.exc_info for r in logged)
    assert_no_secret(
        [r.getMessage() for r in caplog.records] + [repr(vars(r)) for r in caplog.records],
        rig.secrets,
    )


# -- delivery: the webhook ------------------------------------------------------------------


class Receiver:
    """An HTTP server on a loopback port, in a thread, answering each POST with the next
    scripted status (then 200)."""

    def __init__(self, statuses: Iterable[int] = ()) -> None:
        self.statuses = list(statuses)
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self.raw: list[tuple[bytes, dict[str, str]]] = []  # each body and its headers
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append((self.headers["Content-Type"], json.loads(body)))
                receiver.raw.append((body, dict(self.headers.items())))
                self.send_response(receiver.statuses.pop(0) if receiver.statuses else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def receiver_for() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def build(statuses: Iterable[int] = ()) -> Receiver:
        made.append(Receiver(statuses))
        return made[-1]

    yield build
    for receiver in made:
        receiver.close()


async def inactive_alert(url: str, clock: ManualClock, timeout: float = 2.0) -> tuple[Rig, str]:
    """A memory rig posting to ``url`` (``timeout`` per attempt) whose buffer holds one
    inactive-key attempt; the key id."""
    rig = Rig(MemoryStore(), clock, AlertRules(), alert_webhook_url=url)
    assert rig.gate.alerts.webhook is not None
    rig.gate.alerts.webhook.timeout = timeout
    key_id, headers = await rig.key("prod")
    await rig.gate.manager.revoke(key_id)
    assert await rig.send(headers) == [401]
    return rig, key_id


async def test_the_webhook_gets_the_alert_as_json(
    receiver_for: Callable[..., Receiver], clock: ManualClock
) -> None:
    """An alert is POSTed to the webhook as JSON: rule, key id, message, time, details —
    and no piece of the secret."""
    receiver = receiver_for()
    rig, key_id = await inactive_alert(receiver.url, clock)
    assert await rig.flush() == ["inactive_key_in_use"]
    await rig.gate.alerts.drain()
    assert len(receiver.posts) == 1
    content_type, body = receiver.posts[0]
    assert content_type == "application/json"
    assert body == rig.alerts[0].model_dump(mode="json")
    assert (body["rule"], body["key_id"]) == ("inactive_key_in_use", key_id)
    assert_no_secret([json.dumps(body)], rig.secrets)
    await rig.close()


async def test_the_webhook_is_retried_until_it_answers(
    receiver_for: Callable[..., Receiver], clock: ManualClock
) -> None:
    """A webhook answering 500 twice and then 200 gets exactly 3 attempts, all the same JSON."""
    receiver = receiver_for([500, 500])
    rig, _ = await inactive_alert(receiver.url, clock)
    assert await rig.flush() == ["inactive_key_in_use"]
    await asyncio.wait_for(rig.gate.alerts.drain(), 5)
    assert len(receiver.posts) == 3
    assert all(post == receiver.posts[0] for post in receiver.posts)
    await rig.close()
    assert len(receiver.posts) == 3


def silent_listener() -> socket.socket:
    """A loopback socket that accepts connections (the kernel does) but never answers."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


@pytest.mark.parametrize("target", ["dead", "silent"])
async def test_an_unreachable_webhook_does_not_hang(
    target: str,
    clock: ManualClock,
    unused_redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A webhook on a port where nothing listens, or one that never answers, delays neither
    the flush nor the alert's other deliveries; shutdown waits at most timeout × retries
    (plus the backoff), then logs that the webhook failed."""
    timeout = 0.2
    with silent_listener() as silent:
        port = unused_redis_url.rsplit(":", 1)[1].split("/")[0]
        if target == "silent":
            port = str(silent.getsockname()[1])
        rig, _ = await inactive_alert(f"http://127.0.0.1:{port}/alerts", clock, timeout)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await rig.flush() == ["inactive_key_in_use"]
        assert loop.time() - started < 0.5
        assert rig.gate.alerts.webhook is not None
        retries = rig.gate.alerts.webhook.retries
        await asyncio.wait_for(rig.gate.shutdown(), timeout * retries + 0.6 + 1.5)
    assert "not delivered" in caplog.text
    assert rig.gate.alerts.webhook is not None and rig.gate.alerts.webhook.dead_letters == 1
    assert len(rig.alerts) == 1


# -- across processes -----------------------------------------------------------------------


@pytest.mark.redis
async def test_processes_sharing_redis_alert_once(redis_namespace: str) -> None:
    """Two app processes that both see a revoked key in use deliver the alert once between
    them: the claim in Redis lets one through per cool-down."""
    store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace)
    gate = Keystile(store=store, secret=SECRET, settings=KeystileSettings(usage_flush_interval=60))
    created = await gate.manager.create({"name": "old", "type": "prod"})
    await gate.manager.revoke(created.key.id)
    env = {**os.environ, "KS_ALERT_TOKEN": created.secret.get_secret_value()}
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            REDIS_URL,
            redis_namespace,
            SECRET,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(2)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), 30)
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err.decode()
    answers = [json.loads(out) for out, _ in outputs]
    assert [a["status"] for a in answers] == [401, 401]
    assert sorted(rule for a in answers for rule in a["fired"]) == ["inactive_key_in_use"]
    report = await gate.usage.report(created.key.id)
    assert report.all_time.inactive_attempts == 2
    await gate.aclose()


async def test_item4_an_uncached_key_is_read_once_an_hour_on_the_alerters_clock() -> None:
    """The rotation rule reads a key missing from the cache from the store at most once an
    hour, timed by the monotonic clock the Alerter was given."""
    clock = ManualClock(1_800_000_000.0)
    now = [0.0]
    reads: list[str] = []

    async def lookup(key_id: str) -> ApiKey | None:
        reads.append(key_id)
        return None

    alerter = Alerter(
        AlertRules(),
        MemoryAlertState(clock=clock),
        lambda key_id: None,  # nothing cached
        lookup,
        DEFAULT_POLICY,
        clock=clock,
        monotonic=lambda: now[0],
    )
    usage = UsageRecorder(MemoryUsageStore(clock=clock), clock=clock)
    usage.on_flush.append(alerter.on_flush)

    async def used_and_flushed() -> list[str]:
        usage.record("key_rotating", 200, 0, 0)
        assert await usage.flush()
        return reads

    try:
        assert await used_and_flushed() == ["key_rotating"]
        now[0] += 3600 - 2**-10
        assert await used_and_flushed() == ["key_rotating"]
        now[0] += 2**-10
        assert await used_and_flushed() == ["key_rotating"] * 2
    finally:
        await usage.close()
        await alerter.drain()
