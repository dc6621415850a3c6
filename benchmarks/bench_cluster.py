"""Standalone Redis against a Redis Cluster and Redis behind Sentinel, in the same run:
cached, uncached and rate-limited requests through the middleware, and rate-limit
decisions over the lean connection(s) and over redis-py.

Both deployments are this script's own, on free loopback ports, stopped at the end: one
redis-server (tests/faults/redis_server.py) and a cluster of three primaries
(tests/faults/redis_cluster.py) — the same binary, the same machine, nothing else on
them. (``--redis-url`` uses another standalone Redis instead, written under a fresh
``ksbench-*`` namespace, deleted at the end.) Requests are raw ASGI calls (no HTTP
client, no server); each figure is the median over rounds of the mean time per request
(sequential) or per decision (a gather of ``--burst`` at once), the deployments
interleaved round by round.

    python benchmarks/bench_cluster.py            # about a minute
    python benchmarks/bench_cluster.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bench_middleware import bearer, call_once, http_scope
from keystile import Keystile, KeystileSettings
from keystile.middleware import KeystileMiddleware
from keystile.ratelimit import RedisLimiter
from keystile.rates import limit_set
from keystile.redis.connect import close_redis, open_redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from faults.redis_cluster import RedisCluster
from faults.redis_sentinel import Sentinel
from faults.redis_server import RedisServer

SECRET = "bench-server-secret-0123456789abcdef"
Step = Callable[[], Awaitable[None]]


async def endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"databases": ["a", "b"]})


def app_for(gate: Keystile) -> Any:
    return Starlette(
        routes=[Route("/cloud/vec/databases", endpoint)],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )


async def gate_on(url: str, namespace: str) -> Keystile:
    settings = KeystileSettings(namespace=namespace, usage_flush_interval=3600.0)
    gate = Keystile(store=url, secret=SECRET, settings=settings)
    await gate.startup()
    return gate


async def scenarios(gate: Keystile) -> dict[str, Step]:
    """What one request of each kind costs on ``gate``."""
    app = app_for(gate)
    plain = await gate.manager.create({"name": "plain", "type": "dev", "scopes": ["vec:read"]})
    limited = await gate.manager.create(
        {"name": "limited", "type": "dev", "scopes": ["vec:read"], "rate_limit": "1000000/minute"}
    )
    plain_scope = http_scope(bearer(plain.secret.get_secret_value()))
    limited_scope = http_scope(bearer(limited.secret.get_secret_value()))

    async def cached() -> None:
        status, _ = await call_once(app, plain_scope)
        assert status == 200, status

    async def uncached() -> None:
        gate.store.clear()  # every request looks its key up in Redis
        status, _ = await call_once(app, plain_scope)
        assert status == 200, status

    async def rate_limited() -> None:
        status, _ = await call_once(app, limited_scope)
        assert status == 200, status

    return {"cached": cached, "uncached": uncached, "rate-limited": rate_limited}


def decisions(limiter: RedisLimiter, burst: int) -> dict[str, Step]:
    limits = limit_set("1000000/minute", "key")
    keys = [f"key_bench{n}" for n in range(16)]  # spread over the cluster's slots

    async def one() -> None:
        decision = await limiter.hit(keys[0], limits)
        assert decision.allowed and not decision.degraded

    async def together() -> None:
        made = await asyncio.gather(
            *(limiter.hit(keys[n % len(keys)], limits) for n in range(burst))
        )
        assert all(d.allowed and not d.degraded for d in made)

    return {"one at a time": one, f"{burst} at once": together}


async def timed(step: Step, count: int, per: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        await step()
    return (time.perf_counter() - started) / (count * per) * 1e6  # µs


async def compare(
    title: str, sides: dict[str, dict[str, Step]], rounds: int, count: int, per: dict[str, int]
) -> None:
    """Each scenario on every side, interleaved round by round; medians and ratios."""
    names = list(next(iter(sides.values())))
    results: dict[tuple[str, str], list[float]] = {}
    for step in names:  # warm up
        for side in sides.values():
            await timed(side[step], max(1, count // 10), per.get(step, 1))
    for r in range(rounds):
        order = list(sides.items())
        order = order[r % len(order) :] + order[: r % len(order)]
        for step in names:
            for side_name, side in order:
                results.setdefault((side_name, step), []).append(
                    await timed(side[step], count, per.get(step, 1))
                )
    print(f"\n{title} (µs each, median of {rounds} rounds)")
    first = next(iter(sides))
    header = "".join(f"{s:>22}" for s in sides)
    print(f"{'':24}{header}   ratio to {first}")
    for step in names:
        medians = [statistics.median(results[(s, step)]) for s in sides]
        ratios = "  ".join(f"{m / medians[0]:.2f}x" for m in medians[1:])
        print(f"{step:24}" + "".join(f"{m:>22.1f}" for m in medians) + f"   {ratios}")


async def main(args: argparse.Namespace) -> int:
    namespace = "ksbench-" + secrets.token_hex(4)
    cluster = RedisCluster(primaries=3)
    cluster.start()
    master = RedisServer()  # watched by a sentinel: the store reaches it through that
    master.start()
    watcher = Sentinel(master)
    server = None
    if args.redis_url is None:
        server = RedisServer()
        server.start()
        args.redis_url = server.url
    gates: list[Keystile] = []
    clients: list[Any] = []
    limiters: list[RedisLimiter] = []
    try:
        standalone = await gate_on(args.redis_url, namespace)
        clustered = await gate_on(cluster.url, namespace)
        guarded = await gate_on(watcher.store_url, namespace)
        gates += [standalone, clustered, guarded]
        await compare(
            "requests through the middleware",
            {
                "standalone": await scenarios(standalone),
                "cluster": await scenarios(clustered),
                "sentinel": await scenarios(guarded),
            },
            args.rounds,
            args.requests,
            {},
        )
        sides: dict[str, dict[str, Step]] = {}
        deployments = [
            ("standalone", args.redis_url, (True, False)),
            ("cluster", cluster.url, (True, False)),
            ("sentinel", watcher.store_url, (False,)),  # redis-py follows the master
        ]
        for label, url, leans in deployments:
            for lean in leans:
                client = open_redis(url, pool_size=max(50, 2 * args.burst))
                clients.append(client)
                limiter = RedisLimiter(client, namespace=namespace, lean=lean, timeout=2.0)
                limiters.append(limiter)
                await limiter.start()
                assert limiter.lean is lean
                sides[f"{label} {'lean' if lean else 'redis-py'}"] = decisions(limiter, args.burst)
        await compare(
            "rate-limit decisions",
            sides,
            args.rounds,
            max(1, args.requests // args.burst),
            {f"{args.burst} at once": args.burst},
        )
        for limiter in limiters:
            assert limiter.passes == 0
    finally:
        for limiter in limiters:
            await limiter.close()
        for client in clients:
            await close_redis(client)
        for gate in gates:
            await gate.aclose()
        admin = redis.Redis.from_url(args.redis_url)
        names = list(admin.scan_iter(match=f"{namespace}:*", count=1000))
        if names:
            admin.delete(*names)
        admin.close()
        cluster.close()
        watcher.close()
        master.close()
        if server is not None:
            server.close()
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", default=None, help="a standalone Redis of yours")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--requests", type=int, default=1000, help="per round and scenario")
    parser.add_argument("--burst", type=int, default=100)
    parser.add_argument("--quick", action="store_true", help="3 rounds of 200")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.requests = 3, 200
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
