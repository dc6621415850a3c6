"""Per-request cost and throughput of keystile's Redis-backed rate limiting, in process,
against ``limits`` used directly, slowapi and a hand-rolled one-round-trip lower bound.

Every contender is the app of ``apps.py`` (``GET /cloud/vec/databases``) plus one
middleware limiting that route with a moving window in Redis, at an amount that never
refuses (``10000000/minute``) — except keystile's 429 path, a key over its ``1/minute``.
The apps are called as raw ASGI (the plumbing of ``bench_middleware.py``): no HTTP client,
no server, only the Redis round trips leave the process. Two regimes, rounds interleaved:

(a) one request at a time (sequential awaits): µs per request;
(b) 64 requests in flight (``asyncio.gather`` of 64 calls per batch): requests per second.

A round runs every contender once in (a), then once in (b). The order rotates by one place
from round to round, and runs backwards every other cycle of rotations, so that no
contender always goes first and each pair runs in either order equally often (over two
cycles); each regime has its own cycle, keystile sitting next to the contenders it is
judged against: the lower bound in (a) (and the 429 path next to the bare app), ``limits``
and slowapi in (b). The tables give each contender's median over rounds; the targets that
compare two contenders are paired: within each round the ratio of the one's figure to the
other's, and the target is judged by the median of those per-round ratios (quartiles
beside it, the ratio of the medians for reference): the machine's speed drifts by tens of
percent from second to second, and two runs of one round meet more of the same drift than
two medians over all rounds do. What is measured is what it was before the pairing (the
same requests, apps and batches); only the order and the figures computed from the
samples changed.

It also counts the Redis commands each contender sends per request, from
``INFO commandstats`` deltas. By default it starts its own ``redis-server`` on a free
loopback port (no persistence) and stops it at the end; without the binary it uses the
Redis at 127.0.0.1:6379 (``--redis-url`` picks another), writing only under a fresh
``ksbench-*`` prefix that it deletes at the end.

    python benchmarks/bench_ratelimit.py             # about 80 seconds
    python benchmarks/bench_ratelimit.py --quick     # a few seconds
    python benchmarks/bench_ratelimit.py --pin split  # redis-server on another CPU

Needs slowapi for its contender (``pip install -e '.[bench]'``); without it, that
contender is skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import logging
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import redis
import redis.asyncio as aioredis
from limits import parse as parse_limit
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from starlette.middleware import Middleware

from apps import SECRET, make_app
from bench_middleware import (
    bearer,
    call_once,
    command_counts,
    command_delta,
    describe,
    discard,
    fresh,
    http_scope,
    receive,
    verdict,
)
from keystile import RedisStore
from keystile.gate import Keystile
from keystile.middleware import KeystileMiddleware
from keystile.ratelimit import RedisLimiter, limit_set
from keystile.redis.connect import lean_connection
from keystile.redis.lean import LeanRedis, encode
from pairing import order, paired

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

LIMIT = "10000000/minute"  # never refuses during a run (keystile caps an amount at 10,000,000)
OVER_LIMIT = "1/minute"  # the 429 contender's key: hit once, then over its limit
ORIGIN = b"https://a.example"
IN_FLIGHT = 64

# The commands each contender's Lua script runs (none of them sends these itself): counted
# apart from the commands that cross the wire.
KEYSTILE_LUA = frozenset({"time", "lindex", "lpush", "lset", "ltrim", "pexpire", "llen"})
LIMITS_LUA = frozenset({"lindex", "lpush", "ltrim", "expire"})  # limits' moving-window scripts
LOWER_BOUND_LUA = frozenset({"time", "lindex", "lpush", "ltrim", "pexpire"})

# The lower bound: the least a moving window in Redis can be — one list per client, one
# script: refuse if the entry `amount - 1` is inside the window, else push now, trim,
# expire. One EVALSHA, nothing else.
LOWER_BOUND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local amount = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
local entry = redis.call('LINDEX', KEYS[1], amount - 1)
if entry and tonumber(entry) >= now - window then
  return 0
end
redis.call('LPUSH', KEYS[1], now)
redis.call('LTRIM', KEYS[1], 0, amount - 1)
redis.call('PEXPIRE', KEYS[1], window)
return 1
"""

_TOO_MANY = b'{"error":"rate_limited"}'


async def too_many(send: Any, headers: list[tuple[bytes, bytes]]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 429,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_TOO_MANY)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": _TOO_MANY})


class LowerBound:
    """Pure ASGI: exactly one ``await client.evalsha(...)`` per request, then the app."""

    def __init__(self, app: App, *, client: aioredis.Redis, sha: str, key: str) -> None:
        self.app = app
        self.client = client
        self.sha = sha
        self.key = key
        item = parse_limit(LIMIT)
        self.amount = item.amount
        self.window_ms = item.get_expiry() * 1000

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if await self.client.evalsha(self.sha, 1, self.key, self.amount, self.window_ms):
            await self.app(scope, receive, send)
        else:
            await too_many(send, [])


class RawSocketFloor(LowerBound):
    """The lower bound's EVALSHA over keystile's lean connection (``keystile.redis.lean``): what a
    round trip costs without redis-py's layers — a floor, not a target."""

    def __init__(self, app: App, *, lean: LeanRedis, sha: str, key: str) -> None:
        super().__init__(app, client=None, sha=sha, key=key)  # type: ignore[arg-type]
        self.lean = lean
        self.command = encode(["EVALSHA", sha, 1, key, self.amount, self.window_ms])

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if await self.lean.call(self.command) == 1:
            await self.app(scope, receive, send)
        else:
            await too_many(send, [])


class LimitsDirect:
    """Pure ASGI over ``limits``' async moving window: ``hit``, then ``get_window_stats``
    for the ``X-RateLimit-*`` headers (two round trips)."""

    def __init__(self, app: App, *, limiter: MovingWindowRateLimiter) -> None:
        self.app = app
        self.limiter = limiter
        self.item = parse_limit(LIMIT)
        self.amount = str(self.item.amount).encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        who = scope["client"][0]
        allowed = await self.limiter.hit(self.item, who)
        stats = await self.limiter.get_window_stats(self.item, who)
        headers = [
            (b"x-ratelimit-limit", self.amount),
            (b"x-ratelimit-remaining", str(stats.remaining).encode()),
            (b"x-ratelimit-reset", str(int(stats.reset_time)).encode()),
        ]
        if not allowed:
            retry = max(1, int(stats.reset_time - time.time()) + 1)
            await too_many(send, [*headers, (b"retry-after", str(retry).encode())])
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- our own Redis -----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def own_redis(binary: str, cpu: int | None = None, timeout: float = 10.0) -> Iterator[str]:
    """A throwaway ``redis-server`` on a free loopback port, no persistence (pinned to
    ``cpu`` when given); stopped, and its directory removed, on the way out whatever
    happens."""
    workdir = tempfile.mkdtemp(prefix="ksbench-redis-")
    port = free_port()
    command = [
        binary,
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--save", "",
        "--appendonly", "no",
        "--dir", workdir,
        "--loglevel", "warning",
    ]  # fmt: skip
    log = open(os.path.join(workdir, "redis.log"), "wb")  # noqa: SIM115
    pin = None if cpu is None else functools.partial(os.sched_setaffinity, 0, {cpu})
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, preexec_fn=pin)
    try:
        url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer in time") from None
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
        shutil.rmtree(workdir, ignore_errors=True)


# -- contenders --------------------------------------------------------------------------------


@dataclass
class Contender:
    label: str
    short: str
    app: App
    template: dict[str, Any]
    status: int
    window_keys: list[str] = field(default_factory=list)  # cleared before every round
    round_trips: Callable[[], int] | None = None  # the limiter's own counter, when it has one
    lua: frozenset[str] = frozenset()  # the commands its script runs inside Redis
    sequential: list[float] = field(default_factory=list)  # µs per request, per round
    concurrent: list[float] = field(default_factory=list)  # requests per second, per round
    # this process's CPU µs per request in regime (b), per round: against the wall's µs, how
    # long the app sat waiting (on Redis) with 64 requests in flight
    concurrent_cpu: list[float] = field(default_factory=list)
    trips: int = 0  # round trips counted during the timed runs
    served: int = 0
    templates: list[dict[str, Any]] = field(default_factory=list)  # one per key, or none
    window_prefix: str | None = None  # its window names, when they are found by prefix
    calls: int = 0

    def scope(self) -> dict[str, Any]:
        """The next request's scope: the keys (or addresses) in turn, else the template."""
        if not self.templates:
            return fresh(self.template)
        self.calls += 1
        return fresh(self.templates[self.calls % len(self.templates)])

    @property
    def micros(self) -> float:
        return statistics.median(self.sequential)

    @property
    def rate(self) -> float:
        return statistics.median(self.concurrent)


def limited_scope(authorization: bytes | None) -> dict[str, Any]:
    scope = http_scope(authorization)
    scope["headers"] = [*scope["headers"], (b"origin", ORIGIN)]
    return scope


async def client_key(gate: Keystile, name: str, limit: str) -> Any:
    """A client key limited to ``limit``, allowed from ``ORIGIN``; the created key."""
    fields = {
        "name": name,
        "type": "client",
        "scopes": ["vec:read"],
        "rate_limit": limit,
        "address_rate_limit": limit,  # the key's own window is the subject: one address
    }
    return await gate.manager.create({**fields, "allowed_origins": [ORIGIN.decode()]})


def address(number: int) -> str:
    return f"10.{number >> 16 & 255}.{number >> 8 & 255}.{number & 255}"


async def spread(gate: Keystile, contenders: list[Contender], keys: int, namespace: str) -> None:
    """With ``--keys N``: keystile calls with N client keys in turn, `limits` and slowapi
    (keyed by the client's address) see N addresses in turn: N windows each. The other
    contenders keep their one key."""
    limiter = gate.limiter
    assert isinstance(limiter, RedisLimiter)
    windows = limit_set(LIMIT, "client")
    created = []
    for start in range(0, keys, 50):  # 50 at a time: the store pool's size
        batch = (
            client_key(gate, f"bench-{n}", LIMIT) for n in range(start, min(start + 50, keys))
        )
        created += await asyncio.gather(*batch)
    for contender in contenders:
        if contender.short == "keystile":
            contender.templates = [
                limited_scope(bearer(c.secret.get_secret_value())) for c in created
            ]
            contender.window_keys = [limiter.window_key(c.key.id, windows, 0) for c in created]
            contender.label = f"keystile, {keys:,} client keys in turn"
        elif contender.short in ("limits", "slowapi"):
            template = contender.template
            contender.templates = [
                {**template, "client": (address(n), 40000)} for n in range(keys)
            ]
            contender.window_prefix = f"{namespace}-{contender.short}*"
            contender.window_keys = []
            contender.label += f", {keys:,} addresses in turn"
    for contender in contenders:  # every key once: keystile has seen (and cached) them all
        for _ in range(len(contender.templates)):
            await contender.app(contender.scope(), receive, discard)


async def build(url: str, namespace: str, opened: list[Any], keys: int = 1) -> list[Contender]:
    """The contenders, each checked once. What needs closing goes into ``opened``; every
    Redis key they write starts with ``namespace``."""
    bare = Contender("bare Starlette app", "bare", make_app(), limited_scope(None), 200)
    contenders = [bare]

    store = RedisStore.from_url(url, namespace=namespace, client_name=namespace)
    gate = Keystile(store=store, secret=SECRET)
    opened.append(gate)
    await gate.startup()
    created = await client_key(gate, "bench", LIMIT)
    over = await client_key(gate, "over", OVER_LIMIT)
    limiter = gate.limiter
    keystile_app = make_app([Middleware(KeystileMiddleware, gate=gate)])
    assert isinstance(limiter, RedisLimiter)
    windows = limit_set(LIMIT, created.key.type.value)
    window_key = limiter.window_key(created.key.id, windows, 0)

    def trips() -> int:
        return limiter.round_trips

    contenders.append(
        Contender(
            "keystile, client key (Redis store, RedisLimiter)",
            "keystile",
            keystile_app,
            limited_scope(bearer(created.secret.get_secret_value())),
            200,
            [window_key],
            trips,
            KEYSTILE_LUA,
        )
    )

    # The same limiter on redis-py (lean=False): what the lean connection changes, in
    # the same run. A gate of its own over the same namespace, with a key of its own.
    old_store = RedisStore.from_url(url, namespace=namespace, client_name=namespace)
    old_limiter = RedisLimiter(old_store.client, namespace=namespace, lean=False)
    old_gate = Keystile(store=old_store, secret=SECRET, limiter=old_limiter)
    opened.append(old_gate)
    await old_gate.startup()
    old_key = await client_key(old_gate, "bench-redis-py", LIMIT)
    contenders.append(
        Contender(
            "keystile, client key, limiter on redis-py (lean=False)",
            "keystile redis-py",
            make_app([Middleware(KeystileMiddleware, gate=old_gate)]),
            limited_scope(bearer(old_key.secret.get_secret_value())),
            200,
            [old_limiter.window_key(old_key.key.id, windows, 0)],
            lambda: old_limiter.round_trips,
            KEYSTILE_LUA,
        )
    )

    storage = RedisStorage(
        "async+" + url, implementation="redispy", key_prefix=f"{namespace}-limits"
    )
    opened.append(storage)
    limits_app = make_app([Middleware(LimitsDirect, limiter=MovingWindowRateLimiter(storage))])
    contenders.append(
        Contender(
            "limits MovingWindowRateLimiter, async RedisStorage",
            "limits",
            limits_app,
            limited_scope(None),
            200,
            lua=LIMITS_LUA,
        )
    )

    try:
        from slowapi import Limiter
        from slowapi.middleware import SlowAPIASGIMiddleware
        from slowapi.util import get_remote_address
    except ImportError:
        print("skipping slowapi: not installed (pip install -e '.[bench]')")
    else:
        slow = Limiter(
            key_func=get_remote_address,
            default_limits=[LIMIT],
            headers_enabled=True,
            strategy="moving-window",
            storage_uri=url,
            storage_options={"key_prefix": f"{namespace}-slowapi"},
        )
        slow_app = make_app([Middleware(SlowAPIASGIMiddleware)])
        slow_app.state.limiter = slow
        contenders.append(
            Contender(
                "slowapi (SlowAPIASGIMiddleware, headers on)",
                "slowapi",
                slow_app,
                limited_scope(None),
                200,
                lua=LIMITS_LUA,
            )
        )

    client = aioredis.Redis.from_url(url)
    opened.append(client)
    sha = await client.script_load(LOWER_BOUND_SCRIPT)
    lower_key = f"{namespace}:lb:127.0.0.1"
    contenders.append(
        Contender(
            "(lower bound) one EVALSHA per request, pure ASGI",
            "lower bound",
            make_app([Middleware(LowerBound, client=client, sha=sha, key=lower_key)]),
            limited_scope(None),
            200,
            [lower_key],
            lua=LOWER_BOUND_LUA,
        )
    )

    lean = lean_connection(client)
    assert lean is not None
    opened.append(lean)
    floor_key = f"{namespace}:lb:raw"
    contenders.append(
        Contender(
            "(floor) the same EVALSHA on a raw asyncio socket",
            "raw floor",
            make_app([Middleware(RawSocketFloor, lean=lean, sha=sha, key=floor_key)]),
            limited_scope(None),
            200,
            [floor_key],
            lambda: lean.writes,
            LOWER_BOUND_LUA,
        )
    )

    refused = Contender(
        "keystile 429: key over its 1/minute",
        "keystile 429",
        keystile_app,
        limited_scope(bearer(over.secret.get_secret_value())),
        429,
        [],
        trips,
        KEYSTILE_LUA,
    )
    contenders.append(refused)

    # Check each contender once; the over-limit key is admitted once first, then refused.
    status, body = await call_once(refused.app, refused.template)
    if status != 200:
        raise RuntimeError(f"the over-limit key's first request: expected 200, got {status}")
    for contender in contenders:
        status, body = await call_once(contender.app, contender.template)
        if status != contender.status:
            raise RuntimeError(
                f"{contender.label}: expected {contender.status}, got {status} {body[:200]!r}"
            )
    # Find the window keys the libraries made (their naming is theirs): by prefix.
    sync = redis.Redis.from_url(url)
    try:
        for contender in contenders:
            if contender.short not in ("limits", "slowapi"):
                continue
            prefix = f"{namespace}-{contender.short}"
            contender.window_keys = [
                name.decode() for name in sync.scan_iter(match=f"{prefix}*", count=1000)
            ]
            if not contender.window_keys:
                raise RuntimeError(f"{contender.label}: no window key under {prefix}")
    finally:
        sync.close()
    if keys > 1:
        await spread(gate, contenders, keys, namespace)
    return contenders


# -- the run ------------------------------------------------------------------------------------

# Each regime's running cycle (by short name): keystile next to what it is judged against —
# the lower bound in (a), the 429 path next to the bare app; limits and slowapi in (b).
CYCLE_SEQUENTIAL = (
    "lower bound", "keystile", "keystile redis-py", "limits", "slowapi", "raw floor",
    "bare", "keystile 429",
)  # fmt: skip
CYCLE_CONCURRENT = (
    "limits", "keystile", "slowapi", "keystile redis-py", "lower bound", "raw floor",
    "bare", "keystile 429",
)  # fmt: skip


def running_cycle(contenders: list[Contender], shorts: tuple[str, ...]) -> list[Contender]:
    """The contenders in the order of ``shorts`` (those not running left out; any not named
    there at the end)."""
    by_short = {c.short: c for c in contenders}
    named = [by_short[s] for s in shorts if s in by_short]
    return named + [c for c in contenders if c.short not in shorts]


def paired_text(numerator: list[float], denominator: list[float], unit: str) -> tuple[float, str]:
    """The paired figure and how it reads: its quartiles and the ratio of the medians (the
    medians in ``unit``: "µs" or "req/s")."""
    ratio, low, high = paired(numerator, denominator)
    top, bottom = statistics.median(numerator), statistics.median(denominator)
    medians = f"{top:.1f} / {bottom:.1f}" if unit == "µs" else f"{top:,.0f} / {bottom:,.0f}"
    return ratio, (
        f"{ratio:.2f} (paired: median of {len(numerator)} per-round ratios, quartiles "
        f"{low:.2f} .. {high:.2f}; ratio of the medians {medians} {unit} = {top / bottom:.2f})"
    )


def clear_windows(sync: redis.Redis, contenders: list[Contender]) -> None:
    """A never-refusing limit never trims its list: start every round from empty windows,
    so each list holds at most one round's admissions and no contender pays for the last."""
    names = [name for c in contenders for name in c.window_keys]
    for c in contenders:
        if c.window_prefix is not None:
            names += [n.decode() for n in sync.scan_iter(match=c.window_prefix, count=1000)]
    for start in range(0, len(names), 1000):
        sync.delete(*names[start : start + 1000])


async def timed(contender: Contender, run: Callable[[], Awaitable[None]]) -> float:
    gc.collect()
    await asyncio.sleep(0)  # let background tasks (the events listener) run in between
    trips = contender.round_trips() if contender.round_trips else 0
    began = time.perf_counter_ns()
    await run()
    elapsed = time.perf_counter_ns() - began
    if contender.round_trips:
        contender.trips += contender.round_trips() - trips
    return elapsed / 1e9


async def sequential_round(contenders: list[Contender], requests: int, record: bool) -> None:
    for contender in contenders:  # in the round's running order
        scopes = [contender.scope() for _ in range(requests)]
        app = contender.app

        async def run(app: App = app, scopes: list[dict[str, Any]] = scopes) -> None:
            for scope in scopes:
                await app(scope, receive, discard)

        seconds = await timed(contender, run)
        if record:
            contender.sequential.append(seconds / requests * 1e6)
            contender.served += requests


async def concurrent_round(contenders: list[Contender], batches: int, record: bool) -> None:
    for contender in contenders:  # in the round's running order
        work = [[contender.scope() for _ in range(IN_FLIGHT)] for _ in range(batches)]
        app = contender.app

        cpu = [0.0]

        async def run(
            app: App = app, work: list[list[dict[str, Any]]] = work, cpu: list[float] = cpu
        ) -> None:
            began = time.process_time()
            for batch in work:
                await asyncio.gather(*[app(scope, receive, discard) for scope in batch])
            cpu[0] = time.process_time() - began

        seconds = await timed(contender, run)
        if record:
            contender.concurrent.append(batches * IN_FLIGHT / seconds)
            contender.concurrent_cpu.append(cpu[0] / (batches * IN_FLIGHT) * 1e6)
            contender.served += batches * IN_FLIGHT


async def check_concurrent(contender: Contender) -> None:
    """One batch of 64 in flight, every answer kept: all must get the expected status."""
    statuses: list[int] = []

    def keeper() -> Callable[[dict[str, Any]], Awaitable[None]]:
        async def keep(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        return keep

    await asyncio.gather(
        *[contender.app(contender.scope(), receive, keeper()) for _ in range(IN_FLIGHT)]
    )
    wrong = [s for s in statuses if s != contender.status]
    if wrong or len(statuses) != IN_FLIGHT:
        raise RuntimeError(f"{contender.label}: {IN_FLIGHT} in flight answered {statuses}")


def usage_recorders(opened: list[Any]) -> list[Any]:
    """Keystile's usage recorders (when this keystile has them)."""
    found = (getattr(thing, "usage", None) for thing in opened if isinstance(thing, Keystile))
    return [usage for usage in found if usage is not None]


async def flush_usage(opened: list[Any]) -> None:
    for usage in usage_recorders(opened):
        await usage.flush()


def usage_flushes(opened: list[Any]) -> int:
    return sum(usage.flushes for usage in usage_recorders(opened))


@dataclass
class Count:
    requests: int
    delta: dict[str, int]  # the commands while the requests ran
    lua: frozenset[str]
    trips: int | None  # the limiter's round trips, when it counts them
    flushes: int  # keystile usage flushes while the requests ran (its timer's: rare)
    flush: dict[str, int]  # the commands of the usage flush right after them

    @property
    def sent(self) -> float:
        """Commands on the wire per request (PINGs left out)."""
        sent = sum(n for name, n in self.delta.items() if name not in self.lua | {"ping"})
        return sent / self.requests

    @property
    def in_lua(self) -> float:
        return sum(n for name, n in self.delta.items() if name in self.lua) / self.requests

    @property
    def round_trips(self) -> float:
        # Without pipelining every command sent is one round trip; keystile's limiter counts
        # its own.
        if self.trips is None:
            return self.sent
        return self.trips / self.requests


async def count_commands(
    sync: redis.Redis, contender: Contender, requests: int, concurrent: bool, opened: list[Any]
) -> Count:
    """INFO commandstats over ``requests`` requests of one contender, nothing else running
    in this process (a keystile events-channel PING may land in the window). Keystile's usage
    recorder is flushed just before the window, and right after it in a window of its own:
    the counts of these requests, which its timer writes once a second."""
    if concurrent:
        batches = max(1, requests // IN_FLIGHT)
        requests = batches * IN_FLIGHT
        work = [[contender.scope() for _ in range(IN_FLIGHT)] for _ in range(batches)]
    else:
        work = [[contender.scope()] for _ in range(requests)]
    await flush_usage(opened)
    flushes = usage_flushes(opened)
    trips = contender.round_trips() if contender.round_trips else 0
    before = command_counts(sync)
    for batch in work:
        if len(batch) == 1:
            await contender.app(batch[0], receive, discard)
        else:
            await asyncio.gather(*[contender.app(s, receive, discard) for s in batch])
    during = command_counts(sync)
    made = contender.round_trips() - trips if contender.round_trips else None
    flushes = usage_flushes(opened) - flushes
    await flush_usage(opened)
    flush = command_delta(during, command_counts(sync))
    delta = command_delta(before, during)
    return Count(requests, delta, contender.lua, made, flushes, flush)


async def main(args: argparse.Namespace) -> int:
    # The 429 contender refuses every request on purpose: keystile's error-rate alert (a log
    # warning) would fire for it.
    logging.getLogger("keystile.alerts").setLevel(logging.ERROR)
    rounds, requests, batches = args.rounds, args.requests, args.batches
    if args.quick:
        rounds, requests, batches = min(rounds, 4), min(requests, 150), min(batches, 3)
        args.count_requests = min(args.count_requests, 256)

    server_cpu = None
    if args.pin != "none":
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[0]})
        server_cpu = cpus[0] if args.pin == "same" else cpus[1]
    if args.redis_url is not None:
        with_server: Any = _given(args.redis_url)
        where = f"the Redis at {args.redis_url} (commands from its other clients count too)"
    elif (binary := shutil.which("redis-server")) is not None:
        with_server = own_redis(binary, server_cpu)
        where = "a redis-server of its own on a free loopback port (--save '' --appendonly no)"
    else:
        url = "redis://127.0.0.1:6379/0"
        with_server = _given(url)
        where = f"no redis-server binary: the Redis at {url} (other clients' commands count)"
        server_cpu = None  # not ours to pin
    if args.pin != "none":
        where += f"; this process pinned to CPU {min(os.sched_getaffinity(0))}"
        if server_cpu is not None:
            where += f", redis-server to CPU {server_cpu}"

    with with_server as url:
        namespace = f"ksbench-{os.getpid()}-{secrets.token_hex(4)}"
        sync = redis.Redis.from_url(url)
        version = sync.info("server")["redis_version"]
        opened: list[Any] = []
        try:
            contenders = await build(url, namespace, opened, args.keys)
            by_short = {c.short: c for c in contenders}
            for contender in contenders:
                await check_concurrent(contender)

            # Redis commands per request, each contender alone: one request at a time, then
            # 64 in flight.
            clear_windows(sync, contenders)
            counts: dict[str, tuple[Count, Count]] = {}
            for contender in contenders:
                one = await count_commands(sync, contender, args.count_requests, False, opened)
                many = await count_commands(sync, contender, args.count_requests, True, opened)
                counts[contender.short] = (one, many)

            # Warm-up round (not recorded), then the measured rounds: regime (a) then (b),
            # each in its cycle's order for the round (rotated, backwards every other cycle).
            clear_windows(sync, contenders)
            await sequential_round(contenders, max(requests // 4, 20), record=False)
            await concurrent_round(contenders, 1, record=False)
            for contender in contenders:
                contender.trips = 0
            one_at_a_time = running_cycle(contenders, CYCLE_SEQUENTIAL)
            in_flight = running_cycle(contenders, CYCLE_CONCURRENT)
            began = time.monotonic()
            for number in range(rounds):
                clear_windows(sync, contenders)
                await sequential_round(order(one_at_a_time, number), requests, record=True)
                clear_windows(sync, contenders)
                await concurrent_round(order(in_flight, number), batches, record=True)
            wall = time.monotonic() - began

            report(
                contenders,
                by_short,
                counts,
                rounds,
                requests,
                batches,
                wall,
                where,
                version,
                args.keys,
            )
            return 0
        finally:
            for thing in reversed(opened):
                await _close(thing)
            names = list(sync.scan_iter(match=f"{namespace}*", count=1000))
            if names:
                sync.delete(*names)
            sync.close()


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


async def _close(thing: Any) -> None:
    if isinstance(thing, Keystile | aioredis.Redis):
        await thing.aclose()
    elif isinstance(thing, LeanRedis):
        thing.close()
    else:  # limits' RedisStorage: close its redis.asyncio client
        client = getattr(getattr(thing, "bridge", None), "storage", None)
        if isinstance(client, aioredis.Redis):
            await client.aclose()


def report(
    contenders: list[Contender],
    by_short: dict[str, Contender],
    counts: dict[str, tuple[Count, Count]],
    rounds: int,
    requests: int,
    batches: int,
    wall: float,
    where: str,
    version: str,
    keys: int = 1,
) -> None:
    width = max(len(c.label) for c in contenders)
    bare = by_short["bare"]
    lower = by_short["lower bound"]
    keystile = by_short["keystile"]
    refused = by_short["keystile 429"]

    print(
        f"\nRate limiting in Redis, raw ASGI in process, {keys:,} key(s): {rounds} interleaved "
        f"rounds ({wall:.1f} s); limit {LIMIT} (never refuses), window lists emptied every round; "
        f"Python {sys.version.split()[0]}, Redis {version} ({where})"
    )

    print(f"\n(a) one request at a time: {requests} sequential requests per contender per round")
    header = (
        f"{'#':>2}  {'contender':<{width}}  {'median µs':>9}  {'min µs':>7}  "
        f"{'x lower bound':>13}  {'x bare':>6}  {'status':>6}"
    )
    print(header)
    print("-" * len(header))
    for number, c in enumerate(contenders, 1):
        print(
            f"{number:>2}  {c.label:<{width}}  {c.micros:>9.1f}  {min(c.sequential):>7.1f}  "
            f"{c.micros / lower.micros:>13.2f}  {c.micros / bare.micros:>6.2f}  {c.status:>6}"
        )

    print(
        f"\n(b) {IN_FLIGHT} requests in flight: {batches} batches of asyncio.gather({IN_FLIGHT} "
        f"calls) per contender per round"
    )
    header = (
        f"{'#':>2}  {'contender':<{width}}  {'median req/s':>12}  {'max req/s':>9}  "
        f"{'µs/req':>6}  {'CPU µs/req':>10}  {'keystile ÷ this':>14}  {'status':>6}"
    )
    print(header)
    print("-" * len(header))
    for number, c in enumerate(contenders, 1):
        print(
            f"{number:>2}  {c.label:<{width}}  {c.rate:>12,.0f}  {max(c.concurrent):>9,.0f}  "
            f"{1e6 / c.rate:>6.1f}  {statistics.median(c.concurrent_cpu):>10.1f}  "
            f"{keystile.rate / c.rate:>14.2f}  {c.status:>6}"
        )
    print(
        "  CPU µs/req: this process's CPU per request (the median over rounds); below µs/req,"
        " the app sat waiting (on Redis)"
    )

    print(
        "\nRedis commands per request (INFO commandstats deltas, each contender alone, "
        f"{counts['bare'][0].requests} requests one at a time / "
        f"{counts['bare'][1].requests} as batches of {IN_FLIGHT}):"
    )
    header = (
        f"{'#':>2}  {'contender':<{width}}  {'sent':>5}  {'in Lua':>6}  "
        f"{'round trips':>11}  {'sent|64':>7}  {'trips|64':>8}  commands, one at a time"
    )
    print(header)
    print("-" * len(header))
    for number, c in enumerate(contenders, 1):
        one, many = counts[c.short]
        flushed = f" [its usage timer flushed {one.flushes}x meanwhile]" if one.flushes else ""
        print(
            f"{number:>2}  {c.label:<{width}}  {one.sent:>5.2f}  {one.in_lua:>6.2f}  "
            f"{one.round_trips:>11.3f}  {many.sent:>7.2f}  {many.round_trips:>8.3f}  "
            f"{describe(one.delta)}{flushed}"
        )
    print(
        "  sent: commands on the wire; in Lua: commands the scripts ran inside Redis; round "
        "trips: keystile's limiter counts\n  its own, the others send no pipeline (one "
        "command = one round trip); |64: with 64 in flight. PINGs (keystile's\n  "
        "events-channel heartbeat) are left out."
    )
    for c in (keystile, refused):
        one, _ = counts[c.short]
        if one.flush:
            print(
                f"  {c.short}: its usage counts, written once a second, took "
                f"{sum(one.flush.values())} commands for these {one.requests} requests "
                f"({describe(one.flush)})"
            )
    served = refused.served or 1
    print(
        f"  keystile 429 path over the whole timed run: {refused.trips} limiter round trips "
        f"over {refused.served} requests = {refused.trips / served:.5f}/request (the "
        "1/minute window frees once a minute:\n  then one request is admitted and the next "
        "refusal asks Redis once)"
    )

    print(
        "\nTargets (paired: the median of the per-round ratios of two contenders' figures "
        "measured in the same round;\n  their quartiles, and for reference the ratio of the "
        "medians, beside it):"
    )
    ratio, text = paired_text(keystile.sequential, lower.sequential, "µs")
    print(
        f"  (a) keystile / lower bound, µs per request = {text} <= 1.10: {verdict(ratio <= 1.10)}"
    )
    floor = by_short["raw floor"]
    old = by_short["keystile redis-py"]
    print(
        f"      (for reference, by medians: {ratio_of(keystile, floor):.2f} x the same EVALSHA "
        f"on a raw asyncio socket, {floor.micros:.1f} µs; the limiter on redis-py, "
        f"lean=False: {old.micros:.1f} µs = {old.micros / lower.micros:.2f} x the lower bound)"
    )
    if "slowapi" in by_short:
        slow = by_short["slowapi"]
        ratio, text = paired_text(keystile.concurrent, slow.concurrent, "req/s")
        print(f"  (b) keystile / slowapi, req/s = {text} >= 3: {verdict(ratio >= 3)}")
    else:
        print("  (b) keystile / slowapi: skipped (slowapi not installed)")
    lim = by_short["limits"]
    ratio, text = paired_text(keystile.concurrent, lim.concurrent, "req/s")
    print(f"  (b) keystile / limits direct, req/s = {text} >= 2: {verdict(ratio >= 2)}")
    ratio, text = paired_text(refused.sequential, bare.sequential, "µs")
    print(f"  (a) keystile 429 / bare, µs per request = {text} <= 2: {verdict(ratio <= 2)}")
    one, _ = counts["keystile 429"]
    commands = round((one.sent + one.in_lua) * one.requests)
    trips = one.trips or 0
    timer = f" (its usage timer flushed {one.flushes}x meanwhile)" if one.flushes else ""
    print(
        f"  keystile 429 path: {trips} limiter round trips and {commands} Redis commands over "
        f"{one.requests} requests{timer} = 0: {verdict(commands == 0 and trips == 0)}"
    )


def ratio_of(one: Contender, other: Contender) -> float:
    return one.micros / other.micros


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=40, help="measured rounds (default 40)")
    parser.add_argument(
        "--requests",
        type=int,
        default=1000,
        help="(a) sequential requests per contender per round (default 1000)",
    )
    parser.add_argument(
        "--batches",
        type=int,
        default=20,
        help=f"(b) batches of {IN_FLIGHT} per contender per round (default 20)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: at most 4 rounds of 150 requests and 3 batches",
    )
    parser.add_argument(
        "--count-requests",
        type=int,
        default=1024,
        help="requests over which Redis commands are counted (default 1024)",
    )
    parser.add_argument(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting a redis-server of our own",
    )
    parser.add_argument(
        "--pin",
        choices=("none", "same", "split"),
        default="none",
        help="Linux: pin this process to one CPU and its redis-server to the same CPU (same) "
        "or to another (split); default none: wherever the scheduler puts them",
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=1,
        help="keystile calls with this many client keys in turn, limits and slowapi see as "
        "many addresses (default 1)",
    )
    args = parser.parse_args(argv)
    if args.pin != "none" and not hasattr(os, "sched_setaffinity"):
        parser.error("--pin needs Linux (os.sched_setaffinity)")
    if args.pin != "none" and args.redis_url is not None:
        parser.error("--pin only applies to the redis-server this script starts")
    if args.pin == "split" and len(os.sched_getaffinity(0)) < 2:
        parser.error("--pin split needs two CPUs")
    if min(args.rounds, args.requests, args.batches, args.count_requests, args.keys) < 1:
        parser.error(
            "--rounds, --requests, --batches, --count-requests and --keys must be positive"
        )
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
