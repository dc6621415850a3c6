"""Secrets never leak (docs/key-format.md): not in any answer but create's and rotate's, not in an
exception message, not in a log record — checked on every refusal path and the admin API,
and (with KEYSTILE_TEST_LEAK_CHECK=1) across the whole test session by conftest.py."""

from __future__ import annotations

import json
import logging
import traceback
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from typing import Any

import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

import keystile.keys
from conftest import LEAK_CHECK, SECRET, leak_watch
from faults.asgi import Outcome, bearer, call
from faults.leaks import LeakWatch
from keystile import (
    KeyNotFound,
    KeystileError,
    KeystileMiddleware,
    ManualClock,
    MemoryStore,
    RedisStore,
    Rule,
    generate_key,
    parse_key,
    public,
)
from keystile.admin import admin_app, admin_rules
from keystile.clock import to_datetime
from keystile.gate import Keystile
from keystile.ratelimit import RedisLimiter

ADMIN = ["admin:manage_keys", "admin:view_usage", "kev:*", "ai:*"]  # all the keys it manages hold
ORIGIN = b"https://app.example.com"


def record(text: str, exc: BaseException | None = None) -> logging.LogRecord:
    """A log record as a logger would make it (never emitted: the session watch is real)."""
    exc_info = (type(exc), exc, exc.__traceback__) if exc is not None else None
    return logging.LogRecord("keystile.test", logging.WARNING, __file__, 1, text, (), exc_info)


def test_the_leak_watch_finds_8_characters_of_a_secret_and_nothing_public() -> None:
    """The watch flags a record holding 8 consecutive characters of a remembered secret, in
    its message or its traceback, and not one holding the key's prefix, hint or id."""
    watch = LeakWatch()
    secret = "prod_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p"  # made up: never a real key
    watch.remember(secret)
    tail = secret.removeprefix("prod_")
    for text in [f"x {tail[3:11]} y", f"{secret}", f"id={tail[-8:]}!"]:
        assert watch.find(text) == f"prod_...{secret[-4:]}", text
    for text in ["prod_...O5p", "created key key_0Vc7abc (prod_...4O5p, prod)", tail[:7]]:
        assert watch.find(text) is None, text
    try:
        raise ValueError(f"boom {tail[10:20]}")
    except ValueError as exc:
        failing = record("a failure", exc)
    watch.handle(failing)
    watch.handle(record("fine"))
    assert watch.records == 2 and len(watch.leaks) == 1
    assert "keystile.test WARNING" in watch.leaks[0] and tail not in watch.leaks[0]


def test_the_session_watch_is_on_exactly_when_asked() -> None:
    """With KEYSTILE_TEST_LEAK_CHECK=1 the session watch is on the root logger at DEBUG and
    sees every secret keystile generates; without it, nothing is installed."""
    watch = leak_watch()
    if not LEAK_CHECK:
        assert watch is None
        assert not hasattr(keystile.keys.generate_key, "__wrapped__")
        return
    assert watch in logging.getLogger().handlers
    assert logging.getLogger().isEnabledFor(logging.DEBUG)
    before = watch.secrets
    generate_key("dev_")
    keystile.keys.generate_key("prod_")
    assert watch.secrets == before + 2


@pytest.fixture
def local_watch(caplog: pytest.LogCaptureFixture) -> Iterator[LeakWatch]:
    """A watch of this test's own on the root logger at DEBUG (whatever the session does)."""
    caplog.set_level(logging.DEBUG)
    watch = LeakWatch()
    root = logging.getLogger()
    root.addHandler(watch)
    yield watch
    root.removeHandler(watch)


class Rig:
    """The app, its gate, and every secret it made (remembered by the watch)."""

    def __init__(self, gate: Keystile, app: Starlette, watch: LeakWatch) -> None:
        self.gate = gate
        self.app = app
        self.watch = watch
        self.secrets: dict[str, str] = {}
        self.ids: dict[str, str] = {}

    async def make(self, name: str, **settings: Any) -> str:
        created = await self.gate.manager.create({"name": name, **settings})
        secret = created.secret.get_secret_value()
        self.watch.remember(secret)
        self.secrets[name] = secret
        self.ids[name] = created.key.id
        assert secret not in repr(created) and secret not in str(created)
        return secret


def build(gate: Keystile) -> Starlette:
    async def x(request: Request) -> Response:
        return JSONResponse({"id": request.user.identity})

    async def infer(request: Request) -> Response:
        await gate.quotas.reserve(request, 1000)
        return JSONResponse({"ok": True})

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    rules = [
        public("/health"),
        Rule("GET|POST", "/x", ["kev:read"]),
        Rule("GET", "/write", ["kev:write"]),
        Rule("POST", "/infer", ["ai:inference"]),
        Rule("GET", "/ws", ["kev:read"]),
        *admin_rules("/cloud/keys"),
    ]
    return Starlette(
        routes=[
            Route("/x", x, methods=["GET", "POST"]),
            Route("/write", x),
            Route("/infer", infer, methods=["POST"]),
            WebSocketRoute("/ws", ws),
            Mount("/cloud/keys", app=admin_app(gate)),
        ],
        middleware=[
            Middleware(
                KeystileMiddleware,
                gate=gate,
                rules=rules,
                deny_unmatched=True,
                trusted_proxies=["127.0.0.1"],
            )
        ],
    )


@pytest.fixture
async def rig(local_watch: LeakWatch) -> AsyncIterator[Rig]:
    gate = Keystile(store=MemoryStore(), secret=SECRET, clock=ManualClock())
    made = Rig(gate, build(gate), local_watch)
    yield made
    await gate.aclose()


async def websocket_refusal(app: Any, headers: list[tuple[bytes, bytes]]) -> str:
    """The close reason a refused websocket handshake gets."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 40000),
        "server": ("test", 80),
        "scheme": "ws",
        "subprotocols": [],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    assert sent[0]["type"] == "websocket.close", sent
    return json.dumps(sent)


def text_of(outcome: Outcome) -> str:
    return json.dumps(outcome.headers) + outcome.body.decode("latin-1")


async def test_no_refusal_and_no_admin_answer_holds_a_secret(
    rig: Rig, unused_redis_url: str
) -> None:
    """Every kind of refusal (no key, malformed, wrong checksum, unknown, revoked, expired,
    missing scope, unmatched route, origin, address, rate limit, quota, store down, limiter
    down, preflight, websocket) and every admin answer but create's and rotate's, provoked
    with real keys, look-alikes of them and secrets where ids belong, holds no 8 characters
    of any secret in its body or headers; nor does any exception or log record on the way."""
    gate, app = rig.gate, rig.app
    clock = gate.clock
    assert isinstance(clock, ManualClock)
    dev = await rig.make("dev", type="dev", scopes=["kev:read", "ai:inference"], token_quota=10)
    client = await rig.make(
        "client",
        type="client",
        scopes=["kev:read"],
        allowed_origins=[ORIGIN.decode()],
        rate_limit="1/minute",
    )
    walled = await rig.make(
        "walled", type="prod", scopes=["kev:read"], allowed_ips=["203.0.113.0/24"]
    )
    expiring = await rig.make(
        "expiring", type="dev", scopes=["kev:read"], expires_at=to_datetime(clock() + 30)
    )
    revoked = await rig.make("revoked", type="prod", scopes=["kev:read"])
    await gate.manager.revoke(rig.ids["revoked"])
    admin = await rig.make("admin", type="prod", scopes=ADMIN)
    unknown = generate_key("dev_")
    rig.watch.remember(unknown)
    flipped = dev[:-1] + ("A" if dev[-1] != "A" else "B")  # checksum off

    answers: list[tuple[str, Outcome]] = []

    async def ask(label: str, path: str, headers: list[tuple[bytes, bytes]], **kw: Any) -> None:
        answers.append((label, await call(app, path, headers, label=label, **kw)))

    await ask("missing", "/x", [])
    await ask("twice", "/x", bearer(dev) + bearer(dev))
    await ask("scheme", "/x", [(b"authorization", f"Token {dev}".encode())])
    await ask("non-ascii", "/x", [(b"authorization", f"Bearer {dev}é".encode())])
    await ask("checksum-off", "/x", bearer(flipped))
    await ask("truncated", "/x", bearer(dev[:-1]))
    await ask("unknown", "/x", bearer(unknown))
    await ask("revoked", "/x", bearer(revoked))
    await ask("scope", "/write", bearer(dev))
    await ask("unmatched", "/nowhere", bearer(dev))
    await ask("origin", "/x", [*bearer(client), (b"origin", b"https://evil.example")])
    await ask("address", "/x", bearer(walled))
    await ask("address-forwarded", "/x", [*bearer(walled), (b"x-forwarded-for", b"192.0.2.1")])
    await ask("limit-first", "/x", [*bearer(client), (b"origin", ORIGIN)])
    await ask("limit", "/x", [*bearer(client), (b"origin", ORIGIN)])
    await ask("quota", "/infer", bearer(dev), method="POST")
    await ask(
        "preflight",
        "/x",
        [(b"origin", b"https://evil.example"), (b"access-control-request-method", b"GET")],
        method="OPTIONS",
    )
    clock.advance(60)
    await ask("expired", "/x", bearer(expiring))
    ws_text = await websocket_refusal(app, bearer(revoked))

    # The admin API, with the admin key; the secret where an id belongs, too.
    auth = bearer(admin)
    dev_id = rig.ids["dev"]
    body = json.dumps({"name": "renamed"}).encode()
    for label, method, path, payload in [
        ("list", "GET", "/cloud/keys/", b""),
        ("get", "GET", f"/cloud/keys/{dev_id}", b""),
        ("patch", "PATCH", f"/cloud/keys/{dev_id}", body),
        (
            "patch-secret-field",
            "PATCH",
            f"/cloud/keys/{dev_id}",
            json.dumps({"secret": dev}).encode(),
        ),
        ("usage", "GET", f"/cloud/keys/{dev_id}/usage", b""),
        ("overview", "GET", "/cloud/keys/usage", b""),
        ("get-by-secret", "GET", f"/cloud/keys/{dev}", b""),
        ("patch-by-secret", "PATCH", f"/cloud/keys/{dev}", body),
        ("revoke-by-secret", "POST", f"/cloud/keys/{dev}/revoke", b""),
        ("rotate-by-secret", "POST", f"/cloud/keys/{dev}/rotate", b""),
        ("usage-by-secret", "GET", f"/cloud/keys/{dev}/usage", b""),
        ("rotate-revoked", "POST", f"/cloud/keys/{rig.ids['revoked']}/rotate", b""),
        ("list-cursor-secret", "GET", f"/cloud/keys/?cursor={dev}", b""),
        ("revoke", "POST", f"/cloud/keys/{rig.ids['expiring']}/revoke", b""),
    ]:
        path, _, query = path.partition("?")
        outcome = await call(
            app,
            path,
            [*auth, (b"content-type", b"application/json")],
            method=method,
            body=payload,
            query=query.encode(),
            label=label,
        )
        answers.append((label, outcome))

    # The store and the limiter unreachable: 503s.
    down = Keystile(
        store=RedisStore.from_url(unused_redis_url, timeout=0.2), secret=SECRET, lookup_timeout=1.0
    )
    unreachable = aioredis.Redis.from_url(unused_redis_url, socket_connect_timeout=0.2)
    deny = Keystile(
        store=MemoryStore(),
        secret=SECRET,
        limiter=RedisLimiter(unreachable, timeout=0.3, failure="deny"),
    )
    raised: list[BaseException] = []
    try:
        try:
            await down.manager.create({"name": "n", "type": "dev"})
        except KeystileError as exc:
            raised.append(exc)
        answers.append(("store-down", await call(build(down), "/x", bearer(dev))))
        limited = (
            await deny.manager.create(
                {"name": "l", "type": "dev", "scopes": ["kev:read"], "rate_limit": "5/minute"}
            )
        ).secret.get_secret_value()
        rig.watch.remember(limited)
        answers.append(("limiter-down", await call(build(deny), "/x", bearer(limited))))
    finally:
        await down.aclose()
        await deny.aclose()
        await unreachable.aclose()

    expected = {
        "missing": 401,
        "twice": 400,
        "scheme": 400,
        "non-ascii": 400,
        "checksum-off": 401,
        "truncated": 401,
        "unknown": 401,
        "revoked": 401,
        "scope": 403,
        "unmatched": 403,
        "origin": 403,
        "address": 403,
        "address-forwarded": 403,
        "limit-first": 200,
        "limit": 429,
        "quota": 429,
        "preflight": 403,
        "expired": 401,
        "list": 200,
        "get": 200,
        "patch": 200,
        "patch-secret-field": 422,
        "usage": 200,
        "overview": 200,
        "get-by-secret": 404,
        "patch-by-secret": 404,
        "revoke-by-secret": 404,
        "rotate-by-secret": 404,
        "usage-by-secret": 404,
        "rotate-revoked": 409,
        "list-cursor-secret": 422,
        "revoke": 200,
        "store-down": 503,
        "limiter-down": 503,
    }
    assert {label: o.status for label, o in answers} == expected
    for label, outcome in answers:
        assert outcome.error is None, (label, outcome)
        found = rig.watch.find(text_of(outcome))
        assert found is None, f"{label}: the answer holds part of the secret of {found}"
    assert rig.watch.find(ws_text) is None

    # Exceptions raised on the way, as a caller or a log would show them.
    for attempt in [
        lambda: parse_key(flipped, {"dev_"}),
        lambda: parse_key(dev[:-1], {"dev_"}),
        lambda: parse_key(dev + "é", {"dev_"}),
        lambda: parse_key(dev, {"prod_"}),
    ]:
        try:
            attempt()
        except KeystileError as exc:
            raised.append(exc)
    for coro in [
        gate.manager.rotate(rig.ids["revoked"]),
        gate.manager.update(dev_id, {"secret": dev}),
        gate.manager.list(cursor=dev),
    ]:
        try:
            await coro
        except KeystileError as exc:
            raised.append(exc)
    assert len(raised) == 8
    for exc in raised:
        text = "".join(traceback.format_exception(exc))
        assert rig.watch.find(text) is None, f"{type(exc).__name__}: {exc}"
    for shown in [repr(gate), repr(gate.hasher), repr(gate.store)]:
        assert rig.watch.find(shown) is None

    assert rig.watch.records > 0 and rig.watch.leaks == [], rig.watch.leaks


async def test_an_id_that_is_really_a_secret_is_not_echoed_by_the_manager(
    rig: Rig,
) -> None:
    """Handing the management API a key's secret where its id belongs raises KeyNotFound
    whose message holds no 8 characters of the secret."""
    secret = await rig.make("dev", type="dev", scopes=["kev:read"])
    manager = rig.gate.manager
    messages = []
    for coro in [
        manager.get(secret),
        manager.update(secret, {"name": "x"}),
        manager.revoke(secret),
        manager.rotate(secret, grace=timedelta(0)),
        manager.usage(secret),
    ]:
        with pytest.raises(KeyNotFound) as caught:
            await coro
        messages.append(str(caught.value))
    leaking = sum(1 for m in messages if rig.watch.find(m) is not None)
    assert leaking == 0, f"{leaking} of {len(messages)} messages hold the secret"
