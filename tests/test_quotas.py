"""AI token quotas: an hourly budget per key, spent before or after the work (SPEC §1)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from http_sfv import List as SFList

from keygate import KeyGate, ManualClock, RedisStore
from keygate.demo import build_demo_app
from keygate.quotas import MemoryQuotaStore, Mode, QuotaState, RedisQuotaStore
from keygate.stores import KeyStore

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
async def demo() -> AsyncIterator[tuple[httpx.AsyncClient, KeyGate]]:
    gate = KeyGate(store="memory://", clock=ManualClock(T0))
    gate.quotas.store = MemoryQuotaStore(clock=gate.clock)
    app = build_demo_app(gate)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://demo") as client:
        yield client, gate


async def test_demo_inference_answers_429_when_the_budget_is_gone(
    demo: tuple[httpx.AsyncClient, KeyGate],
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

    gate = KeyGate(store="memory://")
    request = Request({"type": "http", "headers": [], "method": "GET", "path": "/"})
    with pytest.raises(RuntimeError, match="KeyGateMiddleware"):
        await gate.quotas.reserve(request, 1)


async def test_negative_tokens_are_refused() -> None:
    """A negative or non-integer token count is a ValueError, not a silent credit."""
    gate = KeyGate(store="memory://")
    created = await gate.manager.create({"name": "n", "type": "dev"})
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="non-negative integer"):
            await gate.quotas.spend(created.key, bad, "reserve")  # type: ignore[arg-type]
