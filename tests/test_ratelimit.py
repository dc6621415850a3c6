"""Rate limits (docs/headers.md, docs/failure-modes.md): exact moving windows, decided as
``limits`` decides them, in one Redis round trip, with the IETF headers, failing as configured."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import fakeredis
import http_sfv
import httpx
import limits
import limits.storage.memory
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st
from limits.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

import conftest
from conftest import (
    REDIS_URL,
    SECRET,
    Figures,
    budget,
    cleanup_namespace,
    fake_redis,
    new_namespace,
    require_redis,
)
from faults.redis_server import RedisServer
from keystile import KeystileSettings, ManualClock, MemoryStore, RedisStore
from keystile.demo import DEMO_ORIGINS, build_demo_app, seed_demo_keys
from keystile.gate import Keystile
from keystile.models import DEFAULT_TYPE_POLICIES, KeyPolicy, KeyType
from keystile.network import budget_address, parse_address
from keystile.ratelimit import (
    MAX_COST,
    MAX_WINDOW,
    Decision,
    MemoryLimiter,
    RedisLimiter,
    limit_set,
    normalize_rate_limit,
    parse_rate_limit,
)
from keystile.redis.connect import close_redis, open_redis
from keystile.redis.lean import LeanRedis
from keystile.stores import KeyStore
from test_middleware import assert_refused, bearer, call, client, make_app

WORKER = Path(__file__).with_name("ratelimit_worker.py")
START = 1_800_000_000.0  # virtual clocks start here: exact in a double, on the 1/8 s grid
TICK = 2.0**-10  # off the 1/8 s grid: "a moment earlier" without crossing a grid point
ORIGIN = "https://app.example.com"


# -- helpers -----------------------------------------------------------------------------------


def parse_list(value: str) -> list[tuple[str, dict[str, Any]]]:
    """A structured-field List header as (item value, params) pairs."""
    parsed = http_sfv.List()
    parsed.parse(value.encode())
    return [(item.value, dict(item.params)) for item in parsed]


def parse_int(value: str) -> int:
    """A structured-field Integer header (Retry-After is delta-seconds, a bare integer)."""
    item = http_sfv.Item()
    item.parse(value.encode())
    assert isinstance(item.value, int) and not isinstance(item.value, bool)
    return item.value


async def new_client_key(gate: Keystile, **fields: Any) -> str:
    """Issue a client key (100/minute by default); its secret."""
    created = await gate.manager.create(
        {
            "name": "browser",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": [ORIGIN],
            **fields,
        }
    )
    return created.secret.get_secret_value()


# For tests of the key's own window sent from one address: its share is the whole window.
ONE_ADDRESS = {"address_rate_limit": "100/minute"}


async def new_key(gate: Keystile, key_type: str = "dev", **fields: Any) -> str:
    """Issue a dev (or prod) key; its secret."""
    created = await gate.manager.create(
        {"name": "server", "type": key_type, "scopes": ["vec:read"], **fields}
    )
    return created.secret.get_secret_value()


async def warm(gate: Keystile, secret: str) -> None:
    """Cache the key's record, so requests with it need the store no more."""
    assert await gate.store.lookup(gate.hasher.digest(secret)) is not None


def statuses(responses: list[httpx.Response]) -> dict[int, int]:
    """How many responses had each status."""
    return dict(Counter(response.status_code for response in responses))


# Usage is flushed to Redis in the background every second; tests that count Redis
# commands flush it only when the gate closes. They count commands, not time: on a loaded
# two-core machine the limiter may wait 2 s rather than pass requests undecided.
QUIET = KeystileSettings(usage_flush_interval=3600.0, rate_limit_timeout=2.0)


# A redis-server of the test's own (it may be flushed, slowed down and killed without
# touching the shared server), with DEBUG allowed from loopback.
OwnRedis = RedisServer


# What the limiter's script runs inside Redis: INFO commandstats counts these too, but they
# cost no round trip. Nothing in keystile sends them itself.
SCRIPT_COMMANDS = frozenset({"time", "lindex", "llen", "lpush", "lset", "ltrim", "pexpire"})


def sent(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """The commands clients sent between two readings, less the INFO readings themselves,
    the commands run by scripts, and a new connection's handshake (a pipeline may open one
    beside a request that went straight to Redis)."""
    changed = {name: after[name] - before.get(name, 0) for name in after}
    ignored = SCRIPT_COMMANDS | {"info", "hello", "client|setinfo", "client|setname"}
    return {name: count for name, count in changed.items() if count and name not in ignored}


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    server = OwnRedis(debug=True)
    server.start()
    yield server
    server.close()


@pytest.fixture
async def own_gate(own_redis: OwnRedis) -> AsyncIterator[Keystile]:
    """A started gate on the test's own redis-server (script loaded, announcements on)."""
    store = RedisStore.from_url(own_redis.url, namespace=new_namespace(), heartbeat=60.0)
    gate = Keystile(store=store, secret=SECRET, settings=QUIET)
    await gate.startup()
    yield gate
    await gate.aclose()


def redis_limiter(gate: Keystile) -> RedisLimiter:
    assert isinstance(gate.limiter, RedisLimiter)
    return gate.limiter


@pytest.fixture(params=["fakeredis", "redis"])
async def redis_client(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Redis, str]]:
    """A Redis client (fakeredis, then the real server) and a namespace cleaned up after."""
    namespace = new_namespace()
    if request.param == "redis":
        require_redis()
        made: Redis = Redis.from_url(REDIS_URL)
    else:
        made = fake_redis()
    yield made, namespace
    await made.aclose()
    if request.param == "redis":
        cleanup_namespace(namespace)


@pytest.fixture
async def shared_gate(redis_namespace: str) -> AsyncIterator[Keystile]:
    """A gate on the shared real Redis. The limiter may wait 10 s (and key lookups 10 s,
    both scaled by KEYSTILE_TEST_TIME_SCALE): on a loaded two-core machine one round trip
    carrying 7,500 decisions took more than 2 s, and a timeout must not decide an
    exactness test."""
    gate = Keystile(
        store=RedisStore.from_url(REDIS_URL, namespace=redis_namespace, timeout=budget(10.0)),
        secret=SECRET,
        settings=KeystileSettings(rate_limit_timeout=budget(10.0)),
        lookup_timeout=budget(10.0),
    )
    await gate.startup()
    yield gate
    await gate.aclose()


@pytest.fixture
async def local(clock: ManualClock) -> AsyncIterator[Keystile]:
    """A gate on the in-memory store, on the test's ManualClock."""
    made = Keystile(store=MemoryStore(), secret=SECRET, clock=clock)
    yield made
    await made.aclose()


@pytest.fixture
async def gate_on(store: KeyStore, clock: ManualClock) -> AsyncIterator[Keystile]:
    """A gate on each backend: memory (with a ManualClock), fakeredis, real Redis (with a
    limiter timeout no busy test machine reaches: these tests are not about timeouts)."""
    settings = KeystileSettings(rate_limit_timeout=2.0)
    made = Keystile(store=store, secret=SECRET, clock=clock, settings=settings)
    await made.startup()
    yield made
    await made.shutdown()  # the store fixture closes the store


# -- parsing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "windows"),
    [
        pytest.param("100/minute", "100/minute", [(100, 60)], id="client-default"),
        pytest.param(
            "10/second;1000/hour", "10/second;1000/hour", [(10, 1), (1000, 3600)], id="two"
        ),
        pytest.param("10 per second", "10/second", [(10, 1)], id="per"),
        pytest.param("3/2 seconds", "3/2 seconds", [(3, 2)], id="multiples"),
        pytest.param("5/2 days", "5/2 days", [(5, 172_800)], id="days"),
        pytest.param("1/year", "1/year", [(1, 31_104_000)], id="year"),
        pytest.param("10/second, 5/minute", "10/second;5/minute", [(10, 1), (5, 60)], id="comma"),
        pytest.param("  10 / SECOND  ", "10/second", [(10, 1)], id="spaces-and-case"),
    ],
)
def test_limits_are_written_as_limits_writes_them(
    text: str, canonical: str, windows: list[tuple[int, int]]
) -> None:
    """A limit string parses to its windows (amount, seconds) and has one canonical
    spelling, which parses to the same windows."""
    assert [(i.amount, i.get_expiry()) for i in parse_rate_limit(text)] == windows
    assert normalize_rate_limit(text) == canonical
    assert normalize_rate_limit(canonical) == canonical
    assert [(w.amount, w.seconds) for w in limit_set(canonical, "dev").windows] == windows


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("   ", id="blank"),
        pytest.param("lots", id="word"),
        pytest.param("0/minute", id="zero"),
        pytest.param("-1/second", id="negative"),
        pytest.param("1.5/second", id="fraction"),
        pytest.param("1e3/second", id="exponent"),
        pytest.param("ten/second", id="spelled-number"),
        pytest.param("10/fortnight", id="unknown-unit"),
        pytest.param("10/secondx", id="unit-suffix"),
        pytest.param("1/-1 second", id="negative-multiple"),
        pytest.param("1/0 second", id="zero-multiple"),
        pytest.param("10/second;5 per 00 minutes", id="zero-multiple-per"),
        pytest.param("1per0second", id="zero-multiple-per-unspaced"),
        pytest.param("100/minute;", id="trailing-separator"),
        pytest.param("10/second 20/minute", id="no-separator"),
        pytest.param("\uff11\uff10/second", id="fullwidth-digits"),
        pytest.param("1/second;" * 40 + "1/second", id="over-256-chars"),
    ],
)
def test_garbage_limits_are_refused(text: str) -> None:
    """Anything that is not a limit string is a ValueError naming the problem."""
    with pytest.raises(ValueError, match=r"not a rate limit|at least one request"):
        parse_rate_limit(text)


def test_non_strings_are_refused() -> None:
    """A limit that is not a string is a ValueError, not a TypeError from deep inside."""
    with pytest.raises(ValueError, match="not a rate limit"):
        parse_rate_limit(100)  # type: ignore[arg-type]


@given(
    windows=st.lists(
        st.tuples(
            st.integers(1, 10**6),
            st.integers(1, 1000),
            st.sampled_from(["second", "minute", "hour", "day"]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_canonical_spelling_round_trips(windows: list[tuple[int, int, str]]) -> None:
    """Any limit's canonical spelling is a fixed point and keeps every window."""
    unit_seconds = {"second": 1, "minute": 60, "hour": 3600, "day": 86_400}
    assume(all(m * unit_seconds[u] <= MAX_WINDOW for _, m, u in windows))
    text = ";".join(f"{amount} per {multiples} {unit}s" for amount, multiples, unit in windows)
    canonical = normalize_rate_limit(text)
    assert normalize_rate_limit(canonical) == canonical
    assert [(i.amount, i.get_expiry()) for i in parse_rate_limit(canonical)] == [
        (i.amount, i.get_expiry()) for i in parse_rate_limit(text)
    ]


@pytest.mark.parametrize(
    ("key_type", "fields", "names"),
    [
        pytest.param(
            "client", {"allowed_origins": [ORIGIN]}, ["client", "client-ip"], id="client"
        ),
        pytest.param("prod", {"rate_limit": "5/second"}, ["prod"], id="prod-override"),
        pytest.param(
            "dev", {"rate_limit": "2/second;3/minute"}, ["dev", "dev-2"], id="dev-two-windows"
        ),
    ],
)
async def test_policy_names_never_carry_key_material(
    local: Keystile, key_type: str, fields: dict[str, Any], names: list[str]
) -> None:
    """Rate-limit policies are named after the key type; no header carries the secret, the
    key's id, hint or name, or any 8-character piece of the secret."""
    gate = local
    created = await gate.manager.create(
        {"name": "acme-billing-7", "type": key_type, "scopes": ["vec:read"], **fields}
    )
    secret = created.secret.get_secret_value()
    app, _ = make_app(gate)
    async with client(app) as http:
        admitted = await http.get("/x", headers=bearer(secret))
    assert admitted.status_code == 200
    assert [name for name, _ in parse_list(admitted.headers["ratelimit-policy"])] == names
    assert [name for name, _ in parse_list(admitted.headers["ratelimit"])] == names
    pieces = {secret[i : i + 8] for i in range(len(secret) - 7)}
    for value in admitted.headers.values():
        for forbidden in (created.key.id, created.key.hint, created.key.name, *pieces):
            assert forbidden not in value


# -- the same decisions as limits' own MovingWindowRateLimiter ---------------------------------


LIMITS = (
    "5/second",
    "3/2 seconds",
    "10/minute",
    "5/second;3/2 seconds;10/minute",
    "2/second;3/minute",
)
STEPS = (0.0, 0.0, 0.0, 0.125, 0.125, 0.25, 0.375, 0.5, 0.875, 1.0, 2.0)


def schedule(seed: int, length: int) -> list[tuple[float, int, int]]:
    """(time, index into LIMITS, cost) on the 1/8 s grid. Now and then time jumps to exactly
    one window after an earlier request, so that exact-boundary ties are common."""
    rng = random.Random(seed)
    now = START
    events: list[tuple[float, int, int]] = []
    for _ in range(length):
        now += rng.choice(STEPS)
        if events and rng.random() < 0.15:
            earlier = rng.choice(events)[0] + rng.choice((1, 2, 60))
            now = max(now, earlier)
        events.append((now, rng.randrange(len(LIMITS)), rng.randint(1, 3)))
    return events


@dataclass(frozen=True)
class Expected:
    allowed: bool
    remaining: tuple[int, ...]
    reset: tuple[int, ...]
    retry_after: int
    ties: int  # windows where limits' get_window_stats disagrees with its own hit


class Oracle:
    """``limits``' MovingWindowRateLimiter over its synchronous MemoryStorage, on a fake
    clock. A limit of several windows admits when every one would (keystile's contract)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = START
        monkeypatch.setattr(limits.storage.memory, "time", SimpleNamespace(time=self._time))
        self.storage = limits.storage.MemoryStorage()
        self.storage.timer.cancel()
        self.storage.timer.join()
        # Its purge thread drops entries exactly `window` old that its own acquire_entry
        # still counts: left running, decisions on exact boundaries depend on its timing.
        self.storage._MemoryStorage__schedule_expiry = lambda: None  # type: ignore[attr-defined]
        self.strategy = MovingWindowRateLimiter(self.storage)

    def _time(self) -> float:
        return self.now

    def hit(self, text: str, key: str, cost: int, now: float) -> Expected:
        items = limits.parse_many(text)
        # limits' test() and get_window_stats() count entries strictly newer than
        # now - window, while hit() refuses on an entry exactly that old. A tick earlier
        # (off the grid) their count is the one hit() decides with.
        self.now = now - TICK
        fits = all(self.strategy.test(item, key, cost=cost) for item in items)
        self.now = now
        if len(items) == 1:
            assert self.strategy.hit(items[0], key, cost=cost) == fits
        elif fits:
            for item in items:
                assert self.strategy.hit(item, key, cost=cost)
        self.now = now - TICK
        stats = [self.strategy.get_window_stats(item, key) for item in items]
        self.now = now
        strict = [self.strategy.get_window_stats(item, key) for item in items]
        reset = []
        for item, window in zip(items, stats, strict=True):
            inside = item.amount - window.remaining
            reset.append(math.ceil(window.reset_time - now) if inside else item.get_expiry())
        wait = 0.0
        for item in items:
            events = self.storage.events.get(item.key_for(key), [])
            index = item.amount - cost
            if index < 0:
                wait = max(wait, float(item.get_expiry()))
            elif index < len(events) and events[index].atime >= now - item.get_expiry():
                wait = max(wait, events[index].atime + item.get_expiry() - now)
        return Expected(
            allowed=fits,
            remaining=tuple(window.remaining for window in stats),
            reset=tuple(reset),
            retry_after=0 if fits else math.floor(wait) + 1,
            ties=sum(a.remaining != b.remaining for a, b in zip(stats, strict, strict=True)),
        )


class Driver:
    """A keystile limiter on a virtual clock: MemoryLimiter with a ManualClock, or
    RedisLimiter.hit_at with the time in milliseconds (local refusals off)."""

    def __init__(self, kind: str, limiter: MemoryLimiter | RedisLimiter, clock: ManualClock):
        self.kind = kind
        self.limiter = limiter
        self.clock = clock

    async def hit(self, text: str, key: str, cost: int, now: float) -> Decision:
        limits_ = limit_set(text, "dev")
        if isinstance(self.limiter, MemoryLimiter):
            self.clock.now = now
            return self.limiter.hit_now(key, limits_, cost)
        return await self.limiter.hit_at(key, limits_, cost, round(now * 1000))


@asynccontextmanager
async def own_limiter(made: Redis, **options: Any) -> AsyncIterator[RedisLimiter]:
    """A RedisLimiter closed afterwards (its lean connection with it)."""
    limiter = RedisLimiter(made, **options)
    try:
        yield limiter
    finally:
        await limiter.close()


@asynccontextmanager
async def virtual_limiter(kind: str) -> AsyncIterator[Driver]:
    """A keystile limiter of one backend on a virtual clock (Redis data cleaned up)."""
    clock = ManualClock(START)
    if kind == "memory":
        yield Driver(kind, MemoryLimiter(clock=clock), clock)
        return
    namespace = new_namespace()
    if kind == "redis":
        require_redis()
    made: Any = (
        Redis.from_url(REDIS_URL)
        if kind == "redis"
        else open_redis(conftest._cluster.url)
        if kind == "cluster"
        else open_redis(conftest._sentinel.store_url)
        if kind == "sentinel"
        else fake_redis()
    )
    try:
        async with own_limiter(made, namespace=namespace, local_refusals=False) as limiter:
            await limiter.start()
            yield Driver(kind, limiter, clock)
    finally:
        await close_redis(made)  # a sentinel's connections too
        if kind == "redis":
            cleanup_namespace(namespace)
        if kind == "cluster":
            conftest._cluster.cleanup(namespace)
        if kind == "sentinel":
            conftest._sentinel.cleanup(namespace)


@pytest.fixture
async def driver(backend: tuple[str, str]) -> AsyncIterator[Driver]:
    """A keystile limiter of each backend on a virtual clock."""
    async with virtual_limiter(backend[0]) as made:
        yield made


SEEDS = {"memory": 40, "fakeredis": 12, "redis": 40, "cluster": 12, "sentinel": 12}
EVENTS_PER_SCHEDULE = 250


async def compared(
    driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[str, Expected, Decision]]:
    """Every request of the random schedules: where it is, what limits says, what keystile
    decided (both on the same virtual clock)."""
    for seed in range(SEEDS[driver.kind]):
        oracle = Oracle(monkeypatch)
        for step, (now, which, cost) in enumerate(schedule(seed, EVENTS_PER_SCHEDULE)):
            text, key = LIMITS[which], f"s{seed}-k{which}"
            expected = oracle.hit(text, key, cost, now)
            got = await driver.hit(text, key, cost, now)
            where = f"seed {seed}, step {step}: {cost} x {text!r} at +{now - START}s"
            assert got.at == now and not got.degraded, where
            yield where, expected, got


async def test_decisions_match_limits_moving_window(
    driver: Driver, monkeypatch: pytest.MonkeyPatch, figures: Figures
) -> None:
    """Over random schedules on the 1/8 s grid (costs 1-3, exact-boundary ties included),
    every decision, remaining count and reset equals what limits' own
    MovingWindowRateLimiter says (all windows must admit; a refusal consumes nothing)."""
    decisions = admitted = ties = 0
    async for where, expected, got in compared(driver, monkeypatch):
        assert got.allowed == expected.allowed, where
        assert got.remaining == expected.remaining, where
        assert got.reset == expected.reset, where
        decisions += 1
        admitted += got.allowed
        ties += expected.ties
    # The schedules must exercise both answers and the exact boundary.
    assert admitted > decisions // 5 and decisions - admitted > decisions // 5
    assert ties > 20
    figures.add(
        f"differential vs limits' MovingWindowRateLimiter ({driver.kind}): {decisions} "
        f"decisions over {SEEDS[driver.kind]} schedules all equal ({admitted} admitted); "
        f"{ties} exact-boundary moments where limits' get_window_stats disagrees with its "
        "own hit (keystile agrees with hit)"
    )


KINDS_RETRY = [
    "memory",
    pytest.param("fakeredis"),
    pytest.param("redis"),
]


@pytest.fixture
async def kind_driver(request: pytest.FixtureRequest) -> AsyncIterator[Driver]:
    async with virtual_limiter(request.param) as made:
        yield made


@pytest.mark.parametrize("kind_driver", KINDS_RETRY, indirect=True)
async def test_retry_after_matches_limits(
    kind_driver: Driver, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the same random schedules, every refusal's Retry-After is the first whole
    second after the refusing entries leave their windows, as limits' state says."""
    async for where, expected, got in compared(kind_driver, monkeypatch):
        assert got.retry_after == expected.retry_after, where


@pytest.mark.parametrize("kind_driver", KINDS_RETRY, indirect=True)
async def test_waiting_retry_after_is_enough(kind_driver: Driver) -> None:
    """A key refused under 1/second in the millisecond of its admission is admitted
    again when the client waits exactly Retry-After seconds."""
    assert (await kind_driver.hit("1/second", "k", 1, START)).allowed
    refused = await kind_driver.hit("1/second", "k", 1, START)
    assert not refused.allowed
    assert (await kind_driver.hit("1/second", "k", 1, START + refused.retry_after)).allowed


# -- refusals consume nothing; every window must admit -----------------------------------------


async def test_refused_requests_do_not_consume_the_window(driver: Driver) -> None:
    """After 3 admissions under 3/second, a hundred refused requests change nothing: the
    window frees exactly one second after the admissions, as if they had not been made."""
    text = "3/second"
    for _ in range(3):
        assert (await driver.hit(text, "k", 1, START)).allowed
    for offset in (0.0, 0.125, 0.5, 0.875, 1.0):
        for _ in range(20):
            refused = await driver.hit(text, "k", 1, START + offset)
            assert not refused.allowed and refused.remaining == (0,)
    # At exactly +1 s the admissions are still inside; just after, all three slots are back.
    again = [await driver.hit(text, "k", 1, START + 1.125) for _ in range(4)]
    assert [d.allowed for d in again] == [True, True, True, False]
    assert [d.remaining for d in again] == [(2,), (1,), (0,), (0,)]


async def test_every_window_must_admit_and_a_refusal_consumes_in_none(driver: Driver) -> None:
    """Under 2/second;3/minute a request is admitted only when both windows admit, and a
    refusal by either window leaves the other untouched."""
    text = "2/second;3/minute"

    async def hit(offset: float) -> Decision:
        return await driver.hit(text, "k", 1, START + offset)

    assert [(d.allowed, d.remaining) for d in [await hit(0), await hit(0)]] == [
        (True, (1, 2)),
        (True, (0, 1)),
    ]
    for _ in range(5):  # refused by the second window: the minute keeps its last slot
        refused = await hit(0.5)
        assert not refused.allowed and refused.remaining == (0, 1)
    assert (await hit(1.125)).allowed  # the minute's last slot
    for _ in range(5):  # refused by the minute: the second window stays empty
        refused = await hit(59.5)
        assert not refused.allowed and refused.remaining == (2, 0)
        assert refused.retry_after == 1  # the minute frees its first slots at +60 s
    # At +60.125 the two admissions of +0 left the minute. Had the refusals at +59.5
    # consumed the second window, it would refuse now.
    admitted = await hit(60.125)
    assert admitted.allowed and admitted.remaining == (1, 1)


async def test_a_cost_above_a_window_is_refused_in_all(driver: Driver) -> None:
    """A request costing more than a window's amount is refused and consumes nothing."""
    refused = await driver.hit("2/second;3/minute", "k", 3, START)
    assert not refused.allowed and refused.remaining == (2, 3)
    assert (await driver.hit("2/second;3/minute", "k", 2, START)).remaining == (0, 1)


# -- item 13: large costs are decided, up to MAX_COST ------------------------------------------


async def fill(driver: Driver, text: str, units: int, now: float) -> None:
    """Admit ``units`` at ``now``, in hits of at most MAX_COST."""
    while units:
        step = min(units, MAX_COST)
        got = await driver.hit(text, "k", step, now)
        assert got.allowed and not got.degraded
        units -= step


@pytest.mark.parametrize("cost", [1, 7_999, 8_000, MAX_COST])
async def test_item13_large_costs_are_decided_exactly_at_a_limit_of_50000(
    driver: Driver, cost: int
) -> None:
    """Under 50000/minute, a request of ``cost`` (past 8,000 a single Lua unpack() fails on
    a real redis-server) one unit short of room is refused, consuming nothing; once the
    oldest entry leaves, it is admitted to exactly the limit — never an error, never
    admitted undecided."""
    text = "50000/minute"
    await fill(driver, text, 1, START)
    await fill(driver, text, 50_000 - cost, START + 1)
    refused = await driver.hit(text, "k", cost, START + 1)
    assert not refused.allowed and not refused.degraded
    assert (refused.remaining, refused.retry_after) == ((cost - 1,), 60)
    admitted = await driver.hit(text, "k", cost, START + 60.125)
    assert admitted.allowed and not admitted.degraded and admitted.remaining == (0,)
    assert not (await driver.hit(text, "k", 1, START + 60.125)).allowed
    if isinstance(driver.limiter, RedisLimiter):
        name = driver.limiter.window_key("k", limit_set(text, "dev"), 0)
        assert await driver.limiter.client.llen(name) == 50_000


@pytest.mark.parametrize("cost", [0, -1, MAX_COST + 1, 10**9, 1.5, True])
async def test_item13_a_cost_outside_1_to_max_cost_is_a_clear_error(
    driver: Driver, cost: Any
) -> None:
    """Past MAX_COST (20,000), or below 1, or not a whole number, a cost is a ValueError
    naming the bounds — not a failure of Redis — and consumes nothing."""
    with pytest.raises(ValueError, match="from 1 to 20,000"):
        await driver.hit("50000/minute", "k", cost, START)
    assert (await driver.hit("50000/minute", "k", 1, START)).remaining == (49_999,)


# -- item 12: the in-memory limiter's work and memory ------------------------------------------


class CountedList(list[Any]):
    """A list that counts the entries read from it (``bisect`` reads a list subclass
    through ``__getitem__`` too)."""

    reads = 0

    def __getitem__(self, index: Any) -> Any:
        CountedList.reads += 1
        return super().__getitem__(index)


def window_log(limiter: MemoryLimiter, key: str, index: int = 0) -> Any:
    """The in-memory log of one window of ``key``."""
    return limiter._events[(key, "", index)]


@pytest.mark.parametrize("held", [2**8, 2**14])
async def test_item12_a_decision_reads_log_n_entries_at_ten_million_a_day(
    clock: ManualClock, held: int
) -> None:
    """With ``held`` admissions in a 10,000,000/day window (each at its own time), one more
    decision reads about 2·log2(held) entries of the log — not one per admission held or
    per unit of the limit (the old list was shifted whole on every admission)."""
    limiter = MemoryLimiter(clock=clock)
    per_day = limit_set("10000000/day", "dev")
    for _ in range(held):
        clock.advance(0.001)
        assert limiter.hit_now("k", per_day).allowed
    log = window_log(limiter, "k")
    log.stamps, log.ends = CountedList(log.stamps), CountedList(log.ends)
    CountedList.reads = 0
    clock.advance(0.001)
    decision = limiter.hit_now("k", per_day)
    assert decision.allowed and decision.remaining == (10_000_000 - held - 1,)
    assert CountedList.reads <= 2 * (math.log2(held) + 1) + 4


@pytest.mark.parametrize("cost", [1, 1_000, MAX_COST])
async def test_item12_memory_follows_admissions_not_the_limit_or_the_cost(
    clock: ManualClock, cost: int
) -> None:
    """Five admissions of any cost under 10,000,000/day hold five runs (one per distinct
    time), not one entry per unit; once the day has passed, the next decision forgets
    them all."""
    limiter = MemoryLimiter(clock=clock)
    per_day = limit_set("10000000/day", "dev")
    for n in range(5):
        clock.advance(1.0)
        decision = limiter.hit_now("k", per_day, cost)
        assert decision.allowed and decision.remaining == (10_000_000 - (n + 1) * cost,)
    log = window_log(limiter, "k")
    assert (log.runs, len(log)) == (5, 5 * cost)
    clock.advance(86_400.5)  # the newest was admitted 86,400.5 s ago: out of the window
    assert limiter.hit_now("k", per_day).remaining == (9_999_999,)
    assert (log.runs, len(log)) == (1, 1)


def plain_log_decides(
    log: list[float], amount: int, seconds: int, cost: int, now: float
) -> tuple[bool, int]:
    """The moving window as limits writes it, over a plain newest-first list (the old
    MemoryLimiter): admitted?, entries inside the window afterwards."""
    index = amount - cost
    allowed = cost <= amount and not (index < len(log) and log[index] >= now - seconds)
    if allowed:
        log[:0] = [now] * cost
        del log[amount:]
    return allowed, sum(1 for t in log if t >= now - seconds)


@pytest.mark.parametrize("seed", range(6))
async def test_item12_runs_decide_as_a_plain_log_with_large_costs(seed: int) -> None:
    """Random costs of up to 40 against limits of up to 100 (runs split by the trim, merged
    at equal times): every decision and remaining count equals the plain list's."""
    rng = random.Random(seed)
    amount, seconds = rng.randint(1, 100), rng.choice((1, 2, 5))
    clock = ManualClock(START)
    limiter, plain = MemoryLimiter(clock=clock), []
    window = limit_set(f"{amount}/{seconds} seconds", "dev")
    for step in range(600):
        clock.advance(rng.choice((0.0, 0.0, 0.125, 0.25, 1.0)))
        cost = rng.randint(1, 40)
        allowed, inside = plain_log_decides(plain, amount, seconds, cost, clock.now)
        got = limiter.hit_now("k", window, cost)
        assert (got.allowed, got.remaining) == (allowed, (amount - inside,)), step


# -- exactness against the real server ---------------------------------------------------------


ROUNDS = 20
PROCESSES = 4
PER_PROCESS = 250


async def answer(worker: asyncio.subprocess.Process) -> str:
    """The worker's next line; it must come within 30 s."""
    assert worker.stdout is not None
    line = await asyncio.wait_for(worker.stdout.readline(), 30.0)
    return line.decode().strip()


@pytest.mark.slow
@pytest.mark.redis
async def test_four_processes_admit_exactly_the_limit_together(
    shared_gate: Keystile, redis_namespace: str, figures: Figures
) -> None:
    """Four app processes, each firing 250 simultaneous requests with the same fresh client
    key through the full middleware, admit exactly 100 between them — 20 rounds running."""
    await four_processes(shared_gate, REDIS_URL, redis_namespace, figures)


async def four_processes(gate: Keystile, url: str, namespace: str, figures: Figures) -> None:
    """The 20 rounds of :func:`test_four_processes_admit_exactly_the_limit_together`, by
    worker processes on ``url`` (a Redis Cluster's too) and keys that ``gate`` makes."""
    shared_gate, where = gate, "" if url == REDIS_URL else f" ({url.partition(':')[0]})"
    command = [str(WORKER), url, namespace, SECRET, str(PER_PROCESS)]
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable, *command, stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        for _ in range(PROCESSES)
    ]
    shared = 0  # rounds in which more than one process got admissions
    started = time.perf_counter()
    try:
        for worker in workers:
            assert await answer(worker) == "ready"
        for round_ in range(ROUNDS):
            secret = await new_client_key(shared_gate, **ONE_ADDRESS)
            for worker in workers:  # every worker gets its line before any answer is read
                assert worker.stdin is not None
                worker.stdin.write(f"go {secret}\n".encode())
            for worker in workers:
                assert worker.stdin is not None
                await worker.stdin.drain()
            answers = [[int(n) for n in (await answer(worker)).split()] for worker in workers]
            admitted = [a[0] for a in answers]
            assert [a[2] for a in answers] == [0] * PROCESSES, f"round {round_}: {answers}"
            assert [a[3] for a in answers] == [0] * PROCESSES, f"round {round_}: passes"
            assert sum(admitted) == 100, f"round {round_}: admitted {admitted}"
            assert sum(a[1] for a in answers) == PROCESSES * PER_PROCESS - 100
            shared += sum(1 for n in admitted if n) > 1
    finally:
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.close()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.wait(), 10.0)
            except TimeoutError:
                worker.kill()
                await worker.wait()
    elapsed = time.perf_counter() - started
    figures.add(
        f"{PROCESSES} processes x {PER_PROCESS} concurrent requests, {ROUNDS} rounds{where} "
        f"({elapsed:.1f} s): admitted exactly 100 each round; admissions split across "
        f"processes in {shared}/{ROUNDS} rounds"
    )


@pytest.mark.slow
@pytest.mark.redis
async def test_one_gather_of_500_admits_exactly_100(
    shared_gate: Keystile, figures: Figures
) -> None:
    """500 simultaneous requests with one client key: exactly 100 are admitted (at most
    100 is the contract), the rest are 429."""
    secret = await new_client_key(shared_gate, **ONE_ADDRESS)
    limiter = redis_limiter(shared_gate)
    trips = limiter.round_trips
    app, seen = make_app(shared_gate)
    async with client(app) as http:
        responses = await asyncio.gather(
            *(http.get("/x", headers=bearer(secret)) for _ in range(500))
        )
    assert limiter.passes == 0
    assert statuses(responses) == {200: 100, 429: 400}
    assert len(seen) == 100
    figures.add(
        f"one gather of 500 requests, one client key: 100 admitted, 400 refused, "
        f"{limiter.round_trips - trips} limiter round trips"
    )


@pytest.mark.slow
@pytest.mark.redis
async def test_no_second_of_a_long_random_run_admits_more_than_20(
    redis_namespace: str, figures: Figures
) -> None:
    """Over ~3 s of random bursts from 6 tasks under 20/second (local refusals on), no
    span of one second holds more than 20 admissions by Redis' own clock, and every
    refusal Redis made had 20 admissions in the second before it."""
    made: Redis = Redis.from_url(REDIS_URL)
    limiter = RedisLimiter(made, namespace=redis_namespace, timeout=2.0)
    await limiter.start()
    limits_ = limit_set("20/second", "dev")
    decisions: list[Decision] = []
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3.0

    async def burster(seed: int) -> None:
        rng = random.Random(seed)
        while loop.time() < deadline:
            burst = rng.randint(1, 4)
            decisions.extend(
                await asyncio.gather(*(limiter.hit("k", limits_) for _ in range(burst)))
            )
            # ~120 requests a second from 6 tasks: the 20 admissions of a second spread out,
            # so slots free one by one rather than all at once.
            await asyncio.sleep(rng.uniform(0.0, 0.25))

    try:
        await asyncio.gather(*(burster(seed) for seed in range(6)))
    finally:
        await limiter.close()
        await made.aclose()
    assert limiter.passes == 0
    admitted = sorted(round(d.at * 1000) for d in decisions if d.allowed)
    by_redis = [round(d.at * 1000) for d in decisions if not d.allowed and d.at]
    local = sum(1 for d in decisions if not d.allowed and not d.at)
    # The independent check: any 21 admissions in a row span more than 1000 ms.
    tightest = min(later - first for first, later in zip(admitted, admitted[20:], strict=False))
    assert tightest > 1000, f"21 admissions within {tightest} ms"
    for refused in by_redis:
        inside = sum(1 for a in admitted if refused - 1000 <= a <= refused)
        assert inside >= 20, f"refused at {refused} with only {inside} admissions inside"
    span = (admitted[-1] - admitted[0]) / 1000
    assert len(admitted) >= 20 * math.floor(span)  # the limiter does not starve the key
    figures.add(
        f"20/second, {span:.1f} s of random bursts from 6 tasks: {len(decisions)} decisions, "
        f"{len(admitted)} admitted, {len(by_redis)} refused by Redis, {local} locally; "
        f"any 21 consecutive admissions span >= {tightest} ms (limit: > 1000)"
    )


@pytest.mark.slow
@pytest.mark.redis
async def test_fifty_keys_at_once_each_admit_exactly_100(
    shared_gate: Keystile, figures: Figures
) -> None:
    """50 client keys x 150 simultaneous requests through the middleware: each key has
    exactly 100 admitted."""
    secrets_ = [await new_client_key(shared_gate, **ONE_ADDRESS) for _ in range(50)]
    for secret in secrets_:  # the subject is the limiter, not 7,500 first lookups
        await warm(shared_gate, secret)
    app, _ = make_app(shared_gate)
    limiter = redis_limiter(shared_gate)
    trips = limiter.round_trips
    started = time.perf_counter()
    requests = [
        (n, [(b"authorization", f"Bearer {secret}".encode())])
        for n, secret in enumerate(secrets_)
        for _ in range(150)
    ]
    random.Random(7).shuffle(requests)
    responses = await asyncio.gather(*(call(app, headers) for _, headers in requests))
    elapsed = time.perf_counter() - started
    admitted = [0] * len(secrets_)
    for (n, _), response in zip(requests, responses, strict=True):
        assert response.status_code in (200, 429), response.text
        admitted[n] += response.status_code == 200
    assert limiter.passes == 0
    assert admitted == [100] * len(secrets_), admitted
    figures.add(
        f"50 keys x 150 simultaneous requests ({elapsed:.2f} s, "
        f"{limiter.round_trips - trips} limiter round trips): each key admitted exactly 100"
    )


# -- one round trip ----------------------------------------------------------------------------


async def test_a_limited_request_costs_exactly_one_evalsha(
    own_gate: Keystile, own_redis: OwnRedis
) -> None:
    """Once the gate has started, a rate-limited request with a cached key sends Redis
    one EVALSHA and nothing else: no SCRIPT LOAD, no EVAL, no NOSCRIPT."""
    limiter = redis_limiter(own_gate)
    assert own_redis.admin.script_exists(limiter.sha) == [True]  # loaded by startup()
    secret = await new_client_key(own_gate)
    await warm(own_gate, secret)
    app, _ = make_app(own_gate)
    commands, errors, trips = own_redis.commands(), own_redis.errors(), limiter.round_trips
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(secret))
    assert response.status_code == 200
    assert sent(commands, own_redis.commands()) == {"evalsha": 1}
    assert own_redis.errors() == errors
    assert limiter.round_trips - trips == 1


async def test_concurrent_requests_share_round_trips(
    own_gate: Keystile, own_redis: OwnRedis, figures: Figures
) -> None:
    """64 simultaneous requests are decided by 64 EVALSHAs in fewer than 64 round trips."""
    secret = await new_client_key(own_gate, address_rate_limit="100/minute")
    await warm(own_gate, secret)
    limiter = redis_limiter(own_gate)
    app, _ = make_app(own_gate)
    commands, trips = own_redis.commands(), limiter.round_trips
    async with client(app) as http:
        responses = await asyncio.gather(
            *(http.get("/x", headers=bearer(secret)) for _ in range(64))
        )
    assert statuses(responses) == {200: 64}
    remaining = sorted(parse_list(r.headers["ratelimit"])[0][1]["r"] for r in responses)
    assert remaining == list(range(36, 100))
    assert sent(commands, own_redis.commands()) == {"evalsha": 64}
    shared = limiter.round_trips - trips
    assert 1 <= shared < 64
    figures.add(f"64 simultaneous limited requests: {shared} Redis round trips, 64 EVALSHA")


async def test_a_key_over_its_limit_costs_no_command_until_its_next_slot(
    own_gate: Keystile, own_redis: OwnRedis, figures: Figures
) -> None:
    """Once Redis has refused a key under 1/second, its requests are refused without any
    Redis command until the slot frees; the first one after is admitted by one EVALSHA."""
    secret = await new_key(own_gate, rate_limit="1/second")
    await warm(own_gate, secret)
    limiter = redis_limiter(own_gate)
    app, _ = make_app(own_gate)
    async with client(app) as http:
        assert (await http.get("/x", headers=bearer(secret))).status_code == 200
        refused = await http.get("/x", headers=bearer(secret))
        refused_at = time.monotonic()
        assert refused.status_code == 429
        # 1, or 2 when both requests fell in the same millisecond: the window still refuses
        # at exactly +1 s, so the honest whole-second answer is then 2.
        assert parse_int(refused.headers["retry-after"]) in (1, 2)
        commands, trips = own_redis.commands(), limiter.round_trips
        local = 0
        while True:
            response = await http.get("/x", headers=bearer(secret))
            if response.status_code == 200:
                break
            assert response.status_code == 429
            assert sent(commands, own_redis.commands()) == {}
            assert limiter.round_trips == trips
            assert parse_int(response.headers["retry-after"]) in (1, 2)
            local += 1
            assert time.monotonic() - refused_at < 2.0, "still refused 2 s later"
            await asyncio.sleep(0.02)
        waited = time.monotonic() - refused_at
    assert sent(commands, own_redis.commands()) == {"evalsha": 1}
    assert limiter.round_trips - trips == 1
    assert local >= 1 and waited < 1.5
    figures.add(
        f"key over 1/second: {local} refusals with 0 Redis commands, admitted again "
        f"{waited * 1000:.0f} ms after Redis refused it, by 1 EVALSHA"
    )


async def test_script_flush_is_survived(own_gate: Keystile, own_redis: OwnRedis) -> None:
    """After SCRIPT FLUSH the next request — alone or among concurrent ones — still gets a
    correct decision and numbers (the script is loaded again on NOSCRIPT)."""
    secret = await new_key(own_gate, rate_limit="12/minute")
    await warm(own_gate, secret)
    app, _ = make_app(own_gate)

    def remaining(response: httpx.Response) -> int:
        value: int = parse_list(response.headers["ratelimit"])[0][1]["r"]
        return value

    async with client(app) as http:
        first = await http.get("/x", headers=bearer(secret))
        assert (first.status_code, remaining(first)) == (200, 11)
        own_redis.admin.script_flush()
        alone = await http.get("/x", headers=bearer(secret))
        assert (alone.status_code, remaining(alone)) == (200, 10)
        own_redis.admin.script_flush()
        together = await asyncio.gather(
            *(http.get("/x", headers=bearer(secret)) for _ in range(10))
        )
        assert statuses(together) == {200: 10}
        assert sorted(remaining(r) for r in together) == list(range(10))
        own_redis.admin.script_flush()
        over = await http.get("/x", headers=bearer(secret))
    assert_refused(over, 429, "rate_limited", None)
    assert remaining(over) == 0
    assert own_redis.errors().get("NOSCRIPT", 0) >= 3
    assert redis_limiter(own_gate).passes == 0


async def test_round_trips_counts_the_script_load_of_a_noscript_retry(
    own_gate: Keystile, own_redis: OwnRedis
) -> None:
    """After SCRIPT FLUSH, round_trips grows by every command one request sends."""
    limiter = redis_limiter(own_gate)
    limits_ = limit_set("5/minute", "dev")
    await limiter.hit("k", limits_)
    own_redis.admin.script_flush()
    commands, trips = own_redis.commands(), limiter.round_trips
    assert (await limiter.hit("k", limits_)).allowed
    commands = sent(commands, own_redis.commands())
    assert commands == {"evalsha": 2, "script|load": 1}
    assert limiter.round_trips - trips == sum(commands.values())


# -- headers -----------------------------------------------------------------------------------


async def test_ratelimit_headers_count_down_then_429(
    gate_on: Keystile, backend: tuple[str, str]
) -> None:
    """A client key's 100 admitted responses (from five addresses, 20 each: each address's
    share) carry RateLimit-Policy "client";q=100;w=60, "client-ip";q=20;w=60 and RateLimit
    "client";r=99..0 with each address's own r; the 101st (and 102nd), from a sixth address,
    is the documented 429 with Retry-After, Cache-Control: no-store, r=0, naming "client"."""
    kind, _ = backend
    secret = await new_client_key(gate_on)
    app, seen = make_app(gate_on)
    policy = [("client", {"q": 100, "w": 60}), ("client-ip", {"q": 20, "w": 60})]
    for n in range(100):
        async with client(app, f"203.0.113.{n % 5}") as http:
            response = await http.get("/x", headers=bearer(secret))
        assert response.status_code == 200
        assert parse_list(response.headers["ratelimit-policy"]) == policy
        [(name, params), (ip_name, ip_params)] = parse_list(response.headers["ratelimit"])
        assert name == "client" and set(params) == {"r", "t"}
        assert params["r"] == 99 - n
        assert params["t"] == 60 if kind == "memory" else 59 <= params["t"] <= 60
        assert (ip_name, ip_params["r"]) == ("client-ip", 19 - n // 5)
    async with client(app, "203.0.113.9") as http:
        refusals = [await http.get("/x", headers=bearer(secret)) for _ in range(2)]
    assert len(seen) == 100
    for refused in refusals:
        assert_refused(refused, 429, "rate_limited", None)
        assert '"client"' in refused.json()["error"]["message"]
        assert "client-ip" not in refused.json()["error"]["message"]
        retry = parse_int(refused.headers["retry-after"])
        assert retry == 61 if kind == "memory" else 1 <= retry <= 61
        assert refused.headers.get_list("retry-after") == [str(retry)]
        assert refused.headers["cache-control"] == "no-store"
        assert parse_list(refused.headers["ratelimit-policy"]) == policy
        [(name, params), (_, ip_params)] = parse_list(refused.headers["ratelimit"])
        assert name == "client" and params["r"] == 0 and 0 <= params["t"] <= 60
        assert ip_params["r"] == 20  # the new address's share is untouched


# -- each client address's share of a client key (a public key's budget) -------------------


async def test_one_address_cannot_spend_a_client_keys_budget(
    gate_on: Keystile, backend: tuple[str, str]
) -> None:
    """A client key sits in a web page: one address gets its share (20/minute by default)
    and then 429 naming "client-ip", while every other address is still admitted; the
    refusals spend nothing of the key's 100 (its r counts on from where it was)."""
    secret = await new_client_key(gate_on)
    app, seen = make_app(gate_on)
    async with client(app, "192.0.2.7") as scraper:
        spent = [await scraper.get("/x", headers=bearer(secret)) for _ in range(50)]
    assert statuses(spent) == {200: 20, 429: 30}
    for refused in spent[20:]:
        assert_refused(refused, 429, "rate_limited", None)
        assert '(policy "client-ip")' in refused.json()["error"]["message"]
        [_, (name, params)] = parse_list(refused.headers["ratelimit"])
        assert (name, params["r"]) == ("client-ip", 0)
        assert 1 <= parse_int(refused.headers["retry-after"]) <= 61
    async with client(app, "192.0.2.8") as visitor:
        response = await visitor.get("/x", headers=bearer(secret))
    assert response.status_code == 200
    [(name, params), _] = parse_list(response.headers["ratelimit"])
    assert (name, params["r"]) == ("client", 79)
    assert len(seen) == 21


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        pytest.param("2001:db8:1:2::1", "2001:db8:1:2:ffff::9", True, id="ipv6-same-64"),
        pytest.param("2001:db8:1:2::1", "2001:db8:1:3::1", False, id="ipv6-other-64"),
        pytest.param("10.0.0.1", "::ffff:10.0.0.1", True, id="ipv4-mapped"),
        pytest.param("10.0.0.1", "10.0.0.2", False, id="ipv4-neighbour"),
    ],
)
async def test_an_ipv6_client_shares_out_its_64(
    local: Keystile, first: str, second: str, shared: bool
) -> None:
    """An IPv6 host usually holds a whole /64: its addresses share one share (else one
    client could spend it 2**64 times); IPv4-mapped IPv6 is its IPv4 address."""
    secret = await new_client_key(local, address_rate_limit="3/minute")
    app, _ = make_app(local)
    async with client(app, first) as http:
        assert statuses([await http.get("/x", headers=bearer(secret)) for _ in range(3)]) == {
            200: 3
        }
    async with client(app, second) as http:
        response = await http.get("/x", headers=bearer(secret))
    assert response.status_code == (200 if not shared else 429)


async def test_the_share_is_set_per_type_and_per_key(clock: ManualClock) -> None:
    """The type's share (here 5/minute for client keys) applies unless the key names its
    own (2/minute); clearing the key's own goes back to the type's; a dev key given one is
    limited per address too."""
    types = dict(DEFAULT_TYPE_POLICIES)
    types[KeyType.CLIENT] = types[KeyType.CLIENT].model_copy(
        update={"address_rate_limit": "5/minute"}
    )
    gate = Keystile(store=MemoryStore(), secret=SECRET, clock=clock, policy=KeyPolicy(types))
    try:
        app, _ = make_app(gate)
        typed = await new_client_key(gate)
        own = await gate.manager.create(
            {
                "name": "own",
                "type": "client",
                "scopes": ["vec:read"],
                "allowed_origins": [ORIGIN],
                "address_rate_limit": "2/minute",
            }
        )
        dev = await new_key(gate, address_rate_limit="1/minute")

        async def admitted(secret: str, address: str) -> int:
            async with client(app, address) as http:
                got = [await http.get("/x", headers=bearer(secret)) for _ in range(8)]
            return statuses(got).get(200, 0)

        assert await admitted(typed, "192.0.2.1") == 5
        assert await admitted(own.secret.get_secret_value(), "192.0.2.1") == 2
        assert await admitted(dev, "192.0.2.1") == 1
        assert await admitted(dev, "192.0.2.2") == 1
        await gate.manager.update(own.key.id, address_rate_limit=None)
        assert (await gate.manager.get(own.key.id)).address_rate_limit is None
        assert await admitted(own.secret.get_secret_value(), "192.0.2.3") == 5
    finally:
        await gate.aclose()


async def test_a_request_without_an_address_is_limited_by_the_key_alone(local: Keystile) -> None:
    """With no client address (an app behind a Unix socket), no share can be told apart:
    the key's own window decides, and the headers name only it."""
    secret = await new_client_key(local)
    app, seen = make_app(local)
    transport = httpx.ASGITransport(app=app)
    transport.client = None  # type: ignore[assignment]
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        responses = [await http.get("/x", headers=bearer(secret)) for _ in range(101)]
    assert statuses(responses) == {200: 100, 429: 1}
    assert [n for n, _ in parse_list(responses[0].headers["ratelimit-policy"])] == ["client"]
    assert len(seen) == 100


async def test_the_share_is_decided_in_the_same_script_call(
    own_gate: Keystile, own_redis: OwnRedis
) -> None:
    """The key's window and the address's share are decided by one EVALSHA, both lists
    under the key's hash tag (one Cluster slot), each expiring with its window; addresses
    refused because the key is spent write nothing to Redis."""
    created = await own_gate.manager.create(
        {
            "name": "browser",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": [ORIGIN],
            "rate_limit": "3/minute",
        }
    )
    secret = created.secret.get_secret_value()
    await warm(own_gate, secret)
    app, _ = make_app(own_gate)
    commands = own_redis.commands()
    async with client(app, "192.0.2.1") as http:
        assert (await http.get("/x", headers=bearer(secret))).status_code == 200
    assert sent(commands, own_redis.commands()) == {"evalsha": 1}
    for n in range(2, 40):
        async with client(app, f"192.0.2.{n}") as http:
            await http.get("/x", headers=bearer(secret))
    redis = Redis.from_url(own_redis.url)
    try:
        pattern = f"{redis_limiter(own_gate).namespace}:rl:*"
        names = sorted([name.decode() async for name in redis.scan_iter(pattern)])
        tag = f"{{{created.key.id}}}"
        assert all(tag in name for name in names)
        per_address = [name for name in names if ":ip:" in name]
        assert len(per_address) == 3  # the three admitted addresses, no more
        for name in names:
            assert 0 < await redis.pttl(name) <= 60_000
    finally:
        await redis.aclose()


@pytest.mark.parametrize(
    ("address", "name"),
    [
        ("203.0.113.9", "203.0.113.9"),
        ("2001:db8:aa:bb:cc:dd:ee:ff", "2001:db8:aa:bb::/64"),
        ("::ffff:203.0.113.9", "203.0.113.9"),
    ],
)
def test_budget_address_names_a_host(address: str, name: str) -> None:
    parsed = parse_address(address)
    assert parsed is not None
    assert budget_address(parsed) == name


async def test_unlimited_keys_get_no_ratelimit_headers(local: Keystile) -> None:
    """A prod key with no rate limit (the default) is never limited and gets no RateLimit
    headers, legacy ones included."""
    secret = await new_key(local, "prod")
    app, _ = make_app(local, legacy_rate_limit_headers=True)
    async with client(app) as http:
        responses = [await http.get("/x", headers=bearer(secret)) for _ in range(150)]
    assert statuses(responses) == {200: 150}
    for response in responses:
        assert not any(name.startswith(("ratelimit", "x-ratelimit")) for name in response.headers)


async def test_legacy_headers_on_request(local: Keystile, clock: ManualClock) -> None:
    """legacy_rate_limit_headers=True adds X-RateLimit-Limit/Remaining/Reset (seconds) for
    the tightest window, on admitted and refused responses; off by default."""
    secret = await new_key(local, rate_limit="2/second;100/minute")
    app, _ = make_app(local, legacy_rate_limit_headers=True)
    plain, _ = make_app(local)
    async with client(app) as http, client(plain) as plain_http:
        first = await http.get("/x", headers=bearer(secret))
        clock.advance(0.5)
        second = await plain_http.get("/x", headers=bearer(secret))
        third = await http.get("/x", headers=bearer(secret))
    legacy = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")
    assert [first.headers[h] for h in legacy] == ["2", "1", "1"]
    assert second.status_code == 200 and not any(h in second.headers for h in legacy)
    assert third.status_code == 429
    assert [third.headers[h] for h in legacy] == ["2", "0", "1"]


async def test_two_windows_are_two_policies(local: Keystile) -> None:
    """A key limited to 2/second;3/minute gets two policy items and two RateLimit items."""
    secret = await new_key(local, rate_limit="2/second;3/minute")
    app, _ = make_app(local)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(secret))
    assert parse_list(response.headers["ratelimit-policy"]) == [
        ("dev", {"q": 2, "w": 1}),
        ("dev-2", {"q": 3, "w": 60}),
    ]
    assert parse_list(response.headers["ratelimit"]) == [
        ("dev", {"r": 1, "t": 1}),
        ("dev-2", {"r": 2, "t": 60}),
    ]


async def test_demo_scenario(local: Keystile, clock: ManualClock) -> None:
    """In the demo (memory store, ManualClock), the browser key gets 200 with RateLimit
    headers 20 times from one address, then 429 naming "client-ip" (that address's share);
    100 times in all from five addresses, then 429 naming "client" from any address — still
    at exactly 60 s — and is admitted again once the clock has moved Retry-After seconds."""
    browser = (await seed_demo_keys(local))["client"].secret.get_secret_value()
    app = build_demo_app(local)
    headers = {**bearer(browser), "Origin": DEMO_ORIGINS[0]}
    path = "/cloud/vec/databases"
    for n in range(100):
        async with client(app, f"198.51.100.{n // 20}") as http:
            ok = await http.get(path, headers=headers)
            assert ok.status_code == 200
            assert parse_list(ok.headers["ratelimit"]) == [
                ("client", {"r": 99 - n, "t": 60}),
                ("client-ip", {"r": 19 - n % 20, "t": 60}),
            ]
            if n == 19:  # this address has spent its share; the key has not
                own = await http.get(path, headers=headers)
                assert_refused(own, 429, "rate_limited", None)
                assert '(policy "client-ip")' in own.json()["error"]["message"]
    async with client(app, "198.51.100.99") as http:
        over = await http.get(path, headers=headers)
        assert_refused(over, 429, "rate_limited", None)
        assert '(policy "client")' in over.json()["error"]["message"]
        retry = parse_int(over.headers["retry-after"])
        assert retry == 61
        clock.advance(60)  # the first admissions are exactly 60 s old: still inside
        assert (await http.get(path, headers=headers)).status_code == 429
        clock.advance(retry - 60)
        again = await http.get(path, headers=headers)
    assert again.status_code == 200
    assert parse_list(again.headers["ratelimit"]) == [
        ("client", {"r": 99, "t": 60}),
        ("client-ip", {"r": 19, "t": 60}),
    ]


# -- failure modes -----------------------------------------------------------------------------


def limiter_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "keystile.ratelimit" and r.levelno == logging.WARNING
    ]


async def timed(http: httpx.AsyncClient, secret: str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = await http.get("/x", headers=bearer(secret))
    return response, time.perf_counter() - started


@pytest.mark.timing
async def test_dead_redis_lets_traffic_through_counts_and_logs_once(
    own_gate: Keystile, own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    """With Redis killed while the app runs, a cached client key is admitted (the default
    failure mode) within 1 s per request, every pass is counted, one warning is logged; an
    uncached key is 503 auth_unavailable (key lookups fail closed)."""
    caplog.set_level(logging.WARNING, logger="keystile.ratelimit")
    secret = await new_client_key(own_gate)
    uncached = await new_client_key(own_gate)
    limiter = redis_limiter(own_gate)
    app, seen = make_app(own_gate)
    async with client(app) as http:
        assert (await http.get("/x", headers=bearer(secret))).status_code == 200
        own_redis.kill()
        for n in range(1, 6):
            response, elapsed = await timed(http, secret)
            assert response.status_code == 200 and elapsed < budget(1.0)
            assert limiter.passes == n
        unknown, elapsed = await timed(http, uncached)
    assert elapsed < budget(1.5)
    assert_refused(unknown, 503, "auth_unavailable", None)
    assert parse_int(unknown.headers["retry-after"]) >= 1
    assert len(seen) == 6
    [warning] = limiter_warnings(caplog)
    assert "rate limiter unavailable" in warning.getMessage()


@pytest.mark.timing
@pytest.mark.parametrize("configured", ["settings", "limiter"])
async def test_dead_redis_with_failure_deny_is_503(own_redis: OwnRedis, configured: str) -> None:
    """With failure="deny" (from the settings, or a RedisLimiter passed in), a request the
    limiter cannot decide is 503 rate_limit_unavailable with Retry-After, within 1 s."""
    store = RedisStore.from_url(own_redis.url, namespace=new_namespace(), heartbeat=60.0)
    if configured == "settings":
        gate = Keystile(
            store=store, secret=SECRET, settings=KeystileSettings(rate_limit_failure="deny")
        )
    else:
        limiter = RedisLimiter(store.client, namespace=store.namespace, failure="deny")
        gate = Keystile(store=store, secret=SECRET, limiter=limiter)
    await gate.startup()
    try:
        secret = await new_client_key(gate)
        app, seen = make_app(gate)
        async with client(app) as http:
            assert (await http.get("/x", headers=bearer(secret))).status_code == 200
            own_redis.kill()
            responses = [await timed(http, secret) for _ in range(3)]
        for response, elapsed in responses:
            assert elapsed < budget(1.0)
            assert_refused(response, 503, "rate_limit_unavailable", None)
            assert parse_int(response.headers["retry-after"]) >= 1
        assert len(seen) == 1
        assert redis_limiter(gate).passes == 0
    finally:
        await gate.aclose()


@pytest.mark.parametrize("failure", ["allow", "deny"])
async def test_slow_redis_ends_within_the_limiter_timeout(
    own_redis: OwnRedis, failure: str, figures: Figures
) -> None:
    """While Redis is stuck (DEBUG SLEEP 1), 10 simultaneous requests with a cached key
    all end within the limiter's 0.25 s timeout plus a margin: admitted ("allow") or 503
    rate_limit_unavailable ("deny")."""
    store = RedisStore.from_url(own_redis.url, namespace=new_namespace(), heartbeat=60.0)
    gate = Keystile(
        store=store,
        secret=SECRET,
        settings=KeystileSettings(rate_limit_failure=failure),  # type: ignore[arg-type]
    )
    await gate.startup()
    limiter = redis_limiter(gate)
    assert limiter.timeout == 0.25
    stuck = socket.create_connection(("127.0.0.1", own_redis.port), timeout=5)
    try:
        secret = await new_client_key(gate)
        app, _ = make_app(gate)
        async with client(app) as http:
            assert (await http.get("/x", headers=bearer(secret))).status_code == 200
            stuck.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$1\r\n1\r\n")
            await asyncio.sleep(0.05)  # let the server start sleeping
            started = time.perf_counter()
            responses = await asyncio.gather(*(timed(http, secret) for _ in range(10)))
            elapsed = time.perf_counter() - started
        slowest = max(took for _, took in responses)
        assert slowest < 0.25 + 0.35, f"slowest request took {slowest * 1000:.0f} ms"
        for response, _ in responses:
            if failure == "allow":
                assert response.status_code == 200
            else:
                assert_refused(response, 503, "rate_limit_unavailable", None)
        assert limiter.passes == (10 if failure == "allow" else 0)
        assert stuck.recv(16) == b"+OK\r\n"  # the sleep ends; Redis answers again
        figures.add(
            f"Redis stuck in DEBUG SLEEP 1, failure={failure}: 10 simultaneous requests "
            f"answered within {elapsed * 1000:.0f} ms (limiter timeout 250 ms)"
        )
    finally:
        stuck.close()
        await gate.aclose()


@dataclass
class Outage:
    """A limiter and the Redis behind it, which the test takes away and brings back."""

    limiter: RedisLimiter
    down: Any  # () -> None
    up: Any  # () -> None
    asked: list[int]  # [decisions that went to Redis]: counted below the back-off


def count_asked(limiter: RedisLimiter) -> list[int]:
    """Count the decisions the limiter sends towards Redis (either path), answered or not."""
    asked = [0]
    for name in ("_lean_decide", "_pooled_decide"):
        real = getattr(limiter, name)

        async def counted(*args: Any, _real: Any = real) -> Any:
            asked[0] += 1
            return await _real(*args)

        setattr(limiter, name, counted)
    return asked


@pytest.fixture
def monotonic() -> list[float]:
    """The monotonic clock given to the limiters of a test (``monotonic=``), set by the
    test (asyncio keeps its own): ``monotonic[0] += seconds``. Unlike conftest's, it
    patches no module."""
    return [1000.0]


def on(monotonic: list[float]) -> dict[str, Any]:
    """The options that give a limiter the test's monotonic clock."""
    return {"monotonic": lambda: monotonic[0]}


@pytest.fixture(params=["fakeredis", "redis", "redis-py"])
async def outage(request: pytest.FixtureRequest, monotonic: list[float]) -> AsyncIterator[Outage]:
    """A RedisLimiter (trip_after=3, backoff=(0.5, 2.0), timeout 1 s, on the test's
    monotonic clock) on fakeredis (its server disconnected), or on a redis-server of the
    test's own (killed and restarted) over the lean connection or over redis-py."""
    namespace = new_namespace()
    options: dict[str, Any] = {
        "timeout": 1.0,
        "trip_after": 3,
        "backoff": (0.5, 2.0),
        **on(monotonic),
    }
    if request.param == "fakeredis":
        server = fakeredis.FakeServer()
        fake = fake_redis(server)
        limiter = RedisLimiter(fake, namespace=namespace, **options)

        def down() -> None:
            server.connected = False

        def up() -> None:
            server.connected = True

        yield Outage(limiter, down, up, count_asked(limiter))
        await limiter.close()
        await fake.aclose()
        return
    own = OwnRedis()
    own.start()
    real: Redis = Redis.from_url(own.url)
    limiter = RedisLimiter(real, namespace=namespace, lean=request.param == "redis", **options)
    assert limiter.lean == (request.param == "redis")
    try:
        yield Outage(limiter, own.kill, own.start, count_asked(limiter))
    finally:
        await limiter.close()
        await real.aclose()
        own.close()


async def test_repeated_failures_back_off_until_one_try_succeeds(
    outage: Outage, monotonic: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """Three failed decisions in a row make the limiter back off: while it does, decisions
    pass undecided (counted, logged once) without asking Redis, even a Redis answering
    again; when the wait is over one request tries, and its answer ends the back-off."""
    caplog.set_level(logging.WARNING, logger="keystile.ratelimit")
    limiter, limits_, asked = outage.limiter, limit_set("100/minute", "dev"), outage.asked
    assert not (await limiter.hit("k", limits_)).degraded
    await asyncio.to_thread(outage.down)
    for n in range(1, 4):
        failed = await limiter.hit("k", limits_)
        assert failed.degraded and failed.allowed and limiter.passes == n and asked[0] == 1 + n
    await asyncio.to_thread(outage.up)
    monotonic[0] += 0.5 - TICK
    skipped = await limiter.hit("k", limits_)  # Redis answers, but the limiter waits
    assert skipped.degraded and skipped.allowed and limiter.passes == 4 and asked[0] == 4
    monotonic[0] += TICK
    tried = await limiter.hit("k", limits_)
    assert not tried.degraded and asked[0] == 5
    after = await limiter.hit("k", limits_)  # no back-off any more
    assert not after.degraded and after.remaining == (tried.remaining[0] - 1,)
    assert limiter.passes == 4 and asked[0] == 6
    [warning] = limiter_warnings(caplog)
    assert "rate limiter unavailable" in warning.getMessage()


async def test_each_failed_try_doubles_the_wait_up_to_the_most(
    outage: Outage, monotonic: list[float]
) -> None:
    """A try that fails doubles the wait (0.5, 1, 2 s, then 2 s again); a failure of a
    request that was under way before the back-off began does not extend it."""
    limiter, limits_, asked = outage.limiter, limit_set("100/minute", "dev"), outage.asked
    await asyncio.to_thread(outage.down)
    for _ in range(3):
        assert (await limiter.hit("k", limits_)).degraded
    assert asked[0] == 3
    for n, wait in enumerate((0.5, 1.0, 2.0, 2.0), start=1):
        limiter.fallback._failed(False)  # a request from before fails meanwhile: no change
        monotonic[0] += wait - TICK
        assert (await limiter.hit("k", limits_)).degraded  # skipped
        assert asked[0] == 2 + n
        monotonic[0] += TICK
        assert (await limiter.hit("k", limits_)).degraded  # the try, which fails
        assert asked[0] == 3 + n
    await asyncio.to_thread(outage.up)
    monotonic[0] += 2.0 - TICK
    assert (await limiter.hit("k", limits_)).degraded  # still waiting: 2 s, not more
    monotonic[0] += TICK
    assert not (await limiter.hit("k", limits_)).degraded
    assert limiter.passes == 3 + 2 * 4 + 1 and asked[0] == 8


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "redis-py"])
async def test_while_one_request_tries_redis_the_others_do_not_wait(
    own_redis: OwnRedis, monotonic: list[float], lean: bool
) -> None:
    """When the wait is over, one request tries Redis (stuck in DEBUG SLEEP 0.4 here) and
    waits for it; ten others arriving meanwhile pass at once, undecided. The try's answer
    ends the back-off."""
    namespace = new_namespace()
    client_ = Redis.from_url(own_redis.url)
    limiter = RedisLimiter(
        client_,
        namespace=namespace,
        timeout=2.0,
        trip_after=3,
        backoff=(0.5, 2.0),
        lean=lean,
        **on(monotonic),
    )
    limits_ = limit_set("100/minute", "dev")
    stuck = socket.create_connection(("127.0.0.1", own_redis.port), timeout=5)
    try:
        await limiter.start()
        for _ in range(3):
            limiter.fallback._failed(False)  # three failures, as from a dead Redis
        monotonic[0] += 0.5
        stuck.sendall(b"*3\r\n$5\r\nDEBUG\r\n$5\r\nSLEEP\r\n$3\r\n0.4\r\n")
        await asyncio.sleep(0.05)  # let the server start sleeping
        started = time.perf_counter()
        trying = asyncio.create_task(limiter.hit("k", limits_))
        await asyncio.sleep(0)  # the try is on its way
        others = [await limiter.hit(f"other-{n}", limits_) for n in range(10)]
        others_took = time.perf_counter() - started
        tried = await trying
        tried_took = time.perf_counter() - started
        assert all(d.degraded and d.allowed for d in others) and limiter.passes == 10
        assert others_took < 0.2 < tried_took, (others_took, tried_took)
        assert not tried.degraded and tried.remaining == (99,)
        assert not (await limiter.hit("other-0", limits_)).degraded
        assert stuck.recv(16) == b"+OK\r\n"
    finally:
        stuck.close()
        await limiter.close()
        await client_.aclose()


def test_backing_off_is_configured_sensibly() -> None:
    fake = fake_redis()
    for options in ({"trip_after": 0}, {"backoff": (0.0, 1.0)}, {"backoff": (2.0, 1.0)}):
        with pytest.raises(ValueError, match="trip_after"):
            RedisLimiter(fake, **options)


# -- bugs --------------------------------------------------------------------------------------


async def test_a_refused_large_cost_does_not_refuse_a_smaller_one(
    redis_client: tuple[Redis, str],
) -> None:
    """After a refusal for cost 3 with 2 slots left, a hit of cost 1 is admitted."""
    made, namespace = redis_client
    async with own_limiter(made, namespace=namespace) as limiter:
        limits_ = limit_set("10/minute", "dev")
        assert (await limiter.hit("k", limits_, 8)).allowed
        refused = await limiter.hit("k", limits_, 3)
        assert not refused.allowed and refused.remaining == (2,)
        assert (await limiter.hit("k", limits_, 1)).allowed


async def test_a_changed_limit_takes_effect_at_once(redis_client: tuple[Redis, str]) -> None:
    """A key refused under 1/minute is decided under its new limit, 10/second;1000/hour,
    as soon as it has one."""
    made, namespace = redis_client
    async with own_limiter(made, namespace=namespace) as limiter:
        old = limit_set("1/minute", "dev")
        assert (await limiter.hit("k", old)).allowed
        assert not (await limiter.hit("k", old)).allowed
        raised = await limiter.hit("k", limit_set("10/second;1000/hour", "dev"))
        assert raised.allowed and raised.remaining == (9, 999)


async def test_changing_a_blocked_keys_limit_never_fails_the_request(
    redis_client: tuple[Redis, str],
) -> None:
    """A key refused under 1/minute whose record changes to 10/second;1000/hour (as an
    update in any process would do) is answered, not failed, on its next request."""
    made, namespace = redis_client
    gate = Keystile(store=RedisStore(made, namespace=namespace), secret=SECRET, settings=QUIET)
    await gate.startup()
    try:
        created = await gate.manager.create(
            {"name": "n", "type": "dev", "scopes": ["vec:read"], "rate_limit": "1/minute"}
        )
        secret = created.secret.get_secret_value()
        app, _ = make_app(gate)
        async with client(app) as http:
            assert (await http.get("/x", headers=bearer(secret))).status_code == 200
            assert (await http.get("/x", headers=bearer(secret))).status_code == 429
            record = await gate.manager.get(created.key.id)
            raised = record.model_copy(update={"rate_limit": "10/second;1000/hour"})
            await gate.store.replace(raised)
            response = await http.get("/x", headers=bearer(secret))
        assert response.status_code == 200
    finally:
        await gate.shutdown()  # the fixture closes the client


async def test_a_local_refusal_reports_each_windows_own_reset(
    redis_client: tuple[Redis, str],
) -> None:
    """Refused locally a moment after Redis refused it, a key reports the same per-window
    remaining and reset numbers Redis gave."""
    made, namespace = redis_client
    async with own_limiter(made, namespace=namespace) as limiter:
        limits_ = limit_set("10/10 seconds;1/second", "dev")
        assert (await limiter.hit("k", limits_)).allowed
        by_redis = await limiter.hit("k", limits_)
        assert not by_redis.allowed and by_redis.reset == (10, 1)
        trips = limiter.round_trips
        locally = await limiter.hit("k", limits_)
        assert limiter.round_trips == trips  # decided without Redis
        assert (locally.remaining, locally.reset) == (by_redis.remaining, by_redis.reset)


async def test_a_full_memory_limiter_forgets_expired_windows_first(clock: ManualClock) -> None:
    """With room for two windows, a third key displaces the one whose entries have all
    expired, not a 1/minute window admitted 2 s ago."""
    limiter = MemoryLimiter(clock=clock, max_keys=2)
    per_minute, per_second = limit_set("1/minute", "dev"), limit_set("1/second", "dev")
    assert limiter.hit_now("a", per_minute).allowed
    clock.advance(0.5)
    assert limiter.hit_now("b", per_second).allowed
    clock.advance(1.5)  # b's window is now empty; a's still holds its admission
    assert limiter.hit_now("c", per_second).allowed
    clock.advance(1.0)
    assert not limiter.hit_now("a", per_minute).allowed


async def test_a_limit_is_refused_when_parsed_or_decided_by_redis(redis_namespace: str) -> None:
    """A limit string either fails to parse or is decided by Redis: never passed undecided
    while Redis is up."""
    try:
        limits_ = limit_set("1/1000000000000 years", "dev")
    except ValueError:
        return
    made: Redis = Redis.from_url(REDIS_URL)
    try:
        async with own_limiter(made, namespace=redis_namespace) as limiter:
            decision = await limiter.hit("k", limits_)
    finally:
        await made.aclose()
    assert not decision.degraded and limiter.passes == 0


# -- every event loop and HTTP server (issue #18, item 0) -------------------------------------


def _loop_factory(name: str) -> Any:
    if name == "uvloop":
        return pytest.importorskip("uvloop").new_event_loop
    return asyncio.new_event_loop


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "redis-py"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_item0_the_limiter_decides_exactly_on_every_event_loop(
    redis_namespace: str, loop: str, lean: bool
) -> None:
    """On the real Redis, on asyncio's loop and on uvloop's (what ``uvicorn --loop uvloop``
    runs), one at a time and then together: a 5/minute limit admits exactly 5, each decided
    by Redis (no pass), then refuses with a Retry-After."""
    limits_ = limit_set("5/minute", "client")

    async def decide() -> None:
        client_: Redis = Redis.from_url(REDIS_URL)
        limiter = RedisLimiter(client_, namespace=redis_namespace, lean=lean, timeout=2.0)
        try:
            assert limiter.lean == lean
            alone = [await limiter.hit("one", limits_) for _ in range(7)]
            together = await asyncio.gather(*(limiter.hit("two", limits_) for _ in range(7)))
            for decisions in (alone, together):
                assert [d.allowed for d in decisions].count(True) == 5
                assert not any(d.degraded for d in decisions)
                refused = [d for d in decisions if not d.allowed]
                assert len(refused) == 2 and all(d.retry_after >= 1 for d in refused)
            assert limiter.passes == 0 and limiter.health().ok
        finally:
            await limiter.close()
            await client_.aclose()

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(decide())


@pytest.mark.redis
@pytest.mark.parametrize("server", [("asyncio", "h11"), ("uvloop", "httptools")], ids="-".join)
async def test_item0_uvicorn_enforces_the_limit_on_every_loop(
    redis_namespace: str, server: tuple[str, str]
) -> None:
    """130 requests one after another with a client key (100/minute) to keystile under
    uvicorn, with each event loop and HTTP parser: exactly 100 admitted, each decided by
    Redis (no pass), and 30 refused 429 rate_limited — never a 500."""
    from faults.rawhttp import exchange, request
    from faults.server import child_env, serve

    if server[0] == "uvloop":
        pytest.importorskip("uvloop")
    pytest.importorskip(server[1])
    gate = Keystile(
        store=RedisStore.from_url(REDIS_URL, namespace=redis_namespace),
        secret=SECRET,
        settings=QUIET,
    )
    # what faults.app's /x needs; the key's own window is the subject (one address)
    secret = await new_client_key(gate, scopes=["kev:read"], **ONE_ADDRESS)
    await gate.aclose()
    env = child_env(
        KEYSTILE_REDIS_URL=REDIS_URL,
        KEYSTILE_SECRET=SECRET,
        KEYSTILE_NAMESPACE=redis_namespace,
        KEYSTILE_RATE_LIMIT_TIMEOUT="5",  # a busy machine shows as a failure below, not a pass
    )
    flags = ("--loop", server[0], "--http", server[1], "--no-access-log")
    data = request("GET", "/x", [(b"Authorization", f"Bearer {secret}".encode())])
    with serve(env, flags=flags) as running:
        answers = [await exchange(running.port, data) for _ in range(130)]
    outcome = Counter(a.describe() for a in answers)
    assert outcome == {"200": 100, "429 rate_limited": 30}, outcome
    assert all(a.json["passes"] == 0 for a in answers if a.status == 200)  # type: ignore[index]


# -- one module per concern, one batcher, an injectable clock (issue #14) ----------------------

# Imports keystile.models as its own modules do, without keystile/__init__.py (which loads
# the whole library, the Redis store included), then lists what got loaded.
ONLY_MODELS = """
import importlib.util, sys, types
package = types.ModuleType("keystile")
package.__path__ = sys.argv[1:]
sys.modules["keystile"] = package
import keystile.models
fields = {"name": "n", "type": "dev", "rate_limit": "10 per second"}
assert keystile.models.KeySettings(**fields).rate_limit == "10/second"
print(" ".join(sorted(sys.modules)))
"""


def test_issue14_models_normalise_limits_without_loading_redis() -> None:
    """keystile.models spells a limit canonically through keystile.rates: neither redis
    nor the limiters (nor the lean connection) are loaded by it."""
    import keystile

    done = subprocess.run(
        [sys.executable, "-c", ONLY_MODELS, *keystile.__path__],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "keystile.rates" in loaded
    assert not {m for m in loaded if m == "redis" or m.startswith("redis.")}
    assert not {m for m in loaded if m.startswith(("keystile.ratelimit", "keystile.redis"))}


def test_issue14_only_keystile_rates_imports_limits() -> None:
    """One module speaks to the limits library, and it imports nothing of Redis."""
    import ast

    import keystile

    root = Path(keystile.__path__[0])
    importers: dict[str, set[str]] = {}
    for path in sorted(root.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        importers[path.relative_to(root).as_posix()] = names

    def imports(module: str, names: set[str]) -> bool:
        return any(name == module or name.startswith(f"{module}.") for name in names)

    assert [p for p, names in importers.items() if imports("limits", names)] == ["rates.py"]
    rates = importers["rates.py"]
    assert not any(imports(m, rates) for m in ("redis", "keystile.redis", "keystile.ratelimit"))


async def test_issue14_a_share_decided_without_an_address_has_a_list_of_its_own(
    redis_client: tuple[Redis, str],
) -> None:
    """A limit set whose address share equals the key's window, hit with no address: the
    two windows are two lists (each admission counted once in each), both named as the
    key schema names a key's window and an address's share."""
    from keystile.redis.schema import RedisSchema

    made, namespace = redis_client
    limits_ = limit_set("5/minute", "client", "5/minute")
    async with own_limiter(made, namespace=namespace) as limiter:
        decisions = [await limiter.hit("k", limits_) for _ in range(6)]
        key_window, share = (limiter.window_key("k", limits_, i) for i in range(2))
        assert key_window == RedisSchema(namespace).window("k", 5, 60)
        assert share != key_window
        assert share.startswith(f"{namespace}:rl:{{k}}:ip:") and share.endswith(":5/60")
        assert (await made.llen(key_window), await made.llen(share)) == (5, 5)
        named = limiter.window_key("k", limits_, 1, "192.0.2.1")
        assert named == RedisSchema(namespace).window("k", 5, 60, "192.0.2.1")
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert [d.remaining for d in decisions[:2]] == [(4, 4), (3, 3)]


async def test_issue14_the_pooled_path_sends_one_evalsha_per_decision(
    own_redis: OwnRedis,
) -> None:
    """Over redis-py (lean=False), 32 simultaneous decisions are 32 EVALSHAs and 32 round
    trips — no pipeline of the limiter's own — and admit exactly the limit."""
    client_: Redis = Redis.from_url(own_redis.url)
    limiter = RedisLimiter(client_, namespace=new_namespace(), lean=False, timeout=2.0)
    limits_ = limit_set("20/minute", "dev")
    try:
        await limiter.start()
        commands, trips = own_redis.commands(), limiter.round_trips
        decisions = await asyncio.gather(*(limiter.hit("k", limits_) for _ in range(32)))
        assert sent(commands, own_redis.commands()) == {"evalsha": 32}
        assert limiter.round_trips - trips == 32
    finally:
        await limiter.close()
        await client_.aclose()
    assert [d.allowed for d in decisions].count(True) == 20
    assert not any(d.degraded for d in decisions) and limiter.passes == 0


async def test_issue14_local_refusals_follow_the_injected_monotonic_clock(
    redis_client: tuple[Redis, str], monotonic: list[float]
) -> None:
    """A key Redis refused under 1/minute is refused locally, on the limiter's own
    ``monotonic`` clock: half a minute later by that clock, with half a minute left and
    no round trip; once that clock passes the refusing entry's release, Redis is asked
    again (and, its own clock having barely moved, refuses)."""
    made, namespace = redis_client
    async with own_limiter(made, namespace=namespace, **on(monotonic)) as limiter:
        limits_ = limit_set("1/minute", "dev")
        assert (await limiter.hit("k", limits_)).allowed
        by_redis = await limiter.hit("k", limits_)
        assert not by_redis.allowed and by_redis.at and by_redis.reset == (60,)
        trips = limiter.round_trips
        monotonic[0] += 30.0
        locally = await limiter.hit("k", limits_)
        assert limiter.round_trips == trips
        assert not locally.allowed and not locally.at
        assert locally.reset == (30,) and locally.retry_after in (30, 31)
        monotonic[0] += 30.01
        asked = await limiter.hit("k", limits_)
        assert limiter.round_trips == trips + 1
        assert not asked.allowed and asked.at


# -- bounded tables cost O(1) per request under a flood of keys -------------------------------


def test_a_flood_of_new_keys_scans_the_memory_limiter_rarely(clock: ManualClock) -> None:
    """Full of live windows, each new key evicts the least recently used one without
    scanning the whole table: 5,000 new keys past a 1,000-window bound cost at most one
    scan per 100 of them, and the bound holds throughout."""
    limiter = MemoryLimiter(clock=clock, max_keys=1_000)
    per_minute = limit_set("5/minute", "dev")
    for n in range(1_000):
        assert limiter.hit_now(f"warm{n}", per_minute).allowed
    assert limiter.evictions == 0
    for n in range(5_000):
        assert limiter.hit_now(f"flood{n}", per_minute).allowed
        assert len(limiter._events) <= 1_000
    assert 1 <= limiter.evictions <= 5_000 // 100 + 1
    # The most recent keys are still limited exactly; the oldest were forgotten.
    for _ in range(4):
        assert limiter.hit_now("flood4999", per_minute).allowed
    assert not limiter.hit_now("flood4999", per_minute).allowed


async def test_a_flood_of_refused_keys_prunes_the_local_refusals_rarely(
    redis_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Local refusals are bounded (``max_blocked``) and pruned at most once per
    ``max_blocked / 2`` refusals, even when every refused key is still blocked; a key
    forgotten locally is still refused, by Redis."""
    require_redis()
    monkeypatch.setattr(RedisLimiter, "max_blocked", 40)
    one = limit_set("1/minute", "dev")
    made: Redis = Redis.from_url(REDIS_URL)
    try:
        async with own_limiter(made, namespace=redis_namespace) as limiter:
            for n in range(200):
                assert (await limiter.hit(f"k{n}", one)).allowed
                assert not (await limiter.hit(f"k{n}", one)).allowed
                assert len(limiter._blocked) <= 40
            assert 1 <= limiter.blocked_prunes <= 200 // 20 + 1
            asked = count_asked(limiter)
            assert not (await limiter.hit("k0", one)).allowed
            assert asked[0] == 1  # forgotten locally, refused by Redis
    finally:
        await made.aclose()


async def test_a_window_list_holds_its_times_compactly_and_stays_exact(
    redis_namespace: str,
) -> None:
    """A window's list holds its newest admission whole and the others modulo 2^18 ms (a
    1-minute window: Redis packs each in 4 bytes where 13 digits took 9); decisions stay
    exact across the wrap of the modulus, after a clock that jumps ahead by hours (the list
    still alive in Redis' time), after a clock gone back a few seconds, and on a list
    written whole by the earlier encoding."""
    from keystile.redis.scripts import lua

    client = Redis.from_url(conftest.REDIS_URL)
    script = client.register_script(lua("moving_window"))
    name = f"{redis_namespace}:rl:{{k}}:3/60"

    async def hit(at: int) -> tuple[bool, int, int]:
        allowed, _, inside, oldest, _ = (
            await script(keys=[name], args=[1, at, 3, 60_000])
        ).split()
        return allowed == b"1", int(inside), int(oldest)

    try:
        base = 1_700_000_000_000 - 1_700_000_000_000 % 2**18 + 2**18 - 1_000  # wraps soon
        assert await hit(base) == (True, 1, base)
        assert await hit(base + 500) == (True, 2, base)
        assert await hit(base + 1_500) == (True, 3, base)  # past the wrap of 2^18
        held = [int(v) for v in await client.lrange(name, 0, -1)]
        assert held == [base + 1_500, (base + 500) % 2**18, base % 2**18]
        assert await hit(base + 60_000) == (False, 3, base)  # a window ago: still inside
        assert await hit(base + 60_001) == (True, 3, base + 500)  # base left the window
        # Hours on (the list alive in Redis' time): every old entry is outside.
        later = base + 3 * 3_600_000 + 12_345
        assert await hit(later) == (True, 1, later)
        assert await hit(later + 10) == (True, 2, later)
        # A clock gone back 5 s: the entries ahead of it still count.
        assert await hit(later - 5_000) == (True, 3, later)
        assert await hit(later + 20) == (False, 3, later)
        # A list of the earlier encoding: every time whole.
        await client.delete(name)
        old = [later + 200, later + 100, later]
        await client.rpush(name, *old)
        assert await hit(later + 300) == (False, 3, later)
        assert await hit(later + 60_001) == (True, 3, later + 100)
        held = [int(v) for v in await client.lrange(name, 0, -1)]
        assert held == [later + 60_001, (later + 200) % 2**18, later + 100]
        assert await hit(later + 60_102) == (True, 3, later + 200)
    finally:
        await client.aclose()


async def test_start_up_may_take_as_long_as_a_connection_attempt(
    own_redis: OwnRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Starting (connect, then load the script over the lean connection) when connecting
    takes 0.5 s (a cold DNS lookup, a far server, a busy machine) succeeds: start-up waits
    as long as a connection attempt may take (1 s), not a request's 250 ms (in CI, a
    start on a busy machine failed with "could not connect to Redis in time")."""
    opened = LeanRedis._open

    async def slow_open(self: LeanRedis) -> Any:
        await asyncio.sleep(0.5)
        return await opened(self)

    monkeypatch.setattr(LeanRedis, "_open", slow_open)
    client_ = Redis.from_url(own_redis.url)
    limiter = RedisLimiter(client_, namespace=new_namespace())
    try:
        assert limiter.timeout == 0.25 and limiter.lean
        started = time.perf_counter()
        await limiter.start()
        assert time.perf_counter() - started >= 0.5 and limiter.sha
        assert not (await limiter.hit("k", limit_set("100/minute", "dev"))).degraded
    finally:
        await limiter.close()
        await client_.aclose()
