"""AI token quotas: an hourly budget per key, spent before or after the work (docs/usage.md)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import fakeredis
import httpx
import pytest
from http_sfv import List as SFList
from redis.asyncio import Redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import SECRET, fake_redis, new_namespace
from faults.redis_server import RedisServer
from keystile import Keystile, KeystileSettings, ManualClock, RedisStore
from keystile.demo import build_demo_app
from keystile.middleware import KeystileMiddleware
from keystile.models import ApiKey
from keystile.quotas import MemoryQuotaStore, Mode, Quotas, QuotaState, RedisQuotaStore
from keystile.stores import KeyStore

T0 = 1_800_000_000.0  # a minute boundary


class Spender:
    """One quota store of each backend, spending at a time the test controls."""

    def __init__(self, store: KeyStore) -> None:
        self.clock = ManualClock(T0)
        if isinstance(store, RedisStore):
            self.redis: RedisQuotaStore | None = RedisQuotaStore(
                store.client, namespace=store.namespace
            )
            self.memory = None
        else:
            self.redis = None
            self.memory = MemoryQuotaStore(clock=self.clock)

    async def spend(self, tokens: int, mode: Mode, quota: int = 100) -> QuotaState:
        if self.redis is not None:
            return await self.redis.spend("key_q", tokens, quota, mode, int(self.clock() * 1000))
        assert self.memory is not None
        return await self.memory.spend("key_q", tokens, quota, mode)


@pytest.fixture
def spender(store: KeyStore) -> Spender:
    return Spender(store)


async def test_reserve_counts_only_what_fits(spender: Spender) -> None:
    """reserve() counts tokens that fit the budget and refuses, counting nothing, otherwise."""
    first = await spender.spend(60, "reserve")
    assert (first.allowed, first.remaining) == (True, 40)
    refused = await spender.spend(41, "reserve")
    assert (refused.allowed, refused.remaining) == (False, 40)
    exact = await spender.spend(40, "reserve")
    assert (exact.allowed, exact.remaining) == (True, 0)


async def test_check_then_record(spender: Spender) -> None:
    """check() refuses only a spent budget; record() counts whatever was spent, even past it."""
    assert (await spender.spend(0, "check")).allowed
    over = await spender.spend(130, "record")
    assert (over.allowed, over.remaining) == (True, -30)
    assert not (await spender.spend(0, "check")).allowed
    assert not (await spender.spend(1, "reserve")).allowed


async def test_the_budget_rolls_over_an_hour(spender: Spender) -> None:
    """Tokens count for the minute they were spent in and the 59 after it, then free up."""
    await spender.spend(70, "reserve")
    spender.clock.advance(30 * 60)
    half = await spender.spend(30, "reserve")
    assert (half.allowed, half.remaining) == (True, 0)
    assert half.reset == 30 * 60  # the first minute leaves the rolling hour in 30 minutes
    spender.clock.advance(30 * 60 - 1)
    assert not (await spender.spend(1, "reserve")).allowed
    spender.clock.advance(1)
    freed = await spender.spend(70, "reserve")
    assert (freed.allowed, freed.remaining) == (True, 0)


async def test_quota_headers_parse_as_structured_fields(spender: Spender) -> None:
    """The quota's RateLimit-Policy and RateLimit are structured-field lists; a refusal adds
    Retry-After and Cache-Control: no-store."""
    await spender.spend(100, "reserve")
    refused = dict(
        (k.decode(), v.decode()) for k, v in (await spender.spend(1, "reserve")).headers()
    )
    policy, current = SFList(), SFList()
    policy.parse(refused["ratelimit-policy"].encode())
    current.parse(refused["ratelimit"].encode())
    assert [(i.value, dict(i.params)) for i in policy] == [("ai-tokens", {"q": 100, "w": 3600})]
    assert [(i.value, dict(i.params)) for i in current] == [("ai-tokens", {"r": 0, "t": 3600})]
    assert int(refused["retry-after"]) >= 1
    assert refused["cache-control"] == "no-store"


@pytest.fixture
async def demo() -> AsyncIterator[tuple[httpx.AsyncClient, Keystile]]:
    gate = Keystile(store="memory://", clock=ManualClock(T0))
    gate.quotas.store = MemoryQuotaStore(clock=gate.clock)
    app = build_demo_app(gate)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        yield client, gate


async def test_demo_inference_answers_429_when_the_budget_is_gone(
    demo: tuple[httpx.AsyncClient, Keystile],
) -> None:
    """The demo's inference spends tokens; once the key's budget is gone it answers 429
    quota_exceeded with the quota's headers, and a key without a budget is never refused."""
    client, gate = demo
    small = await gate.manager.create(
        {"name": "small", "type": "dev", "scopes": ["ai:inference"], "token_quota": 40}
    )
    body = {"model": "demo-1", "messages": [{"role": "user", "content": "one two three"}]}
    headers = {"Authorization": f"Bearer {small.secret.get_secret_value()}"}
    statuses = []
    for _ in range(4):
        response = await client.post("/cloud/ai/infer", json=body, headers=headers)
        statuses.append(response.status_code)
    assert statuses[0] == 200
    assert 429 in statuses
    assert response.status_code == 429
    assert response.json()["error"]["code"] == "quota_exceeded"
    left = SFList()
    left.parse(response.headers["ratelimit"].encode())
    assert left[0].value == "ai-tokens"
    assert 0 <= left[0].params["r"] < 6  # fewer than the prompt's 6 tokens are left
    assert response.headers["cache-control"] == "no-store"
    assert int(response.headers["retry-after"]) >= 1
    assert "q=40" in response.headers["ratelimit-policy"]


async def test_quota_api_needs_the_middleware() -> None:
    """Spending outside a request the middleware authenticated is a clear error."""
    from starlette.requests import Request

    gate = Keystile(store="memory://")
    request = Request({"type": "http", "headers": [], "method": "GET", "path": "/"})
    with pytest.raises(RuntimeError, match="KeystileMiddleware"):
        await gate.quotas.reserve(request, 1)


async def test_negative_tokens_are_refused() -> None:
    """A negative or non-integer token count is a ValueError, not a silent credit; so is
    one past 2**36 (a count an upstream service reports, say: summed in a minute, it
    could pass the 64 bits a usage flush sends, and jam every later flush), both when
    spent and when recorded in usage directly. 2**36 itself counts."""
    gate = Keystile(store="memory://")
    created = await gate.manager.create({"name": "n", "type": "dev"})
    for bad in (-1, 1.5, True, 2**36 + 1, 2**64):
        with pytest.raises(ValueError, match=r"tokens must be an integer from 0 to 68719476736"):
            await gate.quotas.spend(created.key, bad, "record")  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"tokens must be an integer from 0 to 68719476736"):
            gate.usage.record_tokens(created.key.id, bad)  # type: ignore[arg-type]
    for bad in (-1, 2**36 + 1, 2**64):  # (a value of another type: dropped when added up)
        with pytest.raises(ValueError, match=r"byte counts must be integers from 0 to"):
            gate.usage.record(created.key.id, 200, 0, bad)
    assert gate.usage.dropped == 0
    gate.usage.record_tokens(created.key.id, 2**36)
    assert await gate.usage.flush()
    assert (await gate.usage.report(created.key.id)).all_time.tokens == 2**36


# -- when the quota store fails ----------------------------------------------------------------


class Failing:
    """A RedisQuotaStore on fakeredis (its server disconnected) or on a redis-server of the
    test's own (killed and restarted), counting the calls that reach it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.asked = 0
        self.own: RedisServer | None = None
        if kind == "fakeredis":
            self.fake_server = fakeredis.FakeServer()
            self.client: Redis = fake_redis(self.fake_server)
        else:
            self.own = RedisServer()
            self.own.start()
            self.client = Redis.from_url(self.own.url)
        self.store = RedisQuotaStore(self.client, namespace=new_namespace())
        real = self.store.spend

        async def counted(*args: Any) -> QuotaState:
            self.asked += 1
            return await real(*args)

        self.store.spend = counted  # type: ignore[method-assign]

    def down(self) -> None:
        if self.own is None:
            self.fake_server.connected = False
        else:
            self.own.kill()

    def up(self) -> None:
        if self.own is None:
            self.fake_server.connected = True
        else:
            self.own.start()

    async def close(self) -> None:
        await self.client.aclose()
        if self.own is not None:
            self.own.close()


@pytest.fixture(params=["fakeredis", "redis"])
async def failing(request: pytest.FixtureRequest) -> AsyncIterator[Failing]:
    made = Failing(request.param)
    yield made
    await made.close()


async def budgeted_key(quota: int = 100) -> tuple[Keystile, ApiKey]:
    gate = Keystile(store="memory://")
    created = await gate.manager.create(
        {"name": "ai", "type": "dev", "scopes": ["ai:inference"], "token_quota": quota}
    )
    return gate, created.key


async def test_a_failing_store_lets_spending_through_then_is_left_alone_a_while(
    failing: Failing, monotonic: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """failure="allow": with the store down, spending passes undecided (full budget shown,
    counted in passes, one warning); after three failures in a row the store is not asked
    for 50 ms, even once it is back; then one try ends the back-off, and counting resumes
    where Redis left it."""
    caplog.set_level(logging.WARNING, logger="keystile.quotas")
    gate, key = await budgeted_key(100)
    quotas = Quotas(failing.store, gate.policy)
    first = await quotas.spend(key, 10, "reserve")
    assert first is not None and not first.degraded and first.remaining == 90
    await asyncio.to_thread(failing.down)
    for n in range(1, 4):
        passed = await quotas.spend(key, 10, "reserve")
        assert passed == QuotaState(True, 100, 100, 3600, degraded=True)
        assert quotas.passes == n and failing.asked == 1 + n
    await asyncio.to_thread(failing.up)
    monotonic[0] += 0.05 - 2**-10
    assert (await quotas.spend(key, 10, "reserve")).degraded  # type: ignore[union-attr]
    assert failing.asked == 4 and quotas.passes == 4
    monotonic[0] += 2**-10
    tried = await quotas.spend(key, 10, "reserve")
    assert tried is not None and not tried.degraded and failing.asked == 5
    # fakeredis kept the 10 spent before; the restarted redis-server started empty.
    assert tried.remaining == (80 if failing.kind == "fakeredis" else 90)
    [warning] = [r for r in caplog.records if r.name == "keystile.quotas"]
    assert "token quotas unavailable" in warning.getMessage()
    assert "letting requests through" in warning.getMessage()


async def test_a_failing_store_with_failure_deny_answers_503(failing: Failing) -> None:
    """failure="deny": an endpoint reserving tokens while the store is down answers 503
    quota_unavailable with Retry-After (the middleware's answer, not a 500); one recording
    tokens it has already spent is answered (a pass, logged: the work is done); with the
    store back, the same requests are served and counted."""
    settings = KeystileSettings(rate_limit_failure="deny")
    gate = Keystile(store="memory://", secret=SECRET, settings=settings)
    gate.quotas.store = failing.store
    created = await gate.manager.create(
        {"name": "ai", "type": "dev", "scopes": ["ai:inference"], "token_quota": 100}
    )

    async def infer(request: Request) -> JSONResponse:
        state = await gate.quotas.reserve(request, 10)
        assert state is not None
        return JSONResponse({"remaining": state.remaining}, headers=state.header_dict())

    async def spent(request: Request) -> JSONResponse:
        state = await gate.quotas.record(request, 5)  # after the work
        assert state is not None
        return JSONResponse({"remaining": state.remaining, "degraded": state.degraded})

    app = Starlette(
        routes=[
            Route("/infer", infer, methods=["POST"]),
            Route("/spent", spent, methods=["POST"]),
        ],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )
    headers = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        await asyncio.to_thread(failing.down)
        refused = await http.post("/infer", headers=headers)
        recorded = await http.post("/spent", headers=headers)
        await asyncio.to_thread(failing.up)
        served = await http.post("/infer", headers=headers)
        counted = await http.post("/spent", headers=headers)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "quota_unavailable"
    assert int(refused.headers["retry-after"]) >= 1
    assert recorded.status_code == 200 and recorded.json() == {"remaining": 100, "degraded": True}
    assert gate.quotas.passes == 1
    assert served.status_code == 200 and served.json() == {"remaining": 90}
    assert counted.json() == {"remaining": 85, "degraded": False}
    await gate.aclose()
