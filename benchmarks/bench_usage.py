"""Usage recording against the number of distinct keys: what a flush costs (app CPU, event
loop held, Redis commands) and what recording adds to a request, at 1, 1,000 and 10,000
keys called round-robin, over a ``redis-server`` of its own.

    python benchmarks/bench_usage.py            # ~1-2 min
    python benchmarks/bench_usage.py --quick    # ~20 s
    python benchmarks/bench_usage.py --keys 10000 --mw-keys 10000 --collector off  # (b): code only

(a) The recorder and the Redis usage store alone: each round records one request of each
key (a client key: by address and origin), then flushes once. Per flush: the app's CPU
time (``time.process_time``), the longest the event loop went without running another
task (a ticker task that only yields, timed around it), the commands sent to Redis and the
commands Redis ran in all (``INFO commandstats`` deltas: ``evalsha`` and the rest sent,
the script's own inside). After the rounds: the names under the namespace and their
``MEMORY USAGE`` per key.

(b) The middleware, usage on against off, 1 and 10,000 ``prod_`` keys in a Redis key store
called round-robin (cache TTL an hour: every key cached after the first round), raw ASGI
as in ``bench_middleware.py``; each "on" block of requests ends with the flush its
requests need (the gate's, alert rules included), and its CPU counts. A block runs the
same requests each way, interleaved in sub-blocks of ``--sub-block`` requests (off then
on, on then off, ... which side goes first alternating from block to block), each side's
CPU summed over the block; its ratio is (on + the flush) / off. The figure is the median
of the per-block ratios (quartiles beside it), and the longest the gate's flushes held the
event loop (in "on" blocks of their own after the timed ones), and the garbage collector's
full passes over the heap per timed block each way (the benchmark's own scopes, alive
through a block, add some to both; the fresh copies a side's requests take are now made,
untimed, a sub-block at a time, so fewer of them are alive at once than the 50,000 of
before).

What is measured is what it was before the sub-blocks (the same requests each way, the
same flush per block, the same apps); only the interleaving changed: this machine's speed
drifts by tens of percent from one second to the next, and two sides a sub-block apart
meet the same drift, where two whole blocks a second or more apart did not. What that
leaves is mostly the garbage collector's full passes (each a tenth of a second or more at
10,000 keys, 0-2 of them in a side of a ~1 s block, landing wherever allocation triggers
them, which interleaved may be the other side's sub-block): printed beside the figure, for
reference, the same median and quartiles with the CPU of the full passes taken out of the
side each landed in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import shutil
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from starlette.middleware import Middleware  # noqa: E402

from apps import SECRET, make_app  # noqa: E402
from bench_middleware import bearer, discard, fresh, http_scope, receive  # noqa: E402
from bench_ratelimit import own_redis  # noqa: E402
from keystile import KeystileSettings, RedisStore  # noqa: E402
from keystile.gate import Keystile  # noqa: E402
from keystile.middleware import KeystileMiddleware  # noqa: E402
from keystile.usage import BY_CLIENT, RedisUsageStore, UsageRecorder  # noqa: E402


def commands(client: redis.Redis) -> dict[str, int]:
    stats: dict[str, Any] = client.info("commandstats")  # type: ignore[assignment]
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    out = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    return {k: v for k, v in out.items() if v > 0 and k not in ("info", "ping", "hello")}


class Sent:
    """Counts the commands this process sends (pipelined ones one by one)."""

    def __init__(self) -> None:
        self.count = 0
        self._saved: list[tuple[Any, str, Any]] = []

    def __enter__(self) -> Sent:
        from redis.asyncio.client import Pipeline, Redis

        pipeline_execute, single = Pipeline.execute, Redis.execute_command

        async def execute(pipe: Any, *args: Any, **kwargs: Any) -> Any:
            self.count += len(pipe.command_stack)
            return await pipeline_execute(pipe, *args, **kwargs)

        async def execute_command(client: Any, *args: Any, **kwargs: Any) -> Any:
            if not isinstance(client, Pipeline):
                self.count += 1
            return await single(client, *args, **kwargs)

        self._saved = [(Pipeline, "execute", pipeline_execute), (Redis, "execute_command", single)]
        Pipeline.execute = execute  # type: ignore[method-assign]
        Redis.execute_command = execute_command  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for owner, name, value in self._saved:
            setattr(owner, name, value)


class Ticker:
    """Measures the longest stretch of CPU time (this thread's: a busy machine's
    descheduling is not ours) the event loop spends without coming back to it: ``longest``
    with the interpreter's cyclic garbage collection left out (a pass lands wherever
    allocation triggers it and lasts as long as the heap makes it), ``longest_gc`` with
    it."""

    def __init__(self) -> None:
        self.longest = self.longest_gc = 0.0
        self._task: asyncio.Task[None] | None = None
        self._collecting = [0.0, 0.0]  # CPU time in collections so far, when one began

    def _collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._collecting[1] = time.thread_time()
        else:
            self._collecting[0] += time.thread_time() - self._collecting[1]

    async def _run(self) -> None:
        last, last_gc = time.thread_time(), self._collecting[0]
        while True:
            await asyncio.sleep(0)
            now, now_gc = time.thread_time(), self._collecting[0]
            self.longest_gc = max(self.longest_gc, now - last)
            self.longest = max(self.longest, (now - now_gc) - (last - last_gc))
            last, last_gc = now, now_gc

    def __enter__(self) -> Ticker:
        gc.callbacks.append(self._collection)
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        gc.callbacks.remove(self._collection)


async def flushes(url: str, keys: int, rounds: int) -> dict[str, Any]:
    """Part (a) for ``keys`` distinct keys."""
    namespace = f"ksbench-usage-{uuid.uuid4().hex[:8]}"
    client = redis.asyncio.Redis.from_url(url)
    admin = redis.Redis.from_url(url)
    store = RedisUsageStore(client, namespace=namespace)
    recorder = UsageRecorder(store, interval=3600)
    ids = [f"key_{i:026d}" for i in range(keys)]
    cpu, held, held_gc, wall, record_us, on_wire = [], [], [], [], [], []
    sent: dict[str, int] = {}
    try:
        # Round 0 warms up (script loaded, connections made); then rounds alternate between
        # timing the flush and watching the event loop (the watcher spins while the flush
        # waits for Redis: its CPU must not count as the flush's).
        for n in range(2 * rounds + 1):
            began = time.perf_counter()
            for key_id in ids:
                recorder.record(key_id, 200, 0, 42, "203.0.113.7", "https://a.example", BY_CLIENT)
            recorded = time.perf_counter() - began
            if n % 2 == 1:
                with Ticker() as ticker:
                    assert await recorder.flush()
                    await asyncio.sleep(0)
                held.append(ticker.longest)
                held_gc.append(ticker.longest_gc)
                continue
            before = commands(admin)
            with Sent() as wire:
                c0, w0 = time.process_time(), time.perf_counter()
                assert await recorder.flush()
                c1, w1 = time.process_time(), time.perf_counter()
            after = commands(admin)
            if n == 0:
                continue
            on_wire.append(wire.count)
            cpu.append(c1 - c0)
            wall.append(w1 - w0)
            record_us.append(recorded / keys * 1e6)
            for name, calls in delta(before, after).items():
                sent[name] = sent.get(name, 0) + calls
        names = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        memory = 0
        for name in names:
            memory += await client.memory_usage(name, samples=0) or 0
    finally:
        with contextlib.suppress(Exception):
            for chunk in range(0, len(names), 1000):
                await client.delete(*names[chunk : chunk + 1000])
        await client.aclose()
        admin.close()
    per = {k: v / rounds for k, v in sent.items()}
    return {
        "keys": keys,
        "cpu_ms": statistics.median(cpu) * 1e3,
        "wall_ms": statistics.median(wall) * 1e3,
        "held_ms": max(held) * 1e3,
        "held_gc_ms": max(held_gc) * 1e3,
        "record_us": statistics.median(record_us),
        "evalsha": per.get("evalsha", 0.0),
        "sent": statistics.mean(on_wire),
        "all": sum(per.values()),
        "names": len(names),
        "bytes_per_key": memory / keys,
    }


@contextlib.contextmanager
def collecting_if(collector: bool) -> Iterator[None]:
    """The garbage collector as it is (``collector``), or off for the block."""
    if collector:
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def quartiles(values: list[float]) -> list[float]:
    return statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3


async def on_off(
    url: str, keys: int, blocks: int, per_block: int, sub_block: int, collector: bool = True
) -> dict[str, Any]:
    """Part (b): µs per request, usage on and off, ``keys`` keys round-robin.

    A block is ``per_block`` requests each way, interleaved in sub-blocks of ``sub_block``
    (off then on, on then off, ... the first side alternating from block to block): each
    side's CPU is summed over the block, the "on" side's flush at the block's end counted
    in its sum. The two sides of a ratio meet the same stretch of a machine whose speed
    drifts from second to second. ``collector=False``: the garbage collector is frozen
    after the warm-up and off while a side or a flush is timed (no pass of it, young or
    full, lands in either side: the code's own cost)."""
    namespace = f"ksbench-usage-{uuid.uuid4().hex[:8]}"
    settings = KeystileSettings(cache_ttl=3600.0, cache_size=keys + 100, usage_flush_interval=3600)
    store = RedisStore.from_url(url, namespace=namespace)
    gate = Keystile(store=store, secret=SECRET, settings=settings)
    try:
        await gate.startup()
        scopes = []
        for i in range(keys):
            created = await gate.manager.create({"name": f"k{i}", "type": "prod"})
            scopes.append(http_scope(bearer(created.secret.get_secret_value())))
        on = make_app([Middleware(KeystileMiddleware, gate=gate)])
        off = make_app([Middleware(KeystileMiddleware, gate=gate, record_usage=False)])
        for template in scopes:  # every key cached
            await off(fresh(template), receive, discard)
        prepared = [fresh(scopes[i % keys]) for i in range(per_block)]
        # Each side runs the same requests as a whole block of its own would, in order.
        slices = [(i, min(i + sub_block, per_block)) for i in range(0, per_block, sub_block)]
        held: list[float] = []
        held_gc: list[float] = []
        full = {True: 0, False: 0}  # full collections of the heap in timed blocks, on / off
        passes = [0]
        in_full = [0.0, 0.0]  # CPU seconds in full passes so far; when the current began

        def collection(phase: str, info: dict[str, int]) -> None:
            if info["generation"] != 2:
                return
            if phase == "start":
                passes[0] += 1
                in_full[1] = time.process_time()
            else:
                in_full[0] += time.process_time() - in_full[1]

        async def run(app: Any, first: int, last: int, usage: bool) -> float:
            """CPU seconds of requests ``first`` to ``last`` of a block through ``app``."""
            batch = [dict(s, headers=list(s["headers"]), state={}) for s in prepared[first:last]]
            began, before, collecting = time.process_time(), passes[0], in_full[0]
            with collecting_if(collector):
                for scope in batch:
                    await app(scope, receive, discard)
            spent = time.process_time() - began
            full[usage] += passes[0] - before
            full_cpu[usage] += in_full[0] - collecting
            return spent

        async def flush() -> float:
            began, before, collecting = time.process_time(), passes[0], in_full[0]
            with collecting_if(collector):
                assert await gate.usage.flush()
            spent = time.process_time() - began
            full[True] += passes[0] - before
            full_cpu[True] += in_full[0] - collecting
            return spent

        async def block(on_first: bool) -> tuple[float, float]:
            """One interleaved block: CPU µs per request on (its flush included) and off."""
            spent = {True: 0.0, False: 0.0}
            full_cpu[True] = full_cpu[False] = 0.0
            for number, (first, last) in enumerate(slices):
                order = (True, False) if (number % 2 == 0) == on_first else (False, True)
                for usage in order:
                    spent[usage] += await run(on if usage else off, first, last, usage)
            spent[True] += await flush()
            return spent[True] / per_block * 1e6, spent[False] / per_block * 1e6

        full_cpu = {True: 0.0, False: 0.0}  # CPU in full passes in a block's sides
        await block(True)  # warm-up
        if not collector:
            gc.collect()
            gc.freeze()  # what lives now (the keys, the cache, the app) is never scanned
        gc.callbacks.append(collection)
        ratios, on_us, off_us, bare = [], [], [], []
        for n in range(blocks):
            a, b = await block(on_first=n % 2 == 1)
            on_us.append(a)
            off_us.append(b)
            ratios.append(a / b)
            a -= full_cpu[True] / per_block * 1e6
            b -= full_cpu[False] / per_block * 1e6
            bare.append(a / b)
        gc.callbacks.remove(collection)  # full passes: the timed blocks' only
        for _ in range(3):  # the loop held: "on" blocks of their own, the flush watched
            await run(on, 0, per_block, True)  # (not timed: the watcher spins while the
            with Ticker() as ticker:  # flush waits for Redis)
                assert await gate.usage.flush()
                await asyncio.sleep(0)
            held.append(ticker.longest)
            held_gc.append(ticker.longest_gc)
    finally:
        gc.unfreeze()
        gc.enable()
        if collection in gc.callbacks:
            gc.callbacks.remove(collection)
        client = gate.store.store.client  # type: ignore[attr-defined]
        names = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
        for chunk in range(0, len(names), 1000):
            await client.delete(*names[chunk : chunk + 1000])
        await gate.aclose()
    return {
        "on": statistics.median(on_us),
        "off": statistics.median(off_us),
        "ratio": statistics.median(ratios),
        "held_ms": max(held) * 1e3,
        "held_gc_ms": max(held_gc) * 1e3,
        "full": (full[True] / blocks, full[False] / blocks),
        "q": quartiles(ratios),
        "bare": statistics.median(bare),
        "bare_q": quartiles(bare),
        "ratios": ratios,
    }


async def main(args: argparse.Namespace) -> int:
    binary = shutil.which("redis-server")
    if binary is None:
        print("redis-server is not installed")
        return 1
    with own_redis(binary) as url:
        print(
            f"(a) one flush after one request of each of N client keys (median of {args.rounds}"
            f" flushes; Redis commands per flush are means); Python {sys.version.split()[0]}"
        )
        head = (
            f"{'keys':>7} {'record µs':>9} {'flush CPU ms':>12} {'µs/key':>7} {'wall ms':>8} "
            f"{'loop held ms':>12} {'with GC':>8} {'EVALSHA':>8} {'sent':>8} {'in all':>9} "
            f"{'names':>7} {'B/key':>6}"
        )
        print(head)
        print("-" * len(head))
        worst = 0.0
        for keys in args.keys:
            r = await flushes(url, keys, args.rounds)
            worst = max(worst, r["held_ms"])
            print(
                f"{keys:>7,} {r['record_us']:>9.2f} {r['cpu_ms']:>12.2f} "
                f"{r['cpu_ms'] * 1e3 / keys:>7.1f} {r['wall_ms']:>8.2f} {r['held_ms']:>12.2f} "
                f"{r['held_gc_ms']:>8.2f} "
                f"{r['evalsha']:>8.1f} {r['sent']:>8.1f} {r['all']:>9.0f} {r['names']:>7,} "
                f"{r['bytes_per_key']:>6.0f}"
            )
        ok = "PASS" if worst <= 5.0 else "FAIL"
        print(
            f"\nTarget: no flush holds the event loop more than 5 ms (its own work, the "
            f"garbage collector's passes apart): {worst:.2f} ms: {ok}"
        )
        print(
            f"\n(b) middleware, usage on vs off, prod_ keys round-robin (Redis key store, "
            f"cached), "
            f"{args.blocks} blocks of {args.per_block:,} requests each way interleaved in "
            f"sub-blocks of {args.sub_block:,}, the 'on' side flushing once at the block's end "
            f"(alert rules included); CPU µs per request, medians; on/off: the median of the "
            f"per-block ratios; w/o full GC: the same with the CPU of the collector's full "
            f"passes taken out of the side each landed in (for reference: they land where "
            f"allocation triggers them, 0-2 a side a block, each 0.1-0.25 s at 10,000 keys)"
            + (
                ""
                if args.collector == "on"
                else "; --collector off: the collector frozen after the warm-up and off while "
                "timed (the code's own cost: no pass of it in either side)"
            )
        )
        head = (
            f"{'keys':>7} {'on µs':>7} {'off µs':>7} {'on/off':>7} {'quartiles':>17} "
            f"{'loop held ms':>12} {'with GC':>8} {'full GC/block on, off':>21} "
            f"{'w/o full GC':>11} {'quartiles':>17}"
        )
        print(head)
        print("-" * len(head))
        results = {}
        for keys in args.mw_keys:
            r = results[keys] = await on_off(
                url, keys, args.blocks, args.per_block, args.sub_block, args.collector == "on"
            )
            print(
                f"{keys:>7,} {r['on']:>7.2f} {r['off']:>7.2f} {(r['ratio'] - 1) * 100:>+6.1f}% "
                f"{(r['q'][0] - 1) * 100:>+7.1f} .. {(r['q'][2] - 1) * 100:>+5.1f}% "
                f"{r['held_ms']:>12.2f} {r['held_gc_ms']:>8.2f} "
                f"{r['full'][0]:>15.2f}, {r['full'][1]:>4.2f} {(r['bare'] - 1) * 100:>+10.1f}% "
                f"{(r['bare_q'][0] - 1) * 100:>+7.1f} .. {(r['bare_q'][2] - 1) * 100:>+5.1f}%"
            )
        most = max(args.mw_keys)
        r = results[most]
        added = (r["ratio"] - 1) * 100
        print(
            f"\nTargets, {most:,} keys: usage on vs off {added:+.1f} % <= +15 %: "
            f"{'PASS' if added <= 15 else 'FAIL'}; the gate's flushes held the event loop at "
            f"most {r['held_ms']:.2f} ms of their own work <= 5 ms: "
            f"{'PASS' if r['held_ms'] <= 5 else 'FAIL'} ({r['held_gc_ms']:.2f} ms with the "
            f"garbage collector's passes)"
        )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keys", type=int, nargs="+", default=[1, 1000, 10_000])
    parser.add_argument("--mw-keys", type=int, nargs="+", default=[1, 10_000])
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--per-block", type=int, default=50_000)
    parser.add_argument("--sub-block", type=int, default=2_500, help="requests (2500)")
    parser.add_argument(
        "--collector",
        choices=["on", "off"],
        default="on",
        help="off: (b) with the garbage collector frozen and off while timed",
    )
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.blocks, args.per_block, args.mw_keys = 2, 4, 20_000, [1, 2000]
        args.sub_block = min(args.sub_block, 2_000)
    if args.per_block < 1 or args.sub_block < 1 or args.blocks < 1:
        parser.error("--per-block, --sub-block and --blocks must be positive")
    return args


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
