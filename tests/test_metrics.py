"""Prometheus metrics: every counter after a scripted mix, and two workers adding up
(issue #17, item 1)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from conftest import REDIS_URL, SECRET, require_redis
from faults.server import Server, child_env, serve_command
from keystile import KeyHasher, KeyManager, Keystile, KeystileMiddleware, RedisStore, Rule, public
from keystile.metrics import GateMetrics, metrics_app
from keystile.records import CreatedKey
from usage_app import http

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(scraped: Samples, name: str, **labels: str) -> float:
    return scraped.get((name, tuple(sorted(labels.items()))), 0.0)


async def infer(request: Request) -> Response:
    await request.app.state.gate.quotas.reserve(request, 100)
    return JSONResponse({"ok": True})


async def read(request: Request) -> Response:
    return JSONResponse({"ok": True})


def scripted_app(gate: Keystile) -> Starlette:
    app = Starlette(routes=[Route("/read", read), Route("/infer", infer, methods=["POST"])])
    app.state.gate = gate
    app.add_route("/metrics", metrics_app(gate))
    app.add_middleware(
        KeystileMiddleware,
        gate=gate,
        rules=[public("/metrics"), Rule("GET", "/read", ["vec:read"])],
    )
    return app


async def scripted_keys(gate: Keystile) -> tuple[CreatedKey, CreatedKey]:
    """A dev key that reads and infers, and a client key limited to 2 requests a minute."""
    dev = await gate.manager.create(
        {"name": "d", "type": "dev", "scopes": ["vec:read", "ai:inference"]}
    )
    limited = await gate.manager.create(
        {
            "name": "c",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": ["https://app.example"],
            "rate_limit": "2/minute",
        }
    )
    return dev, limited


async def test_a_scrape_counts_every_outcome_of_a_scripted_mix() -> None:
    gate = Keystile()
    app = scripted_app(gate)
    dev, limited = await scripted_keys(gate)
    writer = await gate.manager.create({"name": "w", "type": "prod", "scopes": ["kev:write"]})
    gone = await gate.manager.create({"name": "g", "type": "prod", "scopes": ["vec:read"]})
    await gate.manager.revoke(gone.key.id)

    def bearer(created: Any) -> dict[str, str]:
        return {"Authorization": f"Bearer {created.secret.get_secret_value()}"}

    browser = {**bearer(limited), "Origin": "https://app.example"}
    async with http(app) as client:
        statuses = [
            *[(await client.get("/read", headers=bearer(dev))).status_code for _ in range(3)],
            (await client.post("/infer", headers=bearer(dev))).status_code,
            *[(await client.get("/read", headers=browser)).status_code for _ in range(3)],
            (await client.get("/read")).status_code,
            (await client.get("/read", headers={"Authorization": "Bearer dev_nope"})).status_code,
            (await client.get("/read", headers=bearer(writer))).status_code,
            (await client.get("/read", headers=bearer(gone))).status_code,
        ]
        assert statuses == [200, 200, 200, 200, 200, 200, 429, 401, 401, 403, 401]
        await gate.usage.flush()
        scrape = await client.get("/metrics")
    assert scrape.status_code == 200
    scraped = samples(scrape.text)
    requests = "keystile_requests_total"
    assert value(scraped, requests, outcome="admitted", key_type="dev") == 4
    assert value(scraped, requests, outcome="admitted", key_type="client") == 2
    assert value(scraped, requests, outcome="rate_limited", key_type="client") == 1
    assert value(scraped, requests, outcome="missing_api_key", key_type="none") == 1
    assert value(scraped, requests, outcome="invalid_api_key", key_type="none") == 1
    assert value(scraped, requests, outcome="insufficient_scope", key_type="prod") == 1
    assert value(scraped, requests, outcome="revoked_api_key", key_type="prod") == 1
    assert value(scraped, "keystile_auth_seconds_count") == 6
    assert 0 < value(scraped, "keystile_auth_seconds_sum") < 6
    assert value(scraped, "keystile_auth_seconds_bucket", le="+Inf") == 6
    decisions = "keystile_rate_limit_decisions_total"
    assert value(scraped, decisions, decision="allowed") == 2
    assert value(scraped, decisions, decision="refused") == 1
    assert value(scraped, decisions, decision="degraded") == 0
    quotas = "keystile_quota_decisions_total"
    assert value(scraped, quotas, mode="reserve", decision="allowed") == 1
    # Four keys were looked up (dev_nope fails its checksum first): a miss each, then the
    # dev key's 3 and the client key's 2 later requests hit; the revoked key is cached too.
    assert value(scraped, "keystile_cache_misses_total") == 4
    assert value(scraped, "keystile_cache_hits_total") == 5
    assert value(scraped, "keystile_cache_entries") == 4
    assert value(scraped, "keystile_usage_flushes_total", result="ok") == 1
    assert value(scraped, "keystile_usage_flush_rows_total") == 4  # four keys, one minute
    assert value(scraped, "keystile_usage_dropped_total") == 0
    assert value(scraped, "keystile_alerts_fired_total") == 1  # the revoked key, in use
    assert value(scraped, "keystile_redis_errors_total", purpose="key store") == 0
    # Bounded labels: no key id, hint or path anywhere in the scrape.
    for created in (dev, limited, writer, gone):
        assert created.key.id not in scrape.text and created.key.hint not in scrape.text
    assert "/read" not in scrape.text
    await gate.aclose()


ROUND_TRIP_COUNT = "keystile_redis_round_trip_seconds_count"


async def test_redis_round_trips_are_timed_by_purpose(redis_namespace: str) -> None:
    """Over Redis, a scripted mix — two keys' first lookups, three rate-limit decisions, a
    token-quota spend, a usage flush, a key revoked — adds exactly that many observations
    to keystile_redis_round_trip_seconds under each purpose (the rate limiter's as many as
    the limiter's own count of its round trips), each taking some time."""
    require_redis()
    gate = Keystile(redis_url=REDIS_URL, secret=SECRET, namespace=redis_namespace)
    app = scripted_app(gate)
    await gate.limiter.start()
    await gate.quotas.store.start()
    dev, limited = await scripted_keys(gate)
    dev_auth = {"Authorization": f"Bearer {dev.secret.get_secret_value()}"}
    browser = {
        "Authorization": f"Bearer {limited.secret.get_secret_value()}",
        "Origin": "https://app.example",
    }
    try:
        async with http(app) as client:
            before = samples((await client.get("/metrics")).text)
            limiter_before = gate.limiter.round_trips
            statuses = [
                *[(await client.get("/read", headers=dev_auth)).status_code for _ in range(2)],
                (await client.post("/infer", headers=dev_auth)).status_code,
                *[(await client.get("/read", headers=browser)).status_code for _ in range(3)],
            ]
            assert statuses == [200, 200, 200, 200, 200, 429]
            await gate.usage.flush()
            await gate.manager.revoke(dev.key.id)
            after = samples((await client.get("/metrics")).text)
        limiter_round_trips = gate.limiter.round_trips - limiter_before
    finally:
        await gate.aclose()

    def made(purpose: str) -> float:
        return value(after, ROUND_TRIP_COUNT, purpose=purpose) - value(
            before, ROUND_TRIP_COUNT, purpose=purpose
        )

    assert made("key lookup") == 2  # each key's first request; the rest are cached
    assert made("rate limiter") == limiter_round_trips == 3
    assert made("quotas") == 1
    assert made("usage flush") == 1
    assert made("key store") == 2  # the revocation: the record read, then replaced
    assert made("other") == 0
    for purpose in ("key lookup", "rate limiter", "quotas", "usage flush", "key store"):
        took = value(after, "keystile_redis_round_trip_seconds_sum", purpose=purpose)
        assert took - value(before, "keystile_redis_round_trip_seconds_sum", purpose=purpose) > 0
        assert value(
            after, "keystile_redis_round_trip_seconds_bucket", purpose=purpose, le="+Inf"
        ) == value(after, ROUND_TRIP_COUNT, purpose=purpose)


async def test_round_trips_are_not_timed_while_metrics_are_off(
    redis_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Until metrics are made, a Redis round trip is not timed: nothing is counted."""
    from keystile.telemetry import ROUND_TRIPS

    require_redis()
    monkeypatch.setattr(ROUND_TRIPS, "on", False)
    monkeypatch.setattr(ROUND_TRIPS, "counts", {})
    store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace)
    manager = KeyManager(store, KeyHasher(SECRET))
    created = await manager.create({"name": "k", "type": "dev"})
    assert await manager.get(created.key.id) == created.key
    await store.close()
    assert ROUND_TRIPS.counts == {}


async def test_metrics_register_with_the_apps_own_registry_and_can_be_left_out() -> None:
    registry = CollectorRegistry()
    gate = Keystile()
    GateMetrics(gate, registry=registry)
    app = Starlette(routes=[Route("/read", read)])
    app.add_middleware(KeystileMiddleware, gate=gate, metrics=False)
    async with http(app) as client:
        assert (await client.get("/read")).status_code == 401
    name = ("keystile_requests_total", {"outcome": "missing_api_key", "key_type": "none"})
    assert registry.get_sample_value(*name) is None  # metrics=False: not even counted
    counted = Starlette(routes=[Route("/read", read)])
    counted.add_middleware(KeystileMiddleware, gate=gate)
    async with http(counted) as client:
        assert (await client.get("/read")).status_code == 401
    assert registry.get_sample_value(*name) == 1
    await gate.aclose()


WORKER_APP = """
import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from keystile import Keystile, KeystileMiddleware, public
from keystile.metrics import metrics_app


async def pid(request):
    return JSONResponse({"pid": os.getpid()})


async def health(request):
    return JSONResponse({})


gate = Keystile()
app = Starlette(routes=[Route("/pid", pid), Route("/health", health)])
app.add_route("/metrics", metrics_app(gate, interval=0.1))
app.add_middleware(
    KeystileMiddleware, gate=gate, rules=[public("/metrics"), public("/health")]
)
"""


@pytest.mark.slow
def test_two_uvicorn_workers_add_up_in_multiprocess_mode(
    tmp_path: Path, redis_namespace: str
) -> None:
    """Two workers, prometheus_client's multiprocess mode: a scrape (answered by either
    worker) counts every request either worker decided."""
    require_redis()
    (tmp_path / "worker_app.py").write_text(textwrap.dedent(WORKER_APP))
    files = tmp_path / "prometheus"
    files.mkdir()
    env = child_env(
        PROMETHEUS_MULTIPROC_DIR=str(files),
        KEYSTILE_REDIS_URL=REDIS_URL,
        KEYSTILE_SECRET=SECRET,
        KEYSTILE_NAMESPACE=redis_namespace,
    )

    async def issue() -> str:
        store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace)
        created = await KeyManager(store, KeyHasher(SECRET)).create({"name": "w", "type": "dev"})
        await store.close()
        return created.secret.get_secret_value()

    headers = {"Authorization": f"Bearer {asyncio.run(issue())}"}

    def argv(port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "uvicorn", "worker_app:app", "--workers", "2"),
            *("--host", "127.0.0.1", "--port", str(port), "--app-dir", str(tmp_path)),
        ]

    with serve_command(argv, env, kind=Server, workers=2) as server:
        pids: set[int] = set()
        admitted = refused = 0
        # New connections until both workers have answered (bounded).
        for _ in range(400):
            with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
                answer = client.get("/pid", headers=headers)
                assert answer.status_code == 200
                pids.add(answer.json()["pid"])
                admitted += 1
                assert client.get("/pid").status_code == 401
                refused += 1
            if len(pids) == 2 and admitted >= 20:
                break
        assert len(pids) == 2, "the kernel gave every connection to one worker"
        deadline = time.monotonic() + 10
        while True:
            with httpx.Client(base_url=server.base_url, timeout=5.0) as client:
                scraped = samples(client.get("/metrics").text)
            admitted_counted = value(
                scraped, "keystile_requests_total", outcome="admitted", key_type="dev"
            )
            refused_counted = value(
                scraped, "keystile_requests_total", outcome="missing_api_key", key_type="none"
            )
            counts = (admitted_counted, refused_counted)
            if counts == (admitted, refused) or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # bounded: each worker syncs every 0.1 s
        assert counts == (admitted, refused)
        assert value(scraped, "keystile_auth_seconds_count") == admitted


def test_every_redis_action_has_a_purpose() -> None:
    """Every action the library names where it talks to Redis maps to a purpose of the
    round-trip histogram, so none is counted as "other"."""
    import re
    from pathlib import Path

    from keystile.redis.errors import PURPOSES

    source = Path(__file__).parents[1] / "src" / "keystile"
    named = {
        action
        for path in source.rglob("*.py")
        for action in re.findall(r'(?:redis_errors|translated)\(\s*"([^"]+)"', path.read_text())
    }
    assert len(named) > 20
    assert named - set(PURPOSES) == set()
