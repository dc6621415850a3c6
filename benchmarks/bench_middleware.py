"""Per-request cost of keystile's middleware, in process, against the bare app and the
do-it-yourself baselines.

Every contender is the same Starlette app (one route, ``GET /cloud/vec/databases``
returning a small JSON body) plus one middleware. The apps are called as raw ASGI: a
prebuilt scope, a ``receive`` returning one ``http.request``, a ``send`` that discards —
no HTTP client, no server, no sockets in the loop. Contenders run interleaved, round by
round (each round starting one contender further on), so drift hits all alike; each
figure is the median over rounds of the mean per-request time within a round.

It also counts the Redis commands the Redis-backed contender sends per request, from
``INFO commandstats`` deltas.

    python benchmarks/bench_middleware.py                  # about a minute
    python benchmarks/bench_middleware.py --quick          # a few seconds
    python benchmarks/bench_middleware.py --rounds 40 --requests-per-round 3000

Needs Redis at ``--redis-url`` (default redis://127.0.0.1:6379/0) for the Redis
contender; without one, that contender is skipped. Writes only under a fresh
``ksbench-*`` namespace, and deletes it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import redis
from starlette.authentication import AuthCredentials, SimpleUser
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from apps import KEY_SETTINGS, PATH, SCOPES, SECRET, DictBackend, DictKey, make_app
from keystile import RedisStore
from keystile.gate import Keystile
from keystile.middleware import KeystileMiddleware

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]

# -- raw ASGI plumbing ------------------------------------------------------------------------

_REQUEST = {"type": "http.request", "body": b"", "more_body": False}


async def receive() -> dict[str, Any]:
    return _REQUEST


async def discard(message: dict[str, Any]) -> None:
    return None


def http_scope(authorization: bytes | None) -> dict[str, Any]:
    """What a server hands the app for ``GET /cloud/vec/databases`` from a typical client."""
    headers = [
        (b"host", b"127.0.0.1:8000"),
        (b"user-agent", b"python-httpx/0.28.1"),
        (b"accept", b"*/*"),
        (b"accept-encoding", b"gzip, deflate"),
        (b"connection", b"keep-alive"),
    ]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 54321),
        "scheme": "http",
        "method": "GET",
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": headers,
        "state": {},
    }


async def call_once(app: App, template: dict[str, Any]) -> tuple[int, bytes]:
    """One request, keeping the response: status and body."""
    status, body = 0, b""

    async def keep(message: dict[str, Any]) -> None:
        nonlocal status, body
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body":
            body += message.get("body", b"")

    await app(fresh(template), receive, keep)
    return status, body


def fresh(template: dict[str, Any]) -> dict[str, Any]:
    # Middleware and Starlette write into the scope: every request gets its own dict.
    scope = dict(template)
    scope["state"] = {}
    return scope


# -- the same dict lookup in a BaseHTTPMiddleware (the backend is in apps.py) --------------


def dict_dispatch(tokens: dict[str, DictKey]) -> Callable[..., Awaitable[Response]]:
    """The same dict lookup as a ``BaseHTTPMiddleware`` dispatch function."""

    async def dispatch(request: Request, call_next: RequestResponseEndpoint) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        key = tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if key is None:
            return JSONResponse({"error": "invalid_api_key"}, status_code=401)
        request.scope["auth"] = AuthCredentials(list(key.scopes))
        request.scope["user"] = SimpleUser(key.name)
        return await call_next(request)

    return dispatch


class PassThrough:
    """A pure-ASGI middleware that does nothing: the floor any middleware layer costs."""

    def __init__(self, app: App) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


# -- contenders --------------------------------------------------------------------------------


@dataclass
class Contender:
    label: str
    app: App
    template: dict[str, Any]
    status: int  # the status every request of this contender must get
    samples: list[float] = field(default_factory=list)  # µs per request, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def bad_checksum(token: str) -> str:
    """The token with its last checksum character changed: well-formed, wrong checksum."""
    last = token[-1]
    return token[:-1] + ("A" if last != "A" else "B")


async def redis_gate(url: str, namespace: str) -> Keystile | str:
    """A keystile on the real Redis, subscribed to its change announcements; or why not."""
    store = RedisStore.from_url(url, namespace=namespace, client_name=namespace)
    try:
        await store.ping()
    except Exception as exc:
        await store.close()
        return f"{type(exc).__name__}: {exc}"
    gate = Keystile(store=store, secret=SECRET)
    if not await gate.store.start():
        print("warning: the Redis events channel is not up; the cache TTL still applies")
    return gate


def bearer(token: str) -> bytes:
    return b"Bearer " + token.encode()


# -- counting Redis commands -------------------------------------------------------------------


def command_counts(client: redis.Redis) -> dict[str, int]:
    stats = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): int(value["calls"])
        for name, value in stats.items()
        if name.startswith("cmdstat_")
    }


def command_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """Commands sent between two readings, less the INFO readings themselves. Counts every
    client of the server: run it on a Redis nothing else is busy with."""
    delta = {
        name: after.get(name, 0) - before.get(name, 0)
        for name in after
        if name != "info" and after.get(name, 0) != before.get(name, 0)
    }
    return {name: count for name, count in sorted(delta.items()) if count}


def describe(delta: dict[str, int]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in delta.items()) or "none"


# -- the run ------------------------------------------------------------------------------------


async def timed(contender: Contender, requests: int) -> float:
    """µs per request over ``requests`` sequential requests of one contender."""
    scopes = [fresh(contender.template) for _ in range(requests)]
    app = contender.app
    gc.collect()
    await asyncio.sleep(0)  # let background tasks (the events listener) run in between
    began = time.perf_counter_ns()
    for scope in scopes:
        await app(scope, receive, discard)
    return (time.perf_counter_ns() - began) / requests / 1000


async def run_round(contenders: list[Contender], start: int, requests: int) -> None:
    order = contenders[start:] + contenders[:start]
    for contender in order:
        contender.samples.append(await timed(contender, requests))


async def paired(a: Contender, b: Contender, blocks: int, requests: int) -> list[float]:
    """a's time ÷ b's, block by block: each block times ``requests`` of one, then of the
    other right after (which goes first alternates), so both meet the same moment of a
    noisy machine; one ratio per block."""
    ratios = []
    for block in range(blocks):
        first, second = (a, b) if block % 2 == 0 else (b, a)
        one, two = await timed(first, requests), await timed(second, requests)
        ratios.append(one / two if first is a else two / one)
    return ratios


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


async def main(args: argparse.Namespace) -> int:
    rounds, per_round = args.rounds, args.requests_per_round
    if args.quick:
        rounds, per_round = min(rounds, 8), min(per_round, 500)
        args.count_requests = min(args.count_requests, 2000)

    memory = Keystile(store="memory://", secret=SECRET)
    created = await memory.manager.create(KEY_SETTINGS)
    token = created.secret.get_secret_value()
    tokens = {token: DictKey("bench", SCOPES)}

    namespace = f"ksbench-{os.getpid()}-{secrets.token_hex(4)}"
    rgate = await redis_gate(args.redis_url, namespace)
    sync_redis = None if isinstance(rgate, str) else redis.Redis.from_url(args.redis_url)
    try:
        ok = bearer(token)
        contenders = [
            Contender("bare Starlette app", make_app(), http_scope(ok), 200),
            Contender(
                "AuthenticationMiddleware + dict backend",
                make_app([Middleware(AuthenticationMiddleware, backend=DictBackend(tokens))]),
                http_scope(ok),
                200,
            ),
            Contender(
                "BaseHTTPMiddleware + dict lookup",
                make_app([Middleware(BaseHTTPMiddleware, dispatch=dict_dispatch(tokens))]),
                http_scope(ok),
                200,
            ),
            Contender(
                "keystile, cached prod_ key, memory store",
                make_app([Middleware(KeystileMiddleware, gate=memory)]),
                http_scope(ok),
                200,
            ),
            Contender(
                RECORDING_OFF,
                make_app([Middleware(KeystileMiddleware, gate=memory, record_usage=False)]),
                http_scope(ok),
                200,
            ),
        ]
        redis_contender = None
        if isinstance(rgate, Keystile):
            rcreated = await rgate.manager.create(KEY_SETTINGS)
            rtoken = rcreated.secret.get_secret_value()
            redis_contender = Contender(
                "keystile, cached prod_ key, Redis store",
                make_app([Middleware(KeystileMiddleware, gate=rgate)]),
                http_scope(bearer(rtoken)),
                200,
            )
            contenders.append(redis_contender)
        else:
            print(f"skipping the Redis contender: no Redis at {args.redis_url} ({rgate})")
        refuse_app = make_app([Middleware(KeystileMiddleware, gate=memory)])
        contenders += [
            Contender(
                "keystile refusing a bad-checksum key",
                refuse_app,
                http_scope(bearer(bad_checksum(token))),
                401,
            ),
            Contender("keystile refusing a missing header", refuse_app, http_scope(None), 401),
            Contender(
                "(floor) pure-ASGI pass-through middleware",
                make_app([Middleware(PassThrough)]),
                http_scope(ok),
                200,
            ),
        ]

        # Check every contender answers as it should (this also warms every cache).
        for contender in contenders:
            status, body = await call_once(contender.app, contender.template)
            if status != contender.status:
                print(f"{contender.label}: expected {contender.status}, got {status} {body!r}")
                return 1

        # Redis commands per request, over a fixed count just after the warm-up.
        redis_report: list[str] = []
        lookups_before = 0
        if redis_contender is not None and sync_redis is not None:
            assert isinstance(rgate, Keystile)
            rgate.store.clear()  # one cold request first: shows the counter does count
            before = command_counts(sync_redis)
            await call_once(redis_contender.app, redis_contender.template)
            cold = command_delta(before, command_counts(sync_redis))
            count = args.count_requests
            scopes = [fresh(redis_contender.template) for _ in range(count)]
            before = command_counts(sync_redis)
            for scope in scopes:
                await redis_contender.app(scope, receive, discard)
            misses = rgate.store.misses
            cached = command_delta(before, command_counts(sync_redis))
            misses_in_window = rgate.store.misses - misses
            total = sum(cached.values())
            redis_report += [
                f"  cold request (cache cleared): {sum(cold.values())} commands "
                f"({describe(cold)})",
                f"  cached key: {total} commands over {count} requests = "
                f"{total / count:.4f} commands/request ({describe(cached)})   "
                f"target 0: {verdict(total == 0)}",
            ]
            if total and misses_in_window == 0:
                redis_report.append(
                    "  (no cache miss in that window: those commands came from other clients "
                    "of this Redis)"
                )
            lookups_before = rgate.store.misses

        # Warm-up round (not recorded), then the measured rounds.
        await run_round(contenders, 0, max(per_round // 4, 50))
        for contender in contenders:
            contender.samples.clear()
        began = time.monotonic()
        for number in range(rounds):
            await run_round(contenders, number % len(contenders), per_round)
        wall = time.monotonic() - began

        if isinstance(rgate, Keystile) and redis_contender is not None:
            lookups = rgate.store.misses - lookups_before
            served = rounds * per_round + max(per_round // 4, 50)
            redis_report.append(
                f"  whole timed run: {lookups} store lookups (2 GETs each: the cache TTL of "
                f"{rgate.store.ttl:g} s expiring) over {served} requests = "
                f"{2 * lookups / served:.5f} commands/request"
            )

        # Usage recording on against off, paired block by block (see ``paired``).
        by_label = {c.label: c for c in contenders}
        on, off = by_label[RECORDING_ON], by_label[RECORDING_OFF]
        blocks, per_block = args.ab_blocks, args.ab_requests
        if args.quick:
            blocks, per_block = min(blocks, 10), min(per_block, 500)
        ratios = await paired(on, off, blocks, per_block)

        report(contenders, rounds, per_round, wall, redis_report, (ratios, per_block))
        return 0
    finally:
        await memory.aclose()
        if isinstance(rgate, Keystile):
            await rgate.aclose()
        if sync_redis is not None:
            names = list(sync_redis.scan_iter(match=f"{namespace}:*", count=1000))
            if names:
                sync_redis.delete(*names)
            sync_redis.close()


RECORDING_ON = "keystile, cached prod_ key, memory store"
RECORDING_OFF = "keystile, cached prod_ key, memory store, usage off"


def report(
    contenders: list[Contender],
    rounds: int,
    per_round: int,
    wall: float,
    redis_report: list[str],
    paired_ratios: tuple[list[float], int],
) -> None:
    bare = contenders[0].median
    by_label = {c.label: c for c in contenders}
    print(
        f"\nPer-request cost, raw ASGI in process: {rounds} rounds x {per_round} requests "
        f"per contender, interleaved ({wall:.1f} s); Python {sys.version.split()[0]}"
    )
    width = max(len(c.label) for c in contenders)
    header = (
        f"{'#':>2}  {'contender':<{width}}  {'median µs':>9}  {'min µs':>7}  "
        f"{'x bare':>6}  {'added µs':>8}  {'status':>6}"
    )
    print(header)
    print("-" * len(header))
    for number, contender in enumerate(contenders, 1):
        print(
            f"{number:>2}  {contender.label:<{width}}  {contender.median:>9.2f}  "
            f"{min(contender.samples):>7.2f}  {contender.median / bare:>6.2f}  "
            f"{contender.median - bare:>+8.2f}  {contender.status:>6}"
        )

    if redis_report:
        print("\nRedis commands, keystile with the Redis store (INFO commandstats deltas):")
        print("\n".join(redis_report))

    print("\nTargets:")
    auth_added = by_label["AuthenticationMiddleware + dict backend"].median - bare
    budget = auth_added * 2 / 3
    for label in (
        RECORDING_OFF,
        "keystile, cached prod_ key, memory store",
        "keystile, cached prod_ key, Redis store",
    ):
        if label in by_label:
            added = by_label[label].median - bare
            print(
                f"  {label}: added {added:.2f} µs <= 2/3 of AuthenticationMiddleware's "
                f"{auth_added:.2f} µs = {budget:.2f} µs: {verdict(added <= budget)}"
            )
    on = by_label[RECORDING_ON].median
    off = by_label[RECORDING_OFF].median
    print(
        f"  usage recording: {on:.2f} µs on vs {off:.2f} µs off = +{(on / off - 1) * 100:.1f} % "
        f"<= 10 %: {verdict(on <= off * 1.10)} (and no Redis round trip: it flushes in batches)"
    )
    ratios, per_block = paired_ratios
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    middle = statistics.median(ratios)
    print(
        f"  usage recording, paired: median of {len(ratios)} on/off block ratios "
        f"({per_block} requests each, adjacent in time) = +{(middle - 1) * 100:.1f} % "
        f"(quartiles +{(quartiles[0] - 1) * 100:.1f} % .. +{(quartiles[2] - 1) * 100:.1f} %) "
        f"<= 10 %: {verdict(middle <= 1.10)}"
    )
    success = by_label["keystile, cached prod_ key, memory store"].median
    for label in ("keystile refusing a bad-checksum key", "keystile refusing a missing header"):
        refused = by_label[label].median
        print(
            f"  {label}: {refused:.2f} µs <= success path {success:.2f} µs: "
            f"{verdict(refused <= success)}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="measured rounds (default 50)")
    parser.add_argument(
        "--requests-per-round",
        type=int,
        default=6000,
        help="requests per contender per round (default 6000)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run: at most 8 rounds of 500 requests"
    )
    parser.add_argument(
        "--count-requests",
        type=int,
        default=10_000,
        help="requests over which Redis commands are counted (default 10000)",
    )
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument(
        "--ab-blocks",
        type=int,
        default=200,
        help="paired blocks of recording on / off (default 200)",
    )
    parser.add_argument(
        "--ab-requests",
        type=int,
        default=2000,
        help="requests per contender per paired block (default 2000)",
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.requests_per_round, args.count_requests) < 1 or (
        min(args.ab_blocks, args.ab_requests) < 1
    ):
        parser.error(
            "--rounds, --requests-per-round, --count-requests, --ab-blocks and "
            "--ab-requests must be positive"
        )
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
