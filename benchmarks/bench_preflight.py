"""What an anonymous browser request costs as the number of client keys grows.

A preflight (``OPTIONS`` with ``Origin`` and ``Access-Control-Request-Method``) never
carries a key: keystile answers it from the union of every active key's allowed origins.
So does a refusal before the key is known (a ``GET`` without ``Authorization``), to decide
whether the browser may read it. This measures both at 10, 1,000 and 20,000 client keys,
through the whole middleware as raw ASGI (the plumbing of ``bench_middleware.py``), and
the same requests answered by a scan of every key's origins in turn — what keystile did
before its origin index, reproduced here — for the ratio in the same run.

Every store holds N client keys: N - 1 with an exact origin and a wildcard of their own
(``https://app<i>.example.com``, ``https://*.tenant<i>.example.org``), then the key the
allowed requests name (``https://app.example.com``, ``https://*.shop.example.org``), made
last: the scan finds it last.

The contenders run interleaved, round by round; each figure is the median over rounds of
the mean time per request within a round. Times are the CPU time of this thread
(``time.thread_time_ns``), not the wall clock: on a shared machine the wall clock also
counts the moments another process held the CPU. A contender's round lasts about
``--sample-ms`` (its request count is set from a warm-up, between 3 and ``--requests``),
so the slow scans do not make the run long.

The target (20,000 keys cost at most 1.20 x 10 keys) is judged paired: ``--pairs`` blocks,
each timing n requests at 20,000 keys and n at 10 keys right after (which goes first
alternates), one ratio per block, the median of them — two measurements a few
milliseconds apart meet the same moment of a noisy machine. n is ``--pair-requests``, or
fewer when 20,000 keys make fewer in a round.

Once the stores are filled and every index loaded, the objects made so far are frozen out
of the garbage collector (``gc.freeze()``, as a pre-forking server would): its full passes
over 20,000 key records are no part of what a lookup costs.

    python benchmarks/bench_preflight.py            # about a minute
    python benchmarks/bench_preflight.py --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from starlette.middleware import Middleware

from apps import SECRET, make_app
from bench_middleware import App, discard, fresh, http_scope, receive
from keystile import ApiKey
from keystile.clock import to_datetime
from keystile.cors import OriginIndex
from keystile.gate import Keystile
from keystile.keys import new_key_id
from keystile.middleware import KeystileMiddleware
from keystile.origins import Origin, origin_allowed
from keystile.stores import MemoryStore

KEY_COUNTS = (10, 1_000, 20_000)
EXACT = "https://app.example.com"
WILDCARD = "https://*.shop.example.org"
CREATED = 1_800_000_000.0
TARGET = 1.20  # the cost at 20,000 keys, at most this many times the cost at 10


class ScanIndex(OriginIndex):
    """The union of origins answered as keystile did before its origin index: every
    active key's entries in turn, until one matches."""

    async def allows(self, origin: Origin) -> bool:
        await self.refresh()
        now = self.clock()
        return any(
            expires > now and origin_allowed(origin, patterns)
            for patterns, expires in self._keys.values()
        )


async def filled_store(count: int) -> MemoryStore:
    """A store of ``count`` client keys, the one the allowed requests name made last."""
    store = MemoryStore()
    for n in range(count):
        last = n == count - 1
        origins = (EXACT, WILDCARD) if last else (f"https://app{n}.example.com",)
        if not last:
            origins += (f"https://*.tenant{n}.example.org",)
        record = ApiKey(
            id=new_key_id(CREATED + n),
            name=f"browser {n}",
            type="client",
            hint="client_...bnch",
            scopes=("vec:read",),
            allowed_origins=origins,
            created_at=to_datetime(CREATED + n),
        )
        await store.add(record, f"{n:064x}")
    return store


def preflight_scope(origin: bytes) -> dict[str, Any]:
    scope = http_scope(None)
    scope["method"] = "OPTIONS"
    scope["headers"] = [
        *scope["headers"],
        (b"origin", origin),
        (b"access-control-request-method", b"GET"),
        (b"access-control-request-headers", b"authorization"),
    ]
    return scope


def anonymous_scope(origin: bytes) -> dict[str, Any]:
    scope = http_scope(None)
    scope["headers"] = [*scope["headers"], (b"origin", origin)]
    return scope


# (label, scope, the status it must get, whether its answer carries CORS headers)
CASES = [
    ("preflight, exact origin allowed", preflight_scope(EXACT.encode()), 204, True),
    (
        "preflight, wildcard origin allowed",
        preflight_scope(b"https://eu.shop.example.org"),
        204,
        True,
    ),
    ("preflight, origin refused", preflight_scope(b"https://evil.example.net"), 403, False),
    ("no key, allowed origin (401 readable)", anonymous_scope(EXACT.encode()), 401, True),
]


@dataclass
class Contender:
    keys: int
    case: int
    scan: bool
    app: App
    requests: int = 0  # per round, set after the warm-up
    samples: list[float] = field(default_factory=list)  # µs per request, one per round

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


async def call_once(app: App, template: dict[str, Any]) -> tuple[int, bool]:
    """One request: its status, and whether the answer allowed the origin to read it."""
    status, cors = 0, False

    async def keep(message: dict[str, Any]) -> None:
        nonlocal status, cors
        if message["type"] == "http.response.start":
            status = message["status"]
            cors = any(k == b"access-control-allow-origin" for k, _ in message["headers"])

    await app(fresh(template), receive, keep)
    return status, cors


async def timed(contender: Contender, requests: int) -> float:
    """CPU µs per request over ``requests`` sequential requests of one contender."""
    scopes = [fresh(CASES[contender.case][1]) for _ in range(requests)]
    app = contender.app
    gc.collect()
    began = time.thread_time_ns()
    for scope in scopes:
        await app(scope, receive, discard)
    return (time.thread_time_ns() - began) / requests / 1000


async def paired(a: Contender, b: Contender, blocks: int, requests: int) -> list[float]:
    """a's time ÷ b's, block by block: each block times ``requests`` of one, then of the
    other right after (which goes first alternates); one ratio per block."""
    ratios = []
    for block in range(blocks):
        first, second = (a, b) if block % 2 == 0 else (b, a)
        one, two = await timed(first, requests), await timed(second, requests)
        ratios.append(one / two if first is a else two / one)
    return ratios


async def main(args: argparse.Namespace) -> int:
    rounds, cap, sample = args.rounds, args.requests, args.sample_ms / 1000
    if args.quick:
        rounds, cap, sample = min(rounds, 5), min(cap, 300), min(sample, 0.01)
    began = time.monotonic()
    gates: list[Keystile] = []
    contenders: list[Contender] = []
    try:
        for count in KEY_COUNTS:
            store = await filled_store(count)
            for scan in (False, True):
                gate = Keystile(store=store, secret=SECRET)
                gates.append(gate)
                if scan:
                    gate._origins = ScanIndex(gate.store, max_age=gate.store.ttl)
                app = make_app([Middleware(KeystileMiddleware, gate=gate, record_usage=False)])
                contenders += [Contender(count, case, scan, app) for case in range(len(CASES))]
        filled = time.monotonic() - began

        # Check every answer (this also loads each gate's index), then set each
        # contender's requests per round from a short warm-up.
        for contender in contenders:
            label, template, status, cors = CASES[contender.case]
            got = await call_once(contender.app, template)
            if got != (status, cors):
                print(f"{contender.keys} keys, {label}: expected {(status, cors)}, got {got}")
                return 1
        gc.collect()
        gc.freeze()
        for contender in contenders:
            warm = await timed(contender, 3)
            contender.requests = max(3, min(cap, round(sample / (warm / 1e6))))

        began = time.monotonic()
        for number in range(rounds):
            start = number % len(contenders)
            for contender in contenders[start:] + contenders[:start]:
                contender.samples.append(await timed(contender, contender.requests))
        wall = time.monotonic() - began

        # The target, paired block by block (see ``paired``).
        by = {(c.keys, c.case, c.scan): c for c in contenders}
        pairs, per_pair = args.pairs, args.pair_requests
        if args.quick:
            pairs, per_pair = min(pairs, 10), min(per_pair, 200)
        ratios = []
        for case in range(len(CASES)):
            many, few = by[(KEY_COUNTS[-1], case, False)], by[(KEY_COUNTS[0], case, False)]
            # At most as many requests as the slower of the two makes in a round.
            requests = min(per_pair, many.requests)
            ratios.append((await paired(many, few, pairs, requests), requests))
        report(contenders, rounds, wall, filled, ratios)
        return 0
    finally:
        for gate in gates:
            await gate.aclose()


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(
    contenders: list[Contender],
    rounds: int,
    wall: float,
    filled: float,
    ratios: list[tuple[list[float], int]],
) -> None:
    by = {(c.keys, c.case, c.scan): c for c in contenders}
    base = KEY_COUNTS[0]
    print(
        f"\nAnonymous requests against the number of client keys, raw ASGI in process: "
        f"{rounds} interleaved rounds ({wall:.1f} s; stores filled in {filled:.1f} s); "
        f"Python {sys.version.split()[0]}"
    )
    width = max(len(case[0]) for case in CASES)
    header = (
        f"{'request':<{width}}  {'keys':>6}  {'index µs':>9}  {'x ' + str(base):>6}  "
        f"{'scan µs':>9}  {'x ' + str(base):>8}  {'scan ÷ index':>12}  {'n/round':>11}"
    )
    print(header)
    print("-" * len(header))
    for case, (label, *_rest) in enumerate(CASES):
        for count in KEY_COUNTS:
            index, scan = by[(count, case, False)], by[(count, case, True)]
            first, first_scan = by[(base, case, False)], by[(base, case, True)]
            print(
                f"{label:<{width}}  {count:>6,}  {index.median:>9.2f}  "
                f"{index.median / first.median:>6.2f}  {scan.median:>9.2f}  "
                f"{scan.median / first_scan.median:>8.2f}  {scan.median / index.median:>12.1f}  "
                f"{index.requests:>5}/{scan.requests:<5}"
            )
    print(
        "  index: keystile's origin index; scan: every key's origins in turn (before it); "
        f"x {base}: against the same at {base} keys;\n  n/round: requests per round, index/scan."
    )
    top = KEY_COUNTS[-1]
    print(
        f"\nTargets (paired: the median of {len(ratios[0][0])} blocks, each n requests at "
        f"{top:,} keys / n at {base} keys adjacent in time; quartiles in brackets):"
    )
    for (label, *_rest), (case_ratios, requests) in zip(CASES, ratios, strict=True):
        q1, median, q3 = statistics.quantiles(case_ratios, n=4)
        print(
            f"  {label} (n={requests}): {median:.2f} ({q1:.2f} .. {q3:.2f}) "
            f"<= {TARGET:.2f}: {verdict(median <= TARGET)}"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--requests", type=int, default=2000, help="most per contender a round")
    parser.add_argument("--sample-ms", type=float, default=40.0, help="a contender's round")
    parser.add_argument("--pairs", type=int, default=40, help="paired blocks per request")
    parser.add_argument("--pair-requests", type=int, default=1000)
    parser.add_argument(
        "--quick", action="store_true", help="5 rounds of at most 300, 10 pairs of 200"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
