"""Usage monitoring (docs/usage.md): what the middleware counts per key, in which time buckets, for
how long, and at what cost — aggregated in process, flushed in one pipeline, nothing lost."""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fakeredis
import pytest

from conftest import REDIS_URL, Figures, cleanup_namespace, new_namespace, require_redis
from faults.redis_server import RedisServer
from keystile import KeystileSettings, ManualClock, MemoryStore, RedisStore
from keystile.alerts import AlertRules
from keystile.clock import to_datetime
from keystile.exceptions import StoreUnavailable
from keystile.gate import Keystile
from keystile.stores import KeyStore
from keystile.usage import DAY, FIELDS, Granularity, UsageBatch, UsageTotals
from usage_app import CHUNK, build_app, http, lifespan

SECRET = "x" * 20
ORIGIN = "https://app.example.com"
QUIET = KeystileSettings(usage_flush_interval=60.0)  # only the test flushes
WORKER = Path(__file__).with_name("usage_worker.py")


_gates: list[Keystile] = []  # made by this test; their limiters are closed after it


def make_gate(store: KeyStore, clock: ManualClock, **settings: Any) -> Keystile:
    """A gate on ``store`` whose usage is flushed only when the test says so (its rate
    limiter's connection is closed after the test)."""
    options: dict[str, Any] = {"usage_flush_interval": 60.0, **settings}
    made = Keystile(store=store, secret=SECRET, clock=clock, settings=KeystileSettings(**options))
    _gates.append(made)
    return made


@pytest.fixture(autouse=True)
async def close_limiters() -> AsyncIterator[None]:
    yield
    while _gates:
        await _gates.pop().limiter.close()


async def new_key(gate: Keystile, kind: str = "dev", **fields: Any) -> tuple[str, dict[str, str]]:
    """Create a key; its id and the headers that present it (and its first origin)."""
    if kind == "client":
        fields.setdefault("allowed_origins", [ORIGIN])
    created = await gate.manager.create({"name": f"{kind} key", "type": kind, **fields})
    headers = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
    if kind == "client":
        headers["Origin"] = fields["allowed_origins"][0]
    return created.key.id, headers


async def totals(gate: Keystile, key_id: str) -> UsageTotals:
    """Flush, then the key's all-time totals."""
    assert await gate.usage.flush()
    return (await gate.usage.report(key_id)).all_time


def counts(**values: int) -> UsageTotals:
    return UsageTotals(**values)


@pytest.fixture
async def gate(store: KeyStore, clock: ManualClock) -> AsyncIterator[Keystile]:
    """A gate on each backend, driven by the manual clock."""
    made = make_gate(store, clock, usage_top_n=3)
    yield made
    await made.shutdown()


# -- what is counted ------------------------------------------------------------------------


async def test_requests_and_body_bytes_are_counted(gate: Keystile) -> None:
    """Every request counts, with the request body as received (a streamed upload included)
    and the response body as sent (a StreamingResponse included)."""
    key_id, headers = await new_key(gate)

    async def upload() -> AsyncIterator[bytes]:
        for size in (250, 1, 0, 749):
            yield b"u" * size

    async with http(build_app(gate)) as client:
        responses = [
            await client.get("/bytes/10", headers=headers),
            await client.post("/echo", content=b"p" * 1000, headers=headers),
            await client.post("/echo", content=upload(), headers=headers),
            await client.get("/stream/7", headers=headers),
        ]
    assert [r.status_code for r in responses] == [200] * 4
    assert responses[2].text == "1000"  # the upload arrived in chunks, and whole
    assert len(responses[3].content) == 7 * CHUNK
    sent = sum(len(r.content) for r in responses)
    assert await totals(gate, key_id) == counts(requests=4, bytes_in=2000, bytes_out=sent)


async def test_client_and_server_errors_are_counted_apart(gate: Keystile) -> None:
    """404s and other 4xx count as errors_4xx, 500s (an endpoint that raises included) and
    503s as errors_5xx; refusals after the key is known (a disallowed origin) count too."""
    key_id, headers = await new_key(gate, "client")
    async with http(build_app(gate)) as client:
        statuses = [
            (await client.get("/nowhere", headers=headers)).status_code,
            (await client.get("/fail/410", headers=headers)).status_code,
            (await client.get("/boom", headers=headers)).status_code,
            (await client.get("/fail/503", headers=headers)).status_code,
            (await client.get("/bytes/1", headers=headers)).status_code,
        ]
        disallowed = {**headers, "Origin": "https://evil.example.net"}
        refused = await client.get("/bytes/1", headers=disallowed)
    assert statuses == [404, 410, 500, 503, 200]
    assert refused.json()["error"]["code"] == "origin_not_allowed"
    got = await totals(gate, key_id)
    assert (got.requests, got.errors_4xx, got.errors_5xx) == (6, 3, 2)
    assert (got.rate_limited, got.quota_exceeded) == (0, 0)


async def test_rate_limited_requests_are_counted(gate: Keystile) -> None:
    """A client key limited to 2/minute: the third request is refused 429 and counted as a
    request, a 4xx and a rate-limited refusal."""
    key_id, headers = await new_key(gate, "client", rate_limit="2/minute")
    async with http(build_app(gate)) as client:
        statuses = [(await client.get("/bytes/5", headers=headers)).status_code for _ in "abc"]
    assert statuses == [200, 200, 429]
    got = await totals(gate, key_id)
    assert (got.requests, got.errors_4xx, got.rate_limited, got.quota_exceeded) == (3, 1, 1, 0)


async def test_tokens_and_quota_refusals_are_counted(gate: Keystile) -> None:
    """Tokens a handler reserves count as AI tokens; a reservation over the budget is
    refused 429 quota_exceeded and counted as a quota refusal, consuming nothing."""
    key_id, headers = await new_key(gate, token_quota=100)
    async with http(build_app(gate)) as client:
        spent = [await client.post(f"/infer/{n}", headers=headers) for n in (30, 60, 11, 10)]
    assert [r.status_code for r in spent] == [200, 200, 429, 200]
    assert spent[2].json()["error"]["code"] == "quota_exceeded"
    got = await totals(gate, key_id)
    assert (got.requests, got.tokens, got.quota_exceeded, got.errors_4xx) == (4, 100, 1, 1)


async def test_a_quota_refusal_is_not_a_rate_limit_refusal(gate: Keystile) -> None:
    """A 429 quota_exceeded counts as a quota refusal only, not as a rate-limit refusal."""
    key_id, headers = await new_key(gate, token_quota=10)
    async with http(build_app(gate)) as client:
        refused = await client.post("/infer/11", headers=headers)
    assert refused.status_code == 429
    got = await totals(gate, key_id)
    assert (got.quota_exceeded, got.rate_limited) == (1, 0)


async def test_last_use_has_time_address_and_origin(gate: Keystile, clock: ManualClock) -> None:
    """Last use: the time from the clock, the ASGI client address, and the origin of a
    client key (none for a server key)."""
    server_id, server_headers = await new_key(gate, "prod")
    client_id, client_headers = await new_key(gate, "client")
    app = build_app(gate)
    async with http(app, "192.0.2.10") as client:
        await client.get("/bytes/1", headers=server_headers)
        await client.get("/bytes/1", headers=client_headers)
    clock.advance(125.5)
    async with http(app, "2001:db8::7") as client:
        await client.get("/bytes/1", headers=client_headers)
    assert await gate.usage.flush()
    server = (await gate.usage.report(server_id)).last_use
    browser = (await gate.usage.report(client_id)).last_use
    assert (server.at, server.ip, server.origin) == (
        to_datetime(clock() - 125.5),
        "192.0.2.10",
        None,
    )
    assert (browser.at, browser.ip, browser.origin) == (
        to_datetime(clock()),
        "2001:db8::7",
        ORIGIN,
    )
    assert server.inactive_attempt_at is None


async def test_a_rate_limited_client_request_keeps_its_origin(gate: Keystile) -> None:
    """A client key's rate-limited request still counts for its origin and last use."""
    key_id, headers = await new_key(gate, "client", rate_limit="1/minute")
    async with http(build_app(gate)) as client:
        statuses = [(await client.get("/bytes/1", headers=headers)).status_code for _ in "ab"]
    assert statuses == [200, 429]
    assert await gate.usage.flush()
    report = await gate.usage.report(key_id)
    assert report.top_origins == {ORIGIN: 2}
    assert report.last_use.origin == ORIGIN


SKEW = [20, 14, 10, 3, 2, 2, 1, 1, 1, 1]  # requests per address, busiest first


async def send_skewed(gate: Keystile, headers: dict[str, str], order: str) -> None:
    """Send SKEW's requests from 10 addresses: ``shuffled`` interleaves them in a fixed
    random order, ``bursts`` sends each address's requests together, busiest first."""
    sequence = [f"10.0.0.{i}" for i, n in enumerate(SKEW) for _ in range(n)]
    if order == "shuffled":
        random.Random(7).shuffle(sequence)
    app = build_app(gate)
    for ip in sequence:
        async with http(app, ip) as client:
            assert (await client.get("/bytes/1", headers=headers)).status_code == 200


async def test_client_addresses_are_bounded_to_the_busiest_n(gate: Keystile) -> None:
    """With usage_top_n=3, a client key used from 10 addresses keeps exact counts in the
    buffer (bounded by its own cap), the store counts them all (it tracks 10 * top_n, at
    least 1000) and the report names the busiest 3."""
    key_id, headers = await new_key(gate, "client")
    flushed: list[UsageBatch] = []
    gate.usage.on_flush.append(lambda batch, touched: flushed.append(batch))
    await send_skewed(gate, headers, "shuffled")
    assert await gate.usage.flush()
    assert [dict(batch.ips[key_id]) for batch in flushed] == [
        {f"10.0.0.{i}": n for i, n in enumerate(SKEW)}
    ]
    report = await gate.usage.report(key_id)
    assert len(report.top_ips) == 3
    assert report.top_ips["10.0.0.0"] >= SKEW[0]
    assert report.all_time.requests == sum(SKEW)
    store = gate.store.store
    if isinstance(store, RedisStore):
        assert await store.client.zcard(f"{store.namespace}:usage:{{{key_id}}}:ips") == 10


async def test_an_address_that_keeps_coming_back_climbs_into_the_busiest(
    gate: Keystile,
) -> None:
    """Three addresses make 2 requests each; then another makes 1 request per flush, ten
    times: it is the busiest, with its exact count (each flush used to cut it again)."""
    key_id, headers = await new_key(gate, "client")
    app = build_app(gate)
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3"):
        async with http(app, ip) as client:
            for _ in range(2):
                await client.get("/bytes/1", headers=headers)
    assert await gate.usage.flush()
    for _ in range(10):
        async with http(app, "10.0.0.99") as client:
            await client.get("/bytes/1", headers=headers)
        assert await gate.usage.flush()
    top = (await gate.usage.report(key_id)).top_ips
    assert next(iter(top.items())) == ("10.0.0.99", 10) and len(top) == 3


async def test_the_overview_lists_the_most_recently_used_key_first(
    gate: Keystile, clock: ManualClock
) -> None:
    """A flush that carries only tokens (or an older use) does not move a key back in the
    overview's most-recently-used order."""
    first, first_headers = await new_key(gate)
    second, second_headers = await new_key(gate)
    async with http(build_app(gate)) as client:
        await client.get("/bytes/1", headers=first_headers)
        assert await gate.usage.flush()
        clock.advance(60)
        await client.get("/bytes/1", headers=second_headers)
        assert await gate.usage.flush()
    gate.usage.record_tokens(second, 50)
    assert await gate.usage.flush()
    assert [k.key_id for k in (await gate.usage.overview(limit=2)).keys] == [second, first]
    assert [k.key_id for k in (await gate.usage.overview(limit=1)).keys] == [second]


@pytest.mark.parametrize("flush_between", [False, True], ids=["one-flush", "flush-between"])
async def test_last_use_is_the_latest_use_whatever_the_flushes(
    gate: Keystile, clock: ManualClock, flush_between: bool
) -> None:
    """A slow request that began first but is recorded last is not the last use: the
    latest start wins, flushed in between or not."""
    key_id, _ = await new_key(gate)
    t0 = clock()
    gate.usage.record(key_id, 200, 0, 1, "192.0.2.2", None, 0, t0 + 5)  # quick, later
    if flush_between:
        assert await gate.usage.flush()
    gate.usage.record(key_id, 200, 0, 1, "192.0.2.1", None, 0, t0)  # slow, began first
    assert await gate.usage.flush()
    last = (await gate.usage.report(key_id)).last_use
    assert (last.at, last.ip) == (to_datetime(t0 + 5), "192.0.2.2")


@pytest.mark.parametrize("order", ["shuffled", "bursts"])
async def test_the_busiest_addresses_are_reported_exactly(gate: Keystile, order: str) -> None:
    """With usage_top_n=3, the report names the 3 busiest addresses with their exact counts."""
    key_id, headers = await new_key(gate, "client")
    await send_skewed(gate, headers, order)
    assert await gate.usage.flush()
    report = await gate.usage.report(key_id)
    assert report.top_ips == {"10.0.0.0": 20, "10.0.0.1": 14, "10.0.0.2": 10}


async def test_client_origins_are_counted(gate: Keystile) -> None:
    """A client key's requests count per origin it was used from."""
    other = "https://admin.example.com"
    key_id, headers = await new_key(gate, "client", allowed_origins=[ORIGIN, other])
    async with http(build_app(gate)) as client:
        for origin in (ORIGIN, other, ORIGIN, ORIGIN):
            await client.get("/bytes/1", headers={**headers, "Origin": origin})
    assert await gate.usage.flush()
    assert (await gate.usage.report(key_id)).top_origins == {ORIGIN: 3, other: 1}


async def test_revoked_and_expired_keys_count_attempts(gate: Keystile, clock: ManualClock) -> None:
    """Attempts with a revoked or an expired key are refused and count against that key's
    id as inactive attempts, with the time of the last one — not as requests."""
    revoked_id, revoked_headers = await new_key(gate, "prod")
    expires = to_datetime(clock() + 30)
    expired_id, expired_headers = await new_key(gate, "prod", expires_at=expires)
    app = build_app(gate)
    async with http(app) as client:
        assert (await client.get("/bytes/1", headers=revoked_headers)).status_code == 200
        await gate.manager.revoke(revoked_id)
        for _ in range(3):
            clock.advance(10)
            refused = await client.get("/bytes/1", headers=revoked_headers)
            assert refused.json()["error"]["code"] == "revoked_api_key"
        last_revoked_attempt = clock()
        clock.advance(1)  # the expired key's 30 seconds are over
        refused = await client.get("/bytes/1", headers=expired_headers)
        assert refused.json()["error"]["code"] == "expired_api_key"
    assert await gate.usage.flush()
    revoked = await gate.usage.report(revoked_id)
    expired = await gate.usage.report(expired_id)
    assert (revoked.all_time.requests, revoked.all_time.inactive_attempts) == (1, 3)
    assert revoked.last_use.inactive_attempt_at == to_datetime(last_revoked_attempt)
    assert (expired.all_time.requests, expired.all_time.inactive_attempts) == (0, 1)
    assert expired.last_use.inactive_attempt_at == to_datetime(clock())


# -- time buckets and retention -------------------------------------------------------------


async def test_per_minute_series(gate: Keystile, clock: ManualClock) -> None:
    """Requests land in the bucket of their minute; a range reports only its own buckets,
    and an empty minute has no point."""
    t0 = clock()  # a minute boundary
    key_id, headers = await new_key(gate)
    async with http(build_app(gate)) as client:
        for offset, n in ((0, 1), (61, 2), (59, 0), (60, 3)):  # minutes 0, 1, 3
            clock.advance(offset)
            for _ in range(n):
                await client.get("/bytes/4", headers=headers)
            assert await gate.usage.flush()
    end = to_datetime(t0 + 4 * 60)
    report = await gate.usage.report(key_id, start=to_datetime(t0), end=end)
    assert [(p.start, p.counts.requests) for p in report.series] == [
        (to_datetime(t0), 1),
        (to_datetime(t0 + 60), 2),
        (to_datetime(t0 + 180), 3),
    ]
    assert report.totals == counts(requests=6, bytes_out=24)
    middle = await gate.usage.report(key_id, start=to_datetime(t0 + 60), end=to_datetime(t0 + 120))
    assert [p.counts.requests for p in middle.series] == [2]
    assert middle.totals.requests == 2 and middle.all_time.requests == 6
    latest = await gate.usage.report(key_id)  # default: the hour up to and including now
    assert latest.totals.requests == 6


async def test_per_day_series(gate: Keystile, clock: ManualClock) -> None:
    """Requests land in the bucket of their UTC day; the day series skips empty days."""
    key_id, headers = await new_key(gate)
    first_day = int(clock() // DAY) * DAY
    async with http(build_app(gate)) as client:
        for offset, n in ((0, 1), (DAY, 2), (DAY, 0), (DAY, 3)):  # days 0, 1, 3
            clock.advance(offset)
            for _ in range(n):
                await client.get("/bytes/1", headers=headers)
            assert await gate.usage.flush()
    report = await gate.usage.report(
        key_id, start=to_datetime(first_day), end=to_datetime(clock() + 1), granularity="day"
    )
    assert [(p.start, p.counts.requests) for p in report.series] == [
        (to_datetime(first_day), 1),
        (to_datetime(first_day + DAY), 2),
        (to_datetime(first_day + 3 * DAY), 3),
    ]
    assert report.totals.requests == report.all_time.requests == 6


@pytest.mark.parametrize(
    ("granularity", "back"),
    [("minute", 90 * DAY), ("day", 500 * DAY), ("minute", None), ("day", None)],
    ids=["minute-90-days", "day-500-days", "minute-from-year-1", "day-from-year-1"],
)
async def test_a_long_range_reports_the_recent_buckets_quickly(
    gate: Keystile, clock: ManualClock, granularity: Granularity, back: float | None
) -> None:
    """A range reaching far past what is kept (90 days of minutes, 500 days of days, or
    from year 1) still reports the buckets that are kept, and reads no more than those."""
    key_id, headers = await new_key(gate)
    async with http(build_app(gate)) as client:
        for _ in range(5):
            await client.get("/bytes/2", headers=headers)
    assert await gate.usage.flush()
    start = to_datetime(clock() - back) if back is not None else datetime(1, 1, 2, tzinfo=UTC)
    began = time.perf_counter()
    report = await gate.usage.report(key_id, start=start, granularity=granularity)
    assert time.perf_counter() - began < 1.0
    assert report.start == start and report.totals == counts(requests=5, bytes_out=10)
    assert [p.counts.requests for p in report.series] == [5]


async def test_memory_store_drops_buckets_past_retention(clock: ManualClock) -> None:
    """In memory, minute buckets older than the minute retention and day buckets older than
    the day retention are dropped; the all-time totals stay."""
    gate = make_gate(MemoryStore(), clock, usage_minute_retention=120, usage_day_retention=DAY)
    key_id, headers = await new_key(gate)
    t0 = clock()
    async with http(build_app(gate)) as client:
        for offset in (0, 60, 240):
            clock.advance(offset)
            await client.get("/bytes/1", headers=headers)
            assert await gate.usage.flush()
        minutes = await gate.usage.report(
            key_id, start=to_datetime(t0), end=to_datetime(clock() + 60)
        )
        assert [p.start for p in minutes.series] == [to_datetime(t0 + 300)]
        clock.advance(2 * DAY)
        await client.get("/bytes/1", headers=headers)
        assert await gate.usage.flush()
    days = await gate.usage.report(key_id, start=to_datetime(t0 - DAY), granularity="day")
    assert [p.start for p in days.series] == [to_datetime(int(clock() // DAY) * DAY)]
    assert days.all_time.requests == 4
    await gate.usage.close()


@pytest.fixture(params=["fakeredis", "redis"])
async def redis_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A Redis store (fakeredis or the real server) under a fresh namespace."""
    namespace = new_namespace()
    if request.param == "fakeredis":
        made = RedisStore(fakeredis.FakeAsyncRedis(), namespace=namespace)
    else:
        require_redis()
        made = RedisStore.from_url(REDIS_URL, namespace=namespace)
    yield made
    await made.close()
    if request.param == "redis":
        cleanup_namespace(namespace)


async def write_every_usage_name(gate: Keystile) -> None:
    """Traffic that makes usage and alerts write each kind of name they have: buckets,
    totals, client tables, batch markers, seen addresses (new_ip) and alert cool-downs."""
    prod_id, prod_headers = await new_key(gate, "prod")
    _, client_headers = await new_key(gate, "client")
    app = build_app(gate)
    for ip in ("192.0.2.1", "192.0.2.2"):  # a second address for the prod key: new_ip
        async with http(app, ip) as client:
            await client.get("/bytes/1", headers=prod_headers)
            await client.get("/bytes/1", headers=client_headers)
            await client.post("/infer/5", headers=prod_headers)
        assert await gate.usage.flush()
    await gate.manager.revoke(prod_id)
    async with http(app) as client:
        await client.get("/bytes/1", headers=prod_headers)  # inactive_key_in_use
    await gate.usage.close()


async def test_every_redis_name_carries_a_ttl(redis_store: RedisStore, clock: ManualClock) -> None:
    """Every name usage and alerts write under the namespace has a TTL, and the minute
    buckets live no longer than the minute retention allows."""
    gate = make_gate(redis_store, clock, usage_minute_retention=120)
    await write_every_usage_name(gate)
    assert gate.alerts.fired >= 2
    ns, redis_client = redis_store.namespace, redis_store.client
    names = [
        name.decode()
        for pattern in (f"{ns}:usage:*", f"{ns}:alert:*")
        async for name in redis_client.scan_iter(match=pattern, count=1000)
    ]
    assert any(":usage:" in n and ":m:" in n for n in names)
    assert any(":alert:" in n for n in names)
    ttls = {name: await redis_client.ttl(name) for name in names}
    assert all(ttl > 0 for ttl in ttls.values()), ttls
    assert all(t <= 120 + 3600 for n, t in ttls.items() if ":m:" in n), ttls


# -- cost: batching, bounds, failures, shutdown ---------------------------------------------


# The probe's own handshake, INFO and CONFIG, and the announcement channel's heartbeat.
_PROBE_COMMANDS = ("hello", "info", "config", "ping")


def client_commands(server: RedisServer) -> dict[str, int]:
    """Calls per command since the last reset, the probe's own left out."""
    return {
        name: calls
        for name, calls in server.commands().items()
        if not name.startswith(_PROBE_COMMANDS)
    }


@pytest.fixture
async def own_gate(own_redis: RedisServer, clock: ManualClock) -> AsyncIterator[Keystile]:
    """A gate on the test's own redis-server, closed afterwards."""
    gate = make_gate(RedisStore.from_url(own_redis.url, namespace="ks-usage"), clock)
    yield gate
    await gate.aclose()


class Calls:
    """Counts pipelines and single commands a Redis client sends."""

    def __init__(self, client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.pipelines = 0
        self.commands = 0
        pipeline, execute = client.pipeline, client.execute_command

        def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
            self.pipelines += 1
            return pipeline(*args, **kwargs)

        async def counting_execute(*args: Any, **kwargs: Any) -> Any:
            self.commands += 1
            return await execute(*args, **kwargs)

        monkeypatch.setattr(client, "pipeline", counting_pipeline)
        monkeypatch.setattr(client, "execute_command", counting_execute)


async def test_recording_costs_no_redis_round_trip(
    own_redis: RedisServer, own_gate: Keystile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requests with recording send no Redis command; one flush is one round trip, an
    EVALSHA (alert rules that read the key record turned off, see the next test)."""
    gate = own_gate
    gate.alerts.rules = AlertRules(new_ip_for_prod=False, rotation_due=False)
    await gate.startup()  # announcements subscribed: the cached key stays trusted
    key_id, headers = await new_key(gate, "prod")
    client = gate.store.store.client  # type: ignore[attr-defined]
    async with http(build_app(gate)) as http_client:
        await http_client.get("/bytes/1", headers=headers)  # looks the key up, then cached
        assert await gate.usage.flush()
        own_redis.reset()
        calls = Calls(client, monkeypatch)
        for n in range(50):
            response = await http_client.post("/echo", content=b"b" * n, headers=headers)
            assert response.text == str(n)
        assert client_commands(own_redis) == {}
        assert (calls.pipelines, calls.commands, gate.usage.flushes) == (0, 0, 1)
        assert await gate.usage.flush()
    assert (calls.pipelines, calls.commands, gate.usage.flushes) == (0, 1, 2)
    assert client_commands(own_redis).get("hincrby", 0) > 0
    monkeypatch.undo()
    assert (await totals(gate, key_id)).requests == 51


async def flush_round_trips(gate: Keystile, keys: int, monkeypatch: pytest.MonkeyPatch) -> int:
    """Round trips (pipelines and single commands) of one flush after one request from
    each of ``keys`` production keys, with the default alert rules."""
    made = [await new_key(gate, "prod") for _ in range(keys)]
    async with http(build_app(gate)) as client:
        for _, headers in made:
            await client.get("/bytes/1", headers=headers)
        calls = Calls(gate.store.store.client, monkeypatch)  # type: ignore[attr-defined]
        assert await gate.usage.flush()
    monkeypatch.undo()
    return calls.pipelines + calls.commands


async def test_a_flush_costs_the_same_round_trips_for_many_keys(
    own_gate: Keystile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the default alert rules, a flush for 10 active keys costs no more round trips
    than a flush for one."""
    one = await flush_round_trips(own_gate, 1, monkeypatch)
    ten = await flush_round_trips(own_gate, 10, monkeypatch)
    assert ten <= one


async def test_the_buffer_is_bounded(store: KeyStore, clock: ManualClock) -> None:
    """With room for 2 key-minutes, counts for further keys are dropped and counted in
    ``dropped`` instead of growing the buffer; the kept keys are exact."""
    gate = make_gate(store, clock, usage_max_buckets=2)
    keys = [await new_key(gate) for _ in range(6)]
    flushed: list[int] = []
    gate.usage.on_flush.append(lambda batch, touched: flushed.append(batch.rows))
    async with http(build_app(gate)) as client:
        for _, headers in keys:
            await client.get("/bytes/1", headers=headers)
        await client.get("/bytes/1", headers=keys[0][1])  # a kept key still counts
    gate.usage.record_tokens(keys[5][0], 10)
    assert gate.usage.dropped == 5
    assert await gate.usage.flush()
    assert flushed == [2]
    got = [(await gate.usage.report(key_id)).all_time.requests for key_id, _ in keys]
    assert got == [2, 1, 0, 0, 0, 0]
    await gate.usage.close()


async def test_a_failed_flush_keeps_its_counts(
    own_redis: RedisServer, own_gate: Keystile, clock: ManualClock
) -> None:
    """While Redis is down a flush fails and keeps its counts; once Redis is back (same
    port, empty) the next flush writes every count exactly."""
    gate = own_gate
    key_id, headers = await new_key(gate, "prod")
    sent_out = 0
    async with http(build_app(gate)) as client:
        for n in range(10):
            sent_out += len((await client.get(f"/bytes/{n}", headers=headers)).content)
        own_redis.kill()
        assert not await gate.usage.flush()
        for _ in range(5):  # the key is cached: traffic goes on while Redis is down
            response = await client.post("/echo", content=b"d" * 100, headers=headers)
            sent_out += len(response.content)
        clock.advance(60)  # a new minute: the kept batch and the new one merge
        await client.get("/fail/500", headers=headers)
        sent_out += len(b"failed")
        assert not await gate.usage.flush()
    assert gate.usage.failed_flushes == 2
    await asyncio.to_thread(own_redis.start)
    assert await gate.usage.flush()
    assert (gate.usage.failed_flushes, gate.usage.dropped) == (2, 0)
    got = (await gate.usage.report(key_id)).all_time
    assert got == counts(requests=16, bytes_in=500, bytes_out=sent_out, errors_5xx=1)


class StallingProxy:
    """A TCP proxy on a loopback port in front of a Redis server. While ``stalled``, the
    server's replies are swallowed: commands still arrive and run, the client hears nothing
    (a reply lost to the network, or a server slower than the client's timeout)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.stalled = False
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        await asyncio.gather(
            self._pipe(reader, up_writer, replies=False),
            self._pipe(up_reader, writer, replies=True),
            return_exceptions=True,
        )
        self._tasks.discard(task)

    async def _pipe(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        try:
            while data := await source.read(65_536):
                if not (replies and self.stalled):
                    sink.write(data)
                    await sink.drain()
        finally:
            sink.close()

    async def close(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()


async def test_a_flush_whose_reply_is_lost_counts_once(
    own_redis: RedisServer, clock: ManualClock
) -> None:
    """A flush that times out after Redis ran it, retried at the next flush, counts once."""
    proxy = StallingProxy(own_redis.port)
    await proxy.start()
    gate = make_gate(RedisStore.from_url(proxy.url, namespace="ks-usage", timeout=0.2), clock)
    try:
        key_id, headers = await new_key(gate, "prod")
        async with http(build_app(gate)) as client:
            for _ in range(5):
                await client.get("/bytes/1", headers=headers)
            assert await gate.usage.flush()
            for _ in range(5):
                await client.get("/bytes/1", headers=headers)
        proxy.stalled = True
        assert not await gate.usage.flush()
        proxy.stalled = False
        assert await gate.usage.flush()
        assert (await gate.usage.report(key_id)).all_time.requests == 10
    finally:
        await gate.aclose()
        await proxy.close()


class FailingWrites:
    """A usage store whose writes fail as a Redis store's do when Redis is unreachable
    (StoreUnavailable, the stores' one error contract), while ``failing``;
    ``during`` runs while a failing write is in flight (traffic that goes on meanwhile)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.failing = True
        self.during: Callable[[], Awaitable[None]] | None = None

    async def write(self, batch: UsageBatch) -> Any:
        if self.failing:
            if self.during is not None:
                await self.during()
            raise StoreUnavailable("Redis is unreachable while writing usage: ConnectionError")
        return await self.inner.write(batch)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


async def test_failed_flushes_keep_the_address_tables_bounded(clock: ManualClock) -> None:
    """While flushes fail under traffic, a client key's buffered per-IP table still holds at
    most top_n addresses."""
    gate = make_gate(MemoryStore(), clock, usage_top_n=3)
    gate.usage.store = failing = FailingWrites(gate.usage.store)
    key_id, headers = await new_key(gate, "client")
    app = build_app(gate)
    addresses = iter(f"10.1.{i // 3}.{i % 3}" for i in range(15))

    async def traffic() -> None:
        for _ in range(3):
            async with http(app, next(addresses)) as client:
                await client.get("/bytes/1", headers=headers)

    await traffic()
    failing.during = traffic
    for _ in range(4):
        assert not await gate.usage.flush()
    failing.failing = False
    flushed: list[UsageBatch] = []
    gate.usage.on_flush.append(lambda batch, touched: flushed.append(batch))
    assert await gate.usage.flush()
    assert (await gate.usage.report(key_id)).all_time.requests == 15
    assert all(len(batch.ips[key_id]) <= gate.usage.table_cap for batch in flushed)
    await gate.usage.close()


async def test_lifespan_shutdown_flushes(store: KeyStore, clock: ManualClock) -> None:
    """The app's lifespan shutdown, through the middleware, flushes what is buffered."""
    gate = make_gate(store, clock)
    key_id, headers = await new_key(gate)
    app = build_app(gate)
    async with lifespan(app) as answered, http(app) as client:
        for _ in range(3):
            await client.post("/echo", content=b"12345", headers=headers)
        assert gate.usage.flushes == 0
    assert answered == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert gate.usage.flushes == 1
    report = await gate.usage.report(key_id)
    assert report.all_time == counts(requests=3, bytes_in=15, bytes_out=3)


async def test_close_flushes(store: KeyStore, clock: ManualClock) -> None:
    """UsageRecorder.close() flushes what is buffered and stops the background flush."""
    gate = make_gate(store, clock)
    key_id, headers = await new_key(gate)
    async with http(build_app(gate)) as client:
        await client.get("/bytes/3", headers=headers)
    await gate.usage.close()
    assert gate.usage.flushes == 1
    assert (await gate.usage.report(key_id)).all_time == counts(requests=1, bytes_out=3)


async def test_the_background_task_flushes(store: KeyStore, clock: ManualClock) -> None:
    """Without an explicit flush, the background task writes within its interval: the
    first request starts it, and the requests recorded after it, still waiting to be added
    up in the buffer (fewer than a slice), go out with it too."""
    gate = make_gate(store, clock, usage_flush_interval=0.05)
    key_id, headers = await new_key(gate)
    async with http(build_app(gate)) as client:
        for _ in range(3):
            await client.get("/bytes/3", headers=headers)

    async def flushed() -> bool:
        return (await gate.usage.report(key_id)).all_time.requests == 3

    deadline = asyncio.get_running_loop().time() + 2
    while not await flushed():
        assert asyncio.get_running_loop().time() < deadline, "no flush within 2 s"
        await asyncio.sleep(0.01)
    await gate.usage.close()


# -- exactness across processes -------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
async def test_three_processes_count_exactly(redis_namespace: str, figures: Figures) -> None:
    """Three app processes sharing the real Redis, each sending 2,000 mixed requests with
    one production key and shutting down gracefully, lose and double nothing."""
    store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace)
    gate = Keystile(store=store, secret=SECRET, settings=QUIET)
    created = await gate.manager.create({"name": "shared", "type": "prod"})
    env = {**os.environ, "KS_USAGE_TOKEN": created.secret.get_secret_value()}
    started = time.perf_counter()
    workers = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            str(WORKER),
            REDIS_URL,
            redis_namespace,
            SECRET,
            str(seed),
            "2000",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for seed in range(3)
    ]
    outputs = await asyncio.wait_for(asyncio.gather(*(w.communicate() for w in workers)), 60)
    elapsed = time.perf_counter() - started
    for worker, (_, err) in zip(workers, outputs, strict=True):
        assert worker.returncode == 0, err.decode()
    answers = [json.loads(out) for out, _ in outputs]
    assert [(a["failed_flushes"], a["dropped"]) for a in answers] == [(0, 0)] * 3
    expected = {field: sum(a["sent"][field] for a in answers) for field in FIELDS}
    got = (await gate.usage.report(created.key.id)).all_time.model_dump()
    assert got == expected
    assert expected["requests"] == 6000 and expected["errors_4xx"] and expected["errors_5xx"]
    figures.add(
        f"usage exactness: 3 processes × 2,000 requests → {got['requests']} requests, "
        f"{got['bytes_in']:,} B in, {got['bytes_out']:,} B out, {got['errors_4xx']} 4xx, "
        f"{got['errors_5xx']} 5xx counted exactly in Redis over "
        f"{sum(a['flushes'] for a in answers)} flushes ({elapsed:.1f} s)"
    )
    await gate.aclose()


async def test_a_websocket_counts_with_its_address_and_origin(gate: Keystile) -> None:
    """A client key's websocket handshake that is let through counts as a request from its
    address and origin, in the busiest-IP and busiest-origin tables like any request."""
    from test_middleware import handshake, websocket_app

    key_id, headers = await new_key(gate, "client", scopes=["vec:read"])
    sent = await handshake(
        websocket_app(gate), [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    )
    assert sent[0]["type"] == "websocket.accept"
    assert await gate.usage.flush()
    report = await gate.usage.report(key_id)
    assert report.all_time.requests == 1
    assert report.top_ips == {"127.0.0.1": 1}
    assert report.top_origins == {ORIGIN: 1}


def test_retention_is_bounded_by_what_a_report_reads_back() -> None:
    """Minute buckets are kept 30 days at most and day buckets 366 (a report reads back at
    most 2000 hours and 400 days from Redis): longer settings are refused, not undercounted."""
    from keystile import ConfigurationError

    assert KeystileSettings(usage_minute_retention=30 * DAY, usage_day_retention=366 * DAY)
    for too_long in ({"usage_minute_retention": 31 * DAY}, {"usage_day_retention": 367 * DAY}):
        with pytest.raises(ConfigurationError, match=f"^{next(iter(too_long))}="):
            KeystileSettings(**too_long)
