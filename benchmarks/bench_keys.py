"""Cost per request against the number of keys calling, and how they call (issue #19).

Every other benchmark here calls with one hot key. This one runs the same requests over
1, 10,000 and 100,000 keys, called round-robin, uniformly at random, or Zipf-distributed
(s = 1.1: a few keys call most), and prints, per dimension, each contender's time per
request beside its one-key figure and beside the baseline of the same run (Starlette's
``AuthenticationMiddleware`` with a dict of the same tokens), with the Redis commands per
request the keystile contenders sent.

Contenders (raw ASGI in process, as bench_middleware.py calls them; the Redis store on a
redis-server of the script's own, the library's defaults):

1. the bare app;
2. ``AuthenticationMiddleware`` and a dict of every token (the baseline);
3. keystile, ``prod_`` keys, usage recording off;
4. keystile, the same keys, usage recording on (the default);
5. keystile, ``client_`` keys with a rate limit (never reached) and an allowed origin,
   usage recording on: a rate-limited request.

The cache's clock is simulated: it advances ``1 / --rate`` seconds per request (1,000 a
second by default), so with 10,000 keys round-robin each key calls once every 10 seconds,
as on a busy platform, however fast the benchmark runs. Before the timed rounds every key
is called once (concurrently, 256 at a time; not at 100,000 keys, which the default cache
of 10,000 cannot hold), and for the random patterns the whole sequence once more: the
figures are of a cache that has seen every key it can hold.

Then the store on its own: ``--store-keys`` (1,000,000) keys written straight into the
empty redis-server, the median time of an uncached lookup (``RedisStore.find``) at 1,000
keys and at the full count, and Redis memory per stored key; at 1,000 keys, what a miss
of a key never seen costs through a cache of its own (time and round trips), one at a
time and 50 different keys at once.

    python benchmarks/bench_keys.py            # ~15 min
    python benchmarks/bench_keys.py --quick    # ~1 min (10,000 keys at most; store: 100,000)

Needs ``redis-server`` on the PATH; it starts one on a free loopback port, without
persistence, and stops it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import dataclasses
import gc
import logging
import random
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import redis
import redis.asyncio as aioredis
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware

from apps import KEY_SETTINGS, SECRET, DictBackend, DictKey, make_app
from bench_middleware import (
    App,
    bearer,
    command_counts,
    command_delta,
    http_scope,
    receive,
)
from bench_ratelimit import ORIGIN, own_redis
from keystile import RedisStore
from keystile.gate import Keystile
from keystile.keys import generate_key, key_hint, new_key_id
from keystile.middleware import KeystileMiddleware
from keystile.models import ApiKey
from keystile.redis.schema import RedisSchema
from keystile.stores import CachedStore

LIMIT = "10000000/minute"  # never refuses during a run
PATTERNS = ("round-robin", "uniform", "zipf")
ZIPF_S = 1.1
# The commands keystile's Lua scripts run inside Redis (the rate limit's, the usage
# flush's, and the lookup's GETs, digest then record, in key_find.lua on this standalone
# server): counted apart from the commands sent over the wire.
IN_LUA = frozenset(
    [
        "del",
        "expire",
        "get",
        "hdel",
        "hget",
        "hgetall",
        "hincrby",
        "hset",
        "lindex",
        "llen",
        "lpush",
        "lset",
        "ltrim",
        "pexpire",
        "sadd",
        "scard",
        "set",
        "spop",
        "time",
        "zincrby",
        "zremrangebyrank",
    ]
)


# -- who calls ---------------------------------------------------------------------------------


def sequence(pattern: str, keys: int, length: int, rng: random.Random) -> list[int]:
    """Which key makes each of ``length`` requests."""
    if keys == 1:
        return [0] * length
    if pattern == "round-robin":
        start = rng.randrange(keys)
        return [(start + n) % keys for n in range(length)]
    if pattern == "uniform":
        return [rng.randrange(keys) for _ in range(length)]
    weights = list(accumulate(1.0 / (rank**ZIPF_S) for rank in range(1, keys + 1)))
    total = weights[-1]
    order = list(range(keys))
    rng.shuffle(order)  # which key holds which rank
    return [order[bisect.bisect_left(weights, rng.random() * total)] for _ in range(length)]


class SimClock:
    """The cache's clock: ``1 / rate`` seconds per request made (see :meth:`tick`)."""

    def __init__(self, rate: float) -> None:
        self.step = 1.0 / rate
        self.now = time.monotonic()

    def tick(self) -> None:
        self.now += self.step

    def __call__(self) -> float:
        return self.now


# -- keys, written straight into Redis as RedisStore.add writes them ---------------------------


async def write_keys(
    client: aioredis.Redis, gate: Keystile, template: ApiKey, prefix: str, count: int
) -> list[bytes]:
    """``count`` keys like ``template`` (record, digest, index), in pipelines; their
    ``Bearer`` credentials."""
    schema = RedisSchema(gate.store.store.namespace)  # type: ignore[attr-defined]
    credentials = []
    for start in range(0, count, 2000):
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(min(2000, count - start)):
                secret = generate_key(prefix)
                key_id = new_key_id()
                record = template.model_copy(
                    update={"id": key_id, "hint": key_hint(secret, prefix)}
                )
                pipe.set(schema.record(key_id), record.model_dump_json())
                pipe.set(schema.digest(gate.hasher.digest(secret)), key_id)
                pipe.zadd(schema.index, {key_id: 0})
                credentials.append(bearer(secret))
            await pipe.execute()
    return credentials


# -- contenders --------------------------------------------------------------------------------


@dataclass
class Contender:
    label: str
    short: str
    app: App
    headers: list[tuple[bytes, bytes]]  # every request's, before Authorization
    credentials: Sequence[bytes] | None  # per key (None: no Authorization at all)
    gate: Keystile | None = None
    usage: bool = False  # records usage: its flush is timed with it
    hot: bool = False  # every request with the first key (the one-hot-key figure)
    warm_app: App | None = None  # what warms its cache, when not its own app
    shares_cache: bool = False  # warmed by the contender before it
    refused: int = 0  # timed requests not answered 200 (503: a lookup past its timeout)
    samples: list[float] = field(default_factory=list)  # µs per request, per round
    commands: float = float("nan")  # Redis commands per request (usage flush included)
    sent: float = float("nan")  # of which sent over the wire (not run inside a script)

    @property
    def micros(self) -> float:
        return statistics.median(self.samples)


def scope_template(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    scope = http_scope(None)
    scope["headers"] = headers
    return scope


async def run_block(
    contender: Contender, keys: Sequence[int], clock: SimClock, *, warming: bool = False
) -> float:
    """Time ``keys``' requests through the contender, µs per request. Those not answered
    200 are counted in ``contender.refused`` (raised when ``warming``, which goes through
    ``warm_app`` when there is one)."""
    template = scope_template(contender.headers)
    base, credentials = contender.headers, contender.credentials
    if contender.hot:
        keys = [0] * len(keys)
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    app = contender.warm_app if warming and contender.warm_app else contender.app
    started = time.perf_counter()
    for n, key in enumerate(keys):
        scope = dict(template)
        scope["state"] = {}
        if credentials is not None:
            scope["headers"] = [*base, (b"authorization", credentials[key])]
        await app(scope, receive, send)
        clock.tick()
        if n % 100 == 99:
            await asyncio.sleep(0)  # let the timers run (usage flush, events channel)
    elapsed = time.perf_counter() - started
    wrong = [s for s in statuses if s != 200]
    if len(statuses) != len(keys):
        raise RuntimeError(f"{contender.label}: {len(keys) - len(statuses)} requests unanswered")
    if wrong and not warming:
        contender.refused += len(wrong)
    elif wrong:
        raise RuntimeError(f"{contender.label}: {len(wrong)} answers not 200 ({wrong[:5]})")
    return elapsed / len(keys) * 1e6


async def warm(contender: Contender, keys: int, clock: SimClock) -> None:
    """Every key once, 256 at a time (concurrent misses); a request refused meanwhile (a
    usage flush holding the loop past the lookup timeout) is made again, 3 times at most."""
    if contender.credentials is None or contender.hot or contender.shares_cache:
        return
    for start in range(0, keys, 256):
        chunk = list(range(start, min(keys, start + 256)))
        for _ in range(3):
            results = await asyncio.gather(
                *(run_block(contender, [k], clock, warming=True) for k in chunk),
                return_exceptions=True,
            )
            chunk = [k for k, r in zip(chunk, results, strict=True) if isinstance(r, Exception)]
            if not chunk:
                break
        if chunk:
            raise RuntimeError(f"{contender.label}: {len(chunk)} keys refused while warming")


async def timed_block(contender: Contender, keys: Sequence[int], clock: SimClock) -> float:
    """:func:`run_block`, with the usage flush that writes the block's counts: µs/request."""
    micros = await run_block(contender, keys, clock)
    if contender.usage and contender.gate is not None:
        started = time.perf_counter()
        await contender.gate.usage.flush()
        micros += (time.perf_counter() - started) / len(keys) * 1e6
    return micros


async def count_commands(
    sync: redis.Redis, contender: Contender, keys: Sequence[int], clock: SimClock
) -> tuple[float, float]:
    """Redis commands per request over one block, with the usage flush that writes its
    counts (INFO commandstats: nothing else uses this redis-server; PINGs left out)."""
    gate = contender.gate
    if gate is not None:
        await gate.usage.flush()
    before = command_counts(sync)
    await run_block(contender, keys, clock)
    if gate is not None:
        await gate.usage.flush()
    delta = command_delta(before, command_counts(sync))
    total = sum(n for name, n in delta.items() if name != "ping")
    inside = sum(n for name, n in delta.items() if name in IN_LUA)
    return total / len(keys), (total - inside) / len(keys)


# -- one dimension -----------------------------------------------------------------------------


@dataclass
class Dimension:
    keys: int
    pattern: str
    contenders: list[Contender]
    misses: dict[str, float]  # per keystile gate: store lookups per request, timed rounds
    paired: tuple[float, float, float] | None = None  # ks auth / its hot key: median, quartiles


async def dimension(
    url: str, keys: int, pattern: str, args: argparse.Namespace, sync: redis.Redis
) -> Dimension:
    namespace = f"ksbench-keys-{keys}-{pattern}"
    clock = SimClock(args.rate)
    opened: list[Any] = []
    try:
        auth = Keystile(store=RedisStore.from_url(url, namespace=namespace), secret=SECRET)
        limited = Keystile(
            store=RedisStore.from_url(url, namespace=namespace + "-rl"), secret=SECRET
        )
        opened += [auth, limited]
        for gate in (auth, limited):
            gate.store._clock = clock  # type: ignore[attr-defined]  # simulated (see above)
            await gate.startup()
        client = aioredis.Redis.from_url(url)
        opened.append(client)
        prod = await auth.manager.create(KEY_SETTINGS)
        fields = {"name": "c", "type": "client", "scopes": ["vec:read"]}
        client_fields = {**fields, "rate_limit": LIMIT, "address_rate_limit": LIMIT}
        client_key = await limited.manager.create(
            {**client_fields, "allowed_origins": [ORIGIN.decode()]}
        )
        prod_credentials = [bearer(prod.secret.get_secret_value())]
        prod_credentials += await write_keys(client, auth, prod.key, "prod_", keys - 1)
        client_credentials = [bearer(client_key.secret.get_secret_value())]
        client_credentials += await write_keys(
            client, limited, client_key.key, "client_", keys - 1
        )
        tokens = {
            c.decode()[7:]: DictKey(f"k{n}", ("vec:read",)) for n, c in enumerate(prod_credentials)
        }
        plain = list(http_scope(None)["headers"])
        with_origin = [*plain, (b"origin", ORIGIN)]
        contenders = [
            Contender("bare Starlette app", "bare", make_app(), plain, None),
            Contender(
                "AuthenticationMiddleware + dict",
                "dict",
                make_app([Middleware(AuthenticationMiddleware, backend=DictBackend(tokens))]),
                plain,
                prod_credentials,
            ),
            Contender(
                "keystile, usage off",
                "ks auth",
                make_app([Middleware(KeystileMiddleware, gate=auth, record_usage=False)]),
                plain,
                prod_credentials,
                auth,
            ),
            Contender(
                "keystile, usage on",
                "ks usage",
                make_app([Middleware(KeystileMiddleware, gate=auth)]),
                plain,
                prod_credentials,
                auth,
                usage=True,
                shares_cache=True,
            ),
            Contender(
                "keystile, rate-limited",
                "ks limited",
                make_app([Middleware(KeystileMiddleware, gate=limited)]),
                with_origin,
                client_credentials,
                limited,
                usage=True,
                warm_app=make_app(
                    [Middleware(KeystileMiddleware, gate=limited, record_usage=False)]
                ),
            ),
        ]
        # The same contenders with one hot key, interleaved with them: "× 1 key".
        contenders += [
            dataclasses.replace(
                c, label=c.label + ", 1 key", short=c.short + " hot", hot=True, samples=[]
            )
            for c in contenders[1:]
            if keys > 1
        ]
        rng = random.Random(f"{keys}-{pattern}")
        length = args.rounds * args.block
        # One block more, after the timed ones, for counting commands: keys as the pattern
        # brings them next (at 100,000 keys round-robin, keys the cache has not held).
        order = sequence(pattern, keys, length + args.block, rng)
        counting = order[length:]
        order = order[:length]
        for contender in contenders:  # every key once, then (random patterns) the run's keys
            phase = time.monotonic()
            if contender.gate is None or keys <= contender.gate.store.max_size:
                await warm(contender, keys, clock)  # more keys than the cache holds: no use
            if pattern != "round-robin" and not contender.shares_cache:
                await run_block(contender, order, clock)  # refusals here are not counted
                contender.refused = 0
            if contender.gate is not None:
                await contender.gate.usage.flush()
            if args.verbose:
                print(f"    warmed {contender.short} in {time.monotonic() - phase:.1f} s")
        lookups = {id(g): g.store.misses for g in (auth, limited)}
        gc.collect()
        for r in range(args.rounds):
            block = order[r * args.block : (r + 1) * args.block]
            turn = contenders[r % len(contenders) :] + contenders[: r % len(contenders)]
            for contender in turn:
                contender.samples.append(await timed_block(contender, block, clock))
        requests = args.rounds * args.block
        misses = {
            "auth": (auth.store.misses - lookups[id(auth)]) / (2 * requests),  # two contenders
            "limited": (limited.store.misses - lookups[id(limited)]) / requests,
        }
        paired = None
        if args.paired and keys > 1:
            # Keystile (usage off), many keys / one hot key, in adjacent small blocks: two
            # measurements milliseconds apart meet the same moment of a noisy machine.
            many = next(c for c in contenders if c.short == "ks auth")
            hot = next(c for c in contenders if c.short == "ks auth hot")
            ratios = []
            for n in range(args.paired):
                block = order[(n * 200) % length :][:200] or order[:200]
                pair = [many, hot] if n % 2 == 0 else [hot, many]
                times = {c.short: await run_block(c, block, clock) for c in pair}
                ratios.append(times["ks auth"] / times["ks auth hot"])
            q1, median, q3 = statistics.quantiles(ratios, n=4)
            paired = (median, q1, q3)
        for contender in contenders:
            if contender.gate is None or contender.hot:
                continue
            counted = await count_commands(sync, contender, counting, clock)
            contender.commands, contender.sent = counted
        return Dimension(keys, pattern, contenders, misses, paired)
    finally:
        for thing in opened:
            await thing.aclose()
        names = list(sync.scan_iter(match=f"{namespace}*", count=5000))
        for start in range(0, len(names), 5000):
            sync.unlink(*names[start : start + 5000])


# -- the store alone ---------------------------------------------------------------------------


async def store_figures(url: str, total: int, sync: redis.Redis, lookups: int) -> list[str]:
    """Uncached lookup time at 1,000 keys and at ``total``; Redis memory per stored key."""
    namespace = "ksbench-store"
    gate = Keystile(store=RedisStore.from_url(url, namespace=namespace), secret=SECRET)
    client = aioredis.Redis.from_url(url)
    lines = []
    try:
        store = gate.store.store
        assert isinstance(store, RedisStore)
        created = await gate.manager.create(KEY_SETTINGS)
        sync.memory_purge() if hasattr(sync, "memory_purge") else None
        used_before = int(sync.info("memory")["used_memory"])
        digests: list[str] = [gate.hasher.digest(created.secret.get_secret_value())]
        have = 1
        rng = random.Random(7)
        for size in (1_000, total):
            while have < size:
                count = min(50_000, size - have)
                credentials = await write_keys(client, gate, created.key, "prod_", count)
                digests += [gate.hasher.digest(c.decode()[7:]) for c in credentials]
                have += count
            used = int(sync.info("memory")["used_memory"])
            sample = [digests[rng.randrange(size)] for _ in range(lookups)]
            times = []
            for digest in sample:
                started = time.perf_counter()
                found = await store.find(digest)
                times.append(time.perf_counter() - started)
                if found is None:
                    raise RuntimeError("a stored key was not found")
            times.sort()
            per_key = (used - used_before) / size
            median, p90 = statistics.median(times) * 1e6, times[int(0.9 * len(times))] * 1e6
            lines.append(
                f"{size:>9,} keys: uncached lookup median {median:6.0f} µs, p90 {p90:6.0f} µs;"
                f" Redis {per_key:5.0f} B per key"
            )
            if size == 1_000:
                lines += await first_sight(store, digests[:1_000])
        return lines
    finally:
        await client.aclose()
        await gate.aclose()
        names = list(sync.scan_iter(match=f"{namespace}:*", count=10_000))
        for start in range(0, len(names), 10_000):
            sync.unlink(*names[start : start + 10_000])


class Trips:
    """Counts a client's round trips while installed: a command sent alone is one, a
    pipeline executed is one."""

    def __init__(self, client: Any) -> None:
        self.client, self.count = client, 0
        send, open_pipeline = client.execute_command, client.pipeline

        async def execute_command(*args: Any, **options: Any) -> Any:
            self.count += 1
            return await send(*args, **options)

        def pipeline(*args: Any, **options: Any) -> Any:
            pipe = open_pipeline(*args, **options)
            run = pipe.execute

            async def execute(*a: Any, **k: Any) -> Any:
                self.count += 1
                return await run(*a, **k)

            pipe.execute = execute
            return pipe

        client.execute_command, client.pipeline = execute_command, pipeline

    def remove(self) -> None:
        del self.client.execute_command, self.client.pipeline


async def first_sight(store: RedisStore, digests: Sequence[str]) -> list[str]:
    """What a miss of a key the cache never saw costs, through a ``CachedStore`` of its
    own (no key's id known to it, so no hint): 200 misses one at a time, then batches of
    50 misses of different keys at once (one event-loop iteration: one ``find_many``); the
    median time and the round trips, each key looked up once."""
    cache = CachedStore(store)
    alone, together = digests[:200], digests[200:1_000]
    trips = Trips(store.client)
    try:
        times = []
        for digest in alone:
            started = time.perf_counter()
            found = await cache.find(digest)
            times.append(time.perf_counter() - started)
            if found is None:
                raise RuntimeError("a stored key was not found")
        alone_trips, trips.count = trips.count / len(alone), 0
        batch_times = []
        batches = [together[i : i + 50] for i in range(0, len(together), 50)]
        for batch in batches:
            started = time.perf_counter()
            records = await asyncio.gather(*(cache.find(digest) for digest in batch))
            batch_times.append(time.perf_counter() - started)
            if any(record is None for record in records):
                raise RuntimeError("a stored key was not found")
        together_trips = trips.count / len(batches)
    finally:
        trips.remove()
    return [
        f"    first-sight miss, one at a time: median {statistics.median(times) * 1e6:6.0f} µs,"
        f" {alone_trips:.2f} round trips each",
        f"    50 first-sight misses at once:   median {statistics.median(batch_times) * 1e6:6.0f}"
        f" µs, {together_trips:.2f} round trips in all",
    ]


# -- report ------------------------------------------------------------------------------------


def legend() -> None:
    print()
    print("µs per request (median over rounds); × 1 key: against the same contender with one")
    print("hot key, interleaved in the same rounds; × dict: against AuthenticationMiddleware")
    print("+ dict in the same dimension (its own key pattern);")
    print("+bare: µs added to the bare app; cmds: Redis commands per request, usage flush in")
    print("(sent: of those, sent over the wire; the rest ran inside Lua scripts); 503s: timed")
    print("requests refused (a lookup waited past its 1 s timeout: the loop was held up)")


def table(d: Dimension) -> None:
    """One dimension's table, printed as soon as it is measured."""
    one = {c.short.removesuffix(" hot"): c for c in d.contenders if c.hot or d.keys == 1}
    dict_figure = next(c for c in d.contenders if c.short == "dict").micros
    bare = next(c for c in d.contenders if c.short == "bare").micros
    title = "1 key" if d.keys == 1 else f"{d.keys:,} keys, {d.pattern}"
    misses = ", ".join(f"{k} {v:.3f}" for k, v in d.misses.items())
    print(f"\n{title}  (store lookups per request: {misses})")
    print(
        f"  {'contender':<34}{'µs':>8}{'+bare':>8}{'× 1 key':>9}{'× dict':>8}"
        f"{'cmds':>7}{'sent':>7}{'503s':>7}"
    )
    if d.paired is not None:
        median, q1, q3 = d.paired
        print(
            f"  keystile, usage off / its one hot key, paired blocks of 200: {median:.2f}"
            f" ({q1:.2f} .. {q3:.2f})"
        )
    for c in d.contenders:
        if c.hot:
            continue
        ratio_one = c.micros / one[c.short].micros if c.short in one else float("nan")
        cmds = "" if c.commands != c.commands else f"{c.commands:.2f}"
        sent = "" if c.sent != c.sent else f"{c.sent:.2f}"
        print(
            f"  {c.label:<34}{c.micros:8.1f}{c.micros - bare:8.1f}{ratio_one:9.2f}"
            f"{c.micros / dict_figure:8.2f}{cmds:>7}{sent:>7}{c.refused:>7}"
        )


def target(results: list[Dimension]) -> None:
    for d in results:
        if d.keys != 10_000 or d.pattern != "round-robin":
            continue
        ks = next(c for c in d.contenders if c.short == "ks auth")
        hot = next(c for c in d.contenders if c.short == "ks auth hot")
        ratio = ks.micros / hot.micros if d.paired is None else d.paired[0]
        verdict = "PASS" if ratio <= 1.3 and ks.commands == 0 else "FAIL"
        print(
            f"\ntarget, 10,000 keys round-robin: keystile (usage off) {ks.micros:.1f} µs, "
            f"{ratio:.2f}× its one-key figure {hot.micros:.1f} µs (≤ 1.3×; paired when "
            "measured so), "
            f"{ks.commands:.2f} Redis commands per request (0): {verdict}"
        )


async def main(args: argparse.Namespace) -> int:
    binary = shutil.which("redis-server")
    if binary is None:
        print("needs redis-server on the PATH", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    sizes = [1, 10_000] if args.quick else [1, 10_000, 100_000]
    if args.keys:
        sizes = [1, *args.keys]
    with own_redis(binary) as url:
        sync = redis.Redis.from_url(url)
        print(f"redis-server of its own at {url}; cache clock {args.rate:,.0f} requests/s")
        legend()
        results = []
        if not args.store_only:
            for keys in sizes:
                for pattern in args.patterns if keys > 1 else PATTERNS[:1]:
                    started = time.monotonic()
                    results.append(await dimension(url, keys, pattern, args, sync))
                    print(f"  {keys:,} keys, {pattern}: {time.monotonic() - started:.0f} s")
                    table(results[-1])
                    sys.stdout.flush()
            target(results)
        if args.store_keys:
            print(f"\nthe store alone ({args.lookups} uncached lookups per size, one at a time):")
            for line in await store_figures(url, args.store_keys, sync, args.lookups):
                print("  " + line)
        sync.close()
    return 0


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--block", type=int, default=None, help="requests per round")
    parser.add_argument("--rate", type=float, default=1000.0, help="simulated requests/s")
    parser.add_argument("--keys", type=int, nargs="*", help="key counts (1 is always run)")
    parser.add_argument("--store-keys", type=int, default=None)
    parser.add_argument("--store-only", action="store_true")
    parser.add_argument("--lookups", type=int, default=2000)
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--patterns", nargs="*", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--paired", type=int, default=100, help="paired many/hot blocks (0: none)")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.block = args.block or (500 if args.quick else 1000)
    if args.store_keys is None:
        args.store_keys = 100_000 if args.quick else 1_000_000
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse(sys.argv[1:]))))
