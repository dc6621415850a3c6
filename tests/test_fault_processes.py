"""Several processes sharing the real Redis: a revocation racing live traffic in four app
processes, and the rate limit's exactness across four uvicorn workers over real HTTP."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from conftest import REDIS_URL, SECRET, Figures
from faults.rawhttp import RawAnswer, exchange, request
from faults.server import child_env, serve
from keystile import KeystileSettings, RedisStore
from keystile.gate import Keystile

pytestmark = [pytest.mark.slow, pytest.mark.redis]

FAULTS = Path(__file__).resolve().parent / "faults"
PROCESSES = 4


@pytest.fixture
async def parent_gate(redis_namespace: str) -> AsyncIterator[Keystile]:
    """The parent's gate on the shared Redis, in the test's own namespace."""
    gate = Keystile(
        store=RedisStore.from_url(REDIS_URL, namespace=redis_namespace, timeout=5.0),
        secret=SECRET,
        settings=KeystileSettings(),
    )
    await gate.startup()
    yield gate
    await gate.aclose()


# -- 4. revocation race ----------------------------------------------------------------------


async def test_no_request_is_admitted_100_ms_after_a_revocation_is_acknowledged(
    parent_gate: Keystile, redis_namespace: str, figures: Figures
) -> None:
    """While four app processes drive traffic with one key through the full middleware,
    the key is revoked from the parent: no request that started more than 100 ms after the
    revocation was acknowledged is admitted, and every one after that is 401
    revoked_api_key."""
    created = await parent_gate.manager.create({"name": "raced", "type": "prod", "scopes": ["*"]})
    env = child_env(KS_KEY=created.secret.get_secret_value())
    command = [str(FAULTS / "revoke_worker.py"), REDIS_URL, redis_namespace, SECRET, "8"]
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *command,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            limit=64 * 1024 * 1024,
        )
        for _ in range(PROCESSES)
    ]
    logs: list[list[list[object]]] = []
    try:
        for worker in workers:
            assert worker.stdout is not None
            line = await asyncio.wait_for(worker.stdout.readline(), 30.0)
            assert line.strip() == b"ready", line
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        await asyncio.sleep(0.7)  # traffic flowing everywhere
        issued = time.time()
        await parent_gate.manager.revoke(created.key.id)
        acknowledged = time.time()
        await asyncio.sleep(0.7)
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"stop\n")
            await worker.stdin.drain()
        for worker in workers:
            assert worker.stdout is not None
            logs.append(json.loads(await asyncio.wait_for(worker.stdout.readline(), 30.0)))
    finally:
        for worker in workers:
            if worker.stdin is not None:
                worker.stdin.close()
        for worker in workers:
            try:
                await asyncio.wait_for(worker.wait(), 15.0)
            except TimeoutError:
                worker.kill()
                await worker.wait()

    last_admitted: list[float] = []
    first_refused: list[float] = []
    total = 0
    for log in logs:
        entries = [(float(t), int(s), c) for t, s, c in log]  # type: ignore[misc]
        total += len(entries)
        statuses = Counter(s for _, s, _ in entries)
        assert set(statuses) <= {200, 401}, statuses
        before = [e for e in entries if e[0] < issued]
        after = [e for e in entries if e[0] > acknowledged + 0.100]
        assert before and after, f"no traffic around the revocation: {statuses}"
        assert all(s == 200 for _, s, _ in before)
        late = [e for e in after if e[1] == 200]
        assert not late, f"admitted {(late[0][0] - acknowledged) * 1000:.1f} ms after the ack"
        assert all(c == "revoked_api_key" for _, _, c in after)
        last_admitted.append(max(t for t, s, _ in entries if s == 200) - acknowledged)
        first_refused.append(min(t for t, s, _ in entries if s == 401) - acknowledged)
    figures.add(
        f"revocation racing {PROCESSES} processes x 8 tasks ({total} requests in "
        f"~1.4 s): last admitted request started {max(last_admitted) * 1000:+.1f} ms from the "
        f"ack (per process: {', '.join(f'{t * 1000:+.1f}' for t in last_admitted)} ms), "
        f"first refusal {min(first_refused) * 1000:+.1f} ms (the revoke call took "
        f"{(acknowledged - issued) * 1000:.1f} ms); limit +100 ms"
    )


# -- 5. boundary burst over real HTTP --------------------------------------------------------

ROUNDS = 3
BURST = 400


async def burst(port: int, secret: str, count: int) -> list[RawAnswer]:
    """``count`` connections opened first, then the same request sent on all at once."""
    data = request("GET", "/x", [(b"Authorization", f"Bearer {secret}".encode())])
    go = asyncio.Event()
    pending = [
        asyncio.create_task(exchange(port, data, gate=go, timeout=30.0)) for _ in range(count)
    ]
    await asyncio.sleep(0.3)  # let the connections open
    go.set()
    return await asyncio.gather(*pending)


async def test_four_uvicorn_workers_admit_exactly_the_limit_over_http(
    parent_gate: Keystile, redis_namespace: str, figures: Figures
) -> None:
    """400 simultaneous HTTP requests with one client key (100/minute) against
    ``uvicorn --workers 4`` sharing one Redis namespace: exactly 100 are admitted, each
    decided by Redis (no pass), the other 300 get 429 rate_limited — three rounds, each
    with a fresh key."""
    env = child_env(
        KEYSTILE_REDIS_URL=REDIS_URL,
        KEYSTILE_SECRET=SECRET,
        KEYSTILE_NAMESPACE=redis_namespace,
        # Generous: four workers and the client share two cores; a slow answer must show
        # up as a counted pass or a 503 (and fail below), not decide the round.
        KEYSTILE_RATE_LIMIT_TIMEOUT="5",
        KEYSTILE_REDIS_TIMEOUT="5",
        KS_LOOKUP_TIMEOUT="5",
    )
    flags = ("--workers", str(PROCESSES), "--no-proxy-headers", "--no-access-log")
    rounds = []
    started = time.monotonic()
    with serve(env, flags=flags, workers=PROCESSES) as server:
        for round_ in range(ROUNDS):
            created = await parent_gate.manager.create(
                {
                    "name": f"burst {round_}",
                    "type": "client",
                    "scopes": ["kev:read"],
                    "allowed_origins": ["https://app.example.com"],
                    # The key's own window is the subject: one address may spend it.
                    "address_rate_limit": "100/minute",
                }
            )
            answers = await burst(server.port, created.secret.get_secret_value(), BURST)
            outcome = Counter(a.describe() for a in answers)
            assert outcome == {"200": 100, "429 rate_limited": BURST - 100}, outcome
            admitted = [a.json for a in answers if a.status == 200]
            assert all(a["passes"] == 0 and a["id"] == created.key.id for a in admitted)  # type: ignore[index]
            assert all(a.headers["retry-after"].isdigit() for a in answers if a.status == 429)
            by_worker = Counter(a["pid"] for a in admitted)  # type: ignore[index]
            rounds.append((by_worker, statistics.median(a.elapsed for a in answers)))
        assert server.alive
    elapsed = time.monotonic() - started
    split = "; ".join(
        f"{'/'.join(str(n) for n in sorted(w.values(), reverse=True))} by {len(w)} workers"
        for w, _ in rounds
    )
    figures.add(
        f"uvicorn --workers {PROCESSES} over loopback HTTP, {BURST} simultaneous requests with "
        f"one client key (100/minute), {ROUNDS} rounds ({elapsed:.1f} s with startup): "
        f"exactly 100 admitted each round ({split}), 0 passes, the rest 429"
    )
