"""How keystile's parts are wired: each built from what it is given (nothing set on it
afterwards), request-time code reading the request scope (never the middleware), the
principal in a module of its own, and one enum for how usage counts addresses."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import keystile.gate
import keystile.usage
from conftest import SECRET
from keystile import Keystile, ManualClock
from keystile.addresses import BY_CLIENT, WATCH_IPS, AddressMode
from keystile.alerts import Alert, Alerter, AlertRules, MemoryAlertState, RedisAlertState
from keystile.backends import MemoryBackend, RedisBackend, backend_for
from keystile.clock import to_datetime
from keystile.keys import new_key_id
from keystile.middleware import KeystileMiddleware
from keystile.models import DEFAULT_POLICY, ApiKey
from keystile.principal import PRINCIPAL, REFUSALS, KeyUser, Principal
from keystile.quotas import MemoryQuotaStore, Quotas, RedisQuotaStore
from keystile.ratelimit import MemoryLimiter, RedisLimiter
from keystile.stores import CachedStore, MemoryStore, RedisStore
from keystile.stores.cache import CacheEntry
from keystile.usage import MemoryUsageStore, RedisUsageStore, UsageRecorder

T0 = 1_800_000_000.0  # a minute boundary


def record(kind: str, **fields: Any) -> ApiKey:
    """A key record of type ``kind``, as a store holds it."""
    return ApiKey(
        id=new_key_id(T0),
        name=kind,
        type=kind,
        hint=f"{kind}_...test",
        scopes=("vec:read",),
        created_at=to_datetime(T0),
        **fields,
    )


async def test_item2_quotas_count_in_the_usage_and_alerts_they_are_built_with() -> None:
    """A Quotas built on its own counts spent tokens and quota refusals in the usage
    recorder it was given, and its spends raise the threshold alerts of the alerter it was
    given."""
    clock = ManualClock(T0)
    usage = UsageRecorder(MemoryUsageStore(clock=clock), clock=clock)
    alerts = Alerter(
        AlertRules(),
        MemoryAlertState(clock=clock),
        lambda key_id: None,
        lambda key_id: _none(),
        DEFAULT_POLICY,
        clock=clock,
    )
    fired: list[Alert] = []
    alerts.subscribe(fired.append)
    usage.on_flush.append(alerts.on_flush)
    quotas = Quotas(MemoryQuotaStore(clock=clock), DEFAULT_POLICY, usage=usage, alerts=alerts)
    key = record("dev", token_quota=100)
    try:
        spent = await quotas.spend(key, 85, "reserve")
        refused = await quotas.spend(key, 20, "reserve")
        assert spent is not None and spent.allowed
        assert refused is not None and not refused.allowed
        assert await usage.flush()
        totals = (await usage.report(key.id)).totals
        assert (totals.tokens, totals.quota_exceeded) == (85, 1)
        assert [alert.rule for alert in fired] == ["quota"]
        assert fired[0].details == {"used": 85, "quota": 100}
    finally:
        await usage.close()
        await alerts.drain()


async def _none() -> None:
    return None


async def test_item2_the_request_scope_carries_the_refusals_not_the_middleware() -> None:
    """Below the middleware, the request scope holds the key's principal and the
    middleware's refusals (its realm and Retry-After), and no middleware object: code there
    cannot reach back up into it."""
    gate = Keystile(store="memory://", secret=SECRET)
    seen: dict[str, Any] = {}

    async def endpoint(request: Request) -> JSONResponse:
        seen.update(request.scope)
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/x", endpoint)],
        middleware=[Middleware(KeystileMiddleware, gate=gate, realm="vault", retry_after=7)],
    )
    created = await gate.manager.create({"name": "n", "type": "dev", "scopes": ["vec:read"]})
    bearer = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert (await client.get("/x", headers=bearer)).status_code == 200
        assert isinstance(seen[PRINCIPAL], Principal)
        assert seen[PRINCIPAL].key_id == created.key.id
        refusals = seen[REFUSALS]
        assert refusals.realm == "vault"
        assert refusals.quota_unavailable.raw_headers[-1] == (b"retry-after", b"7")
        assert not [k for k, v in seen.items() if isinstance(v, KeystileMiddleware)]
        entry = gate.store.peek(gate.hasher.digest(created.secret.get_secret_value()))
        assert isinstance(entry, CacheEntry)
        assert entry.principal is seen[PRINCIPAL]  # derived once, kept with the entry
        assert gate.principal(entry) is entry.principal
    finally:
        await gate.aclose()


@pytest.mark.parametrize(
    "module",
    [
        "keystile.addresses",
        "keystile.principal",
        "keystile.stores.cache",
        "keystile.quotas",
        "keystile.routing",
        "keystile.gate",
        "keystile.middleware",
    ],
)
def test_item2_each_module_imports_first_without_a_cycle(module: str) -> None:
    """Each of the modules the principal and the wiring touch imports first, in a fresh
    interpreter: no import cycle between the principal, the key cache, quotas and routing."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    done = subprocess.run(
        [sys.executable, "-c", f"import {module}"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def test_item2_the_gate_still_exports_the_principal() -> None:
    """Principal and KeyUser live in keystile.principal; keystile.gate and keystile re-export
    the same classes."""
    assert keystile.gate.Principal is Principal is keystile.Principal
    assert keystile.gate.KeyUser is KeyUser is keystile.KeyUser


@pytest.mark.parametrize(
    ("kind", "fields", "mode"),
    [
        ("dev", {}, AddressMode.IGNORE),
        ("prod", {}, AddressMode.WATCH_IPS),
        ("client", {"allowed_origins": ("https://app.example.com",)}, AddressMode.BY_CLIENT),
    ],
    ids=["dev", "prod", "client"],
)
def test_item3_each_key_type_has_one_address_mode(
    kind: str, fields: dict[str, Any], mode: AddressMode
) -> None:
    """A key's principal says how usage counts its addresses with an AddressMode member:
    production keys' addresses are watched, client keys are counted by IP and origin,
    development keys neither."""
    principal = Principal(record(kind, **fields), DEFAULT_POLICY)
    assert principal.ip_mode is mode


def test_item3_the_old_constant_names_are_the_enum_members() -> None:
    """BY_CLIENT and WATCH_IPS, importable from keystile.usage as before, are the enum's
    members with the values usage has always used."""
    assert keystile.usage.BY_CLIENT is BY_CLIENT is AddressMode.BY_CLIENT == 1
    assert keystile.usage.WATCH_IPS is WATCH_IPS is AddressMode.WATCH_IPS == 2


# -- issue #14: one factory builds every part's state from the key store ---------------------


async def test_the_key_store_decides_where_every_part_keeps_its_state() -> None:
    """backend_for is the one place the choice is made: on the memory store every part
    lives in this process, on a Redis store (cached or not) in the same Redis and
    namespace; the gate builds its limiter, quotas, usage and alert state from it."""
    redis_store = RedisStore.from_url("redis://127.0.0.1:1/0", namespace="kstest-wiring")
    assert isinstance(backend_for(MemoryStore()), MemoryBackend)
    for store in (redis_store, CachedStore(redis_store)):
        backend = backend_for(store)
        assert isinstance(backend, RedisBackend) and backend.shared
        assert (backend.client, backend.namespace) == (redis_store.client, "kstest-wiring")
    kinds = {
        False: (MemoryLimiter, MemoryQuotaStore, MemoryUsageStore, MemoryAlertState),
        True: (RedisLimiter, RedisQuotaStore, RedisUsageStore, RedisAlertState),
    }
    for store, shared in ((MemoryStore(), False), (redis_store, True)):
        gate = Keystile(store=store, secret="s" * 32)
        parts = (gate.limiter, gate.quotas.store, gate.usage.store, gate.alerts.state)
        assert all(isinstance(p, k) for p, k in zip(parts, kinds[shared], strict=True))
        assert gate.backend.shared is shared
        await gate.aclose()
