"""CORS for browser keys (docs/cors.md), through the whole middleware: preflights from the union
of active keys' origins, actual requests judged by the key's own list."""

from __future__ import annotations

import asyncio
import gc
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from browser.harness import ServerProcess, seed_env, serve, uvicorn_argv
from conftest import REDIS_URL, SECRET, within
from keystile import ApiKey, Keystile, KeyStore, ManualClock, RedisStore
from keystile.clock import to_datetime
from keystile.cors import OriginIndex
from keystile.keys import new_key_id
from keystile.middleware import KeystileMiddleware
from keystile.origins import parse_origin
from keystile.routing import Rule
from keystile.settings import KeystileSettings
from keystile.stores import MemoryStore

APP = "https://app.example.com"
OTHER = "https://other.example.com"
EVIL = "https://evil.example.net"
RULES = [Rule("GET", "/items", ["vec:read"]), Rule("POST", "/items", ["vec:write"])]


class Counter:
    """How often the app's endpoint ran."""

    calls = 0


def make_app(gate: Keystile, **options: Any) -> tuple[Starlette, Counter]:
    """An app with GET /items (vec:read) and POST /items (vec:write) behind keystile."""
    counter = Counter()

    async def items(request: Request) -> JSONResponse:
        counter.calls += 1
        return JSONResponse({"items": [], "method": request.method})

    app = Starlette(
        routes=[Route("/items", items, methods=["GET", "POST"])],
        middleware=[Middleware(KeystileMiddleware, gate=gate, rules=RULES, **options)],
    )
    return app, counter


@asynccontextmanager
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as http:
        yield http


def preflight_headers(origin: str, method: str = "GET", headers: str | None = None) -> Any:
    sent = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        sent["Access-Control-Request-Headers"] = headers
    return sent


async def preflight(
    http: httpx.AsyncClient, origin: str, method: str = "GET", headers: str | None = None
) -> httpx.Response:
    return await http.options("/items", headers=preflight_headers(origin, method, headers))


def listed(response: httpx.Response, name: str) -> list[str]:
    """The comma-separated values of a header, over all its lines."""
    return [v.strip() for line in response.headers.get_list(name) for v in line.split(",")]


def cors_headers(response: httpx.Response) -> list[str]:
    return [name for name in response.headers if name.lower().startswith("access-control-")]


def assert_cors_answer(response: httpx.Response, origin: str) -> None:
    """An actual response a browser at ``origin`` may read, rate-limit headers included."""
    assert response.headers.get_list("access-control-allow-origin") == [origin]
    assert "Origin" in listed(response, "vary")
    exposed = {h.lower() for h in listed(response, "access-control-expose-headers")}
    assert {"ratelimit", "ratelimit-policy"} <= exposed


def assert_no_cors(response: httpx.Response) -> None:
    assert cors_headers(response) == []


def assert_origin_refused(response: httpx.Response) -> None:
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "origin_not_allowed"
    assert_no_cors(response)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def client_key(gate: Keystile, origins: list[str], **fields: Any) -> tuple[ApiKey, str]:
    created = await gate.manager.create(
        {
            "name": "browser key",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": origins,
            **fields,
        }
    )
    return created.key, created.secret.get_secret_value()


@pytest.fixture
async def gate(store: KeyStore, clock: ManualClock) -> AsyncIterator[Keystile]:
    """A gate over each backend (memory, fakeredis, real Redis) with a manual clock."""
    made = Keystile(store=store, secret=SECRET, clock=clock)
    yield made
    await made.aclose()


# -- preflights -------------------------------------------------------------------------------


async def test_an_allowed_preflight(gate: Keystile) -> None:
    """A preflight from an origin some key allows is a 204 echoing the exact origin, naming
    Authorization, with methods, max age and Vary: Origin; it needs no key."""
    await client_key(gate, [APP])
    app, counter = make_app(gate)
    async with client(app) as http:
        response = await preflight(http, APP, "GET", "authorization, content-type")
    assert response.status_code == 204
    assert response.content == b""
    assert response.headers.get_list("access-control-allow-origin") == [APP]
    assert {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"} <= set(
        listed(response, "access-control-allow-methods")
    )
    assert {"Authorization", "Content-Type"} <= set(
        listed(response, "access-control-allow-headers")
    )
    assert response.headers["access-control-max-age"] == "600"
    assert "Origin" in listed(response, "vary")
    assert "access-control-allow-credentials" not in response.headers
    assert counter.calls == 0


async def test_preflight_settings(gate: Keystile) -> None:
    """cors_methods, cors_headers and cors_max_age shape the answer; Authorization is always
    named explicitly, never left to a '*'."""
    await client_key(gate, [APP])
    app, _ = make_app(
        gate, cors_methods=["get", "POST"], cors_headers=["X-Request-Id", "*"], cors_max_age=42
    )
    async with client(app) as http:
        response = await preflight(http, APP, "POST", "x-request-id,authorization")
        put = await preflight(http, APP, "PUT")
    assert response.status_code == 204
    assert listed(response, "access-control-allow-methods") == ["GET", "POST"]
    allowed = listed(response, "access-control-allow-headers")
    assert allowed[0] == "Authorization" and "X-Request-Id" in allowed
    assert response.headers["access-control-max-age"] == "42"
    assert put.status_code == 403
    assert_no_cors(put)


@pytest.mark.parametrize(
    ("origin", "method", "asked"),
    [
        pytest.param(EVIL, "GET", None, id="unknown-origin"),
        pytest.param("https://app.example.com.evil.net", "GET", None, id="suffix-origin"),
        pytest.param("http://app.example.com", "GET", None, id="other-scheme"),
        pytest.param("https://app.example.com:8443", "GET", None, id="other-port"),
        pytest.param("null", "GET", None, id="null"),
        pytest.param("", "GET", None, id="empty"),
        pytest.param(APP, "GET", "x-secret-header", id="header-not-allowed"),
        pytest.param(APP, "GET", "authorization, x-secret-header", id="one-header-not-allowed"),
        pytest.param(APP, "PROPFIND", None, id="method-not-allowed"),
    ],
)
async def test_a_refused_preflight(
    gate: Keystile, origin: str, method: str, asked: str | None
) -> None:
    """A preflight the union of origins, methods and headers does not cover is a 403 with
    no CORS headers, and the app never sees it."""
    await client_key(gate, [APP])
    app, counter = make_app(gate)
    async with client(app) as http:
        response = await preflight(http, origin, method, asked)
    assert response.status_code == 403
    assert_no_cors(response)
    assert counter.calls == 0


async def test_the_apps_own_origins_are_allowed(gate: Keystile) -> None:
    """Origins the app configures (cors_origins) pass preflights with no key allowing them."""
    app, _ = make_app(gate, cors_origins=["https://admin.example.com", "https://*.partner.io"])
    async with client(app) as http:
        assert (await preflight(http, "https://admin.example.com")).status_code == 204
        assert (await preflight(http, "https://eu.shop.partner.io")).status_code == 204
        assert (await preflight(http, "https://partner.io")).status_code == 403
        assert (await preflight(http, APP)).status_code == 403


async def test_preflights_can_be_left_to_the_app(gate: Keystile) -> None:
    """With preflight=False an OPTIONS request is authenticated like any other."""
    await client_key(gate, [APP])
    app, _ = make_app(gate, preflight=False)
    async with client(app) as http:
        response = await preflight(http, APP)
    assert response.status_code == 401


async def test_the_union_follows_keys(gate: Keystile, clock: ManualClock) -> None:
    """Preflights follow keys as they are created, change origins, are revoked and expire."""
    app, _ = make_app(gate)

    async with client(app) as http:

        async def status(origin: str) -> int:
            return (await preflight(http, origin)).status_code

        async def becomes(origin: str, code: int) -> None:
            async def check() -> bool:
                return await status(origin) == code

            await within(2.0, check)

        assert await status(APP) == 403
        first, _ = await client_key(gate, [APP])
        await becomes(APP, 204)
        second, _ = await client_key(gate, [OTHER, "https://*.wild.example.org"])
        await becomes(OTHER, 204)
        assert await status("https://a.b.wild.example.org") == 204
        # Origins changed: the old one goes, the new one comes.
        changed = first.model_copy(update={"allowed_origins": ("https://new.example.com",)})
        await gate.store.replace(changed)
        await becomes("https://new.example.com", 204)
        await becomes(APP, 403)
        await gate.manager.revoke(second.id)
        await becomes(OTHER, 403)
        assert await status("https://a.b.wild.example.org") == 403
        # Expiry is judged at request time, by the gate's clock.
        expires = to_datetime(clock() + 60)
        await client_key(gate, ["https://brief.example.com"], expires_at=expires)
        await becomes("https://brief.example.com", 204)
        clock.advance(59)
        assert await status("https://brief.example.com") == 204
        clock.advance(1)
        assert await status("https://brief.example.com") == 403
        assert await status("https://new.example.com") == 204


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("memory"),
        pytest.param("fakeredis"),
        pytest.param("redis"),
    ],
    indirect=True,
)
async def test_concurrent_preflights_are_all_allowed(gate: Keystile) -> None:
    """A burst of preflights from an allowed origin, arriving while the index first loads,
    is answered 204 every time."""
    await client_key(gate, [APP])
    app, _ = make_app(gate)
    async with client(app) as http:
        answers = await asyncio.gather(*(preflight(http, APP) for _ in range(8)))
    assert [a.status_code for a in answers] == [204] * 8


# -- cost with many keys (issue #18 item 5) ----------------------------------------------------

WILD = "https://*.wild.example.org"
CREATED = 1_800_000_000


async def many_keys_gate(count: int, clock: ManualClock) -> Keystile:
    """A gate over a memory store of ``count`` client keys, each with an exact origin and a
    wildcard of its own; the last one made allows APP and WILD."""
    store = MemoryStore()
    for n in range(count):
        mine = (f"https://app{n}.example.com", f"https://*.tenant{n}.example.org")
        record = ApiKey(
            id=new_key_id(CREATED + n),
            name=f"browser {n}",
            type="client",
            hint="client_...test",
            scopes=("vec:read",),
            allowed_origins=(APP, WILD) if n == count - 1 else mine,
            created_at=to_datetime(CREATED + n),
        )
        await store.add(record, f"{n:064x}")
    return Keystile(store=store, secret=SECRET, clock=clock)


def raw_scope(method: str, origin: str) -> dict[str, Any]:
    headers = [(b"host", b"api"), (b"origin", origin.encode())]
    if method == "OPTIONS":
        headers += [
            (b"access-control-request-method", b"GET"),
            (b"access-control-request-headers", b"authorization"),
        ]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": "/items",
        "raw_path": b"/items",
        "root_path": "",
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("api", 80),
    }


async def lines_run(app: Any, scope: dict[str, Any]) -> tuple[int, bool, int]:
    """One request as raw ASGI: its status, whether the answer lets the origin read it, and
    how many lines of Python ran to answer it (``sys.settrace`` line events)."""
    status, readable, lines = 0, False, 0

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status, readable
        if message["type"] == "http.response.start":
            status = message["status"]
            readable = any(k == b"access-control-allow-origin" for k, _ in message["headers"])

    def trace(frame: Any, event: str, arg: Any) -> Any:
        nonlocal lines
        lines += event == "line"
        return trace

    # No collection meanwhile: finalizers of other tests' garbage would run traced.
    gc.collect()
    gc.disable()
    previous = sys.gettrace()
    sys.settrace(trace)
    try:
        await app(dict(scope), receive, send)
    finally:
        sys.settrace(previous)
        gc.enable()
    return status, readable, lines


async def test_item5_anonymous_requests_cost_the_same_with_20000_keys(
    clock: ManualClock,
) -> None:
    """A preflight, and a refusal before authentication that carries an Origin, run exactly
    as many lines of Python with 20,000 client keys as with 10 — allowed exactly, by a
    wildcard, or not at all — and get the same answers (work counted, not timed)."""
    requests = [
        ("OPTIONS", APP, 204, True),
        ("OPTIONS", "https://a.b.wild.example.org", 204, True),
        ("OPTIONS", EVIL, 403, False),
        ("OPTIONS", "https://a.b.c.d.tenant7.example.net", 403, False),
        ("GET", APP, 401, True),  # no key: refused, readable by an allowed origin
        ("GET", EVIL, 401, False),
    ]
    counted: dict[int, list[tuple[int, bool, int]]] = {}
    for count in (10, 20_000):
        gate = await many_keys_gate(count, clock)
        try:
            app, calls = make_app(gate)
            for method, origin, _, _ in requests:  # the index loads; the app starts
                await lines_run(app, raw_scope(method, origin))
            counted[count] = [await lines_run(app, raw_scope(m, o)) for m, o, _, _ in requests]
            assert calls.calls == 0
        finally:
            await gate.aclose()
    few, many = counted[10], counted[20_000]
    expected = [(status, readable) for _, _, status, readable in requests]
    assert [(status, readable) for status, readable, _ in few] == expected
    assert [(status, readable) for status, readable, _ in many] == expected
    assert [lines for _, _, lines in many] == [lines for _, _, lines in few], (few, many)


async def test_item5_keys_sharing_origins_are_counted(gate: Keystile, clock: ManualClock) -> None:
    """Two keys allowing the same origins: the union keeps an origin while any active key
    allows it — through one key's change of origins, the other's expiry, a revocation."""
    app, _ = make_app(gate)
    sub = "https://eu.wild.example.org"

    async with client(app) as http:

        async def becomes(origin: str, code: int) -> None:
            async def check() -> bool:
                return (await preflight(http, origin)).status_code == code

            await within(2.0, check)

        first, _ = await client_key(gate, [APP, WILD])
        await client_key(gate, [APP, WILD], expires_at=to_datetime(clock() + 60))
        await becomes(APP, 204)
        await becomes(sub, 204)
        await gate.manager.update(first.id, allowed_origins=[OTHER])
        await becomes(OTHER, 204)
        assert (await preflight(http, APP)).status_code == 204  # the second key still does
        assert (await preflight(http, sub)).status_code == 204
        clock.advance(60)
        assert (await preflight(http, APP)).status_code == 403
        assert (await preflight(http, sub)).status_code == 403
        await gate.manager.update(first.id, allowed_origins=[APP, OTHER])
        await becomes(APP, 204)
        await gate.manager.revoke(first.id)
        await becomes(APP, 403)
        await becomes(OTHER, 403)


# -- actual requests --------------------------------------------------------------------------


async def test_a_disallowed_origin_never_reaches_the_app(gate: Keystile) -> None:
    """A client key from an origin not on its own list is refused with origin_not_allowed and
    no CORS headers, even when another key allows that origin; the app is never called."""
    _, secret = await client_key(gate, [APP])
    await client_key(gate, [OTHER])
    app, counter = make_app(gate)
    async with client(app) as http:
        for origin in (
            EVIL,
            OTHER,
            "null",
            "https://APP.example.com.",
            "https://x.app.example.com",
        ):
            response = await http.get("/items", headers={**bearer(secret), "Origin": origin})
            assert_origin_refused(response)
    assert counter.calls == 0


async def test_an_allowed_origin_can_read_the_answer(gate: Keystile) -> None:
    """From an allowed origin the answer carries the exact origin, Vary: Origin and exposes
    the rate-limit headers it carries."""
    _, secret = await client_key(gate, [APP])
    app, counter = make_app(gate)
    async with client(app) as http:
        response = await http.get("/items", headers={**bearer(secret), "Origin": APP})
    assert response.status_code == 200
    assert response.json() == {"items": [], "method": "GET"}
    assert_cors_answer(response, APP)
    assert "ratelimit" in response.headers and "ratelimit-policy" in response.headers
    assert counter.calls == 1


async def test_a_rate_limited_answer_is_readable(gate: Keystile) -> None:
    """A 429 to an allowed origin carries the CORS headers next to its rate-limit headers."""
    _, secret = await client_key(gate, [APP], rate_limit="2/minute")
    app, counter = make_app(gate)
    async with client(app) as http:
        answers = [
            await http.get("/items", headers={**bearer(secret), "Origin": APP}) for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    limited = answers[-1]
    assert limited.json()["error"]["code"] == "rate_limited"
    assert_cors_answer(limited, APP)
    assert "ratelimit" in limited.headers and "retry-after" in limited.headers
    assert counter.calls == 2


async def test_an_insufficient_scope_answer_is_readable(gate: Keystile) -> None:
    """A 403 insufficient_scope to an allowed origin carries the CORS headers."""
    _, secret = await client_key(gate, [APP])
    app, counter = make_app(gate)
    async with client(app) as http:
        response = await http.post("/items", headers={**bearer(secret), "Origin": APP})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "insufficient_scope"
    assert_cors_answer(response, APP)
    assert counter.calls == 0


async def test_no_origin_is_allowed_unless_required(gate: Keystile) -> None:
    """A client key with no Origin header (curl, a mobile app) is admitted by default and
    refused with require_origin=True, which still admits an allowed origin."""
    _, secret = await client_key(gate, [APP])
    lenient, lenient_calls = make_app(gate)
    strict, strict_calls = make_app(gate, require_origin=True)
    async with client(lenient) as http:
        response = await http.get("/items", headers=bearer(secret))
        assert response.status_code == 200
        assert_no_cors(response)
    async with client(strict) as http:
        assert_origin_refused(await http.get("/items", headers=bearer(secret)))
        allowed = await http.get("/items", headers={**bearer(secret), "Origin": APP})
        assert allowed.status_code == 200
    assert (lenient_calls.calls, strict_calls.calls) == (1, 1)


@pytest.mark.parametrize("second", [APP, EVIL])
async def test_two_origin_headers_are_refused(gate: Keystile, second: str) -> None:
    """A request with two Origin headers is ambiguous and refused, allowed ones included."""
    _, secret = await client_key(gate, [APP])
    app, counter = make_app(gate)
    headers = [*bearer(secret).items(), ("Origin", APP), ("Origin", second)]
    async with client(app) as http:
        assert_origin_refused(await http.get("/items", headers=headers))
    assert counter.calls == 0


async def test_refusals_before_the_key_is_known_are_readable(gate: Keystile) -> None:
    """A 401 (no key, or a wrong one) to an origin the union allows carries the CORS headers
    so the page can read why; to any other origin it carries none."""
    await client_key(gate, [APP])
    app, _ = make_app(gate)
    async with client(app) as http:
        missing = await http.get("/items", headers={"Origin": APP})
        wrong = await http.get("/items", headers={**bearer("client_" + "A" * 32), "Origin": APP})
        elsewhere = await http.get("/items", headers={"Origin": EVIL})
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "missing_api_key"
    assert_cors_answer(missing, APP)
    assert wrong.status_code == 401
    assert_cors_answer(wrong, APP)
    assert elsewhere.status_code == 401
    assert_no_cors(elsewhere)


async def test_keystile_refuses_where_starlette_cors_still_runs_the_handler(
    gate: Keystile,
) -> None:
    """Starlette's CORSMiddleware only withholds headers, so a disallowed origin still runs
    the handler; keystile refuses before the handler runs."""
    _, secret = await client_key(gate, [APP])
    starlette_calls = Counter()

    async def items(request: Request) -> JSONResponse:
        starlette_calls.calls += 1
        return JSONResponse({"items": []})

    plain = Starlette(
        routes=[Route("/items", items)],
        middleware=[
            Middleware(CORSMiddleware, allow_origins=[APP], allow_headers=["Authorization"])
        ],
    )
    keystile_app, keystile_calls = make_app(gate)
    headers = {**bearer(secret), "Origin": EVIL}
    async with client(plain) as http:
        response = await http.get("/items", headers=headers)
        assert response.status_code == 200
        assert "access-control-allow-origin" not in response.headers
    async with client(keystile_app) as http:
        assert_origin_refused(await http.get("/items", headers=headers))
    assert (starlette_calls.calls, keystile_calls.calls) == (1, 0)


# -- other gates and processes on the same Redis ----------------------------------------------


@pytest.fixture
async def redis_gate(redis_namespace: str) -> AsyncIterator[Keystile]:
    """A gate on the real Redis, under a namespace of its own."""
    made = Keystile(
        store=REDIS_URL, secret=SECRET, settings=KeystileSettings(namespace=redis_namespace)
    )
    yield made
    await made.aclose()


@pytest.mark.redis
async def test_another_gate_on_the_same_redis_follows(
    redis_gate: Keystile, redis_namespace: str
) -> None:
    """A second gate (its own connections and cache) on the same Redis namespace allows a
    key's origin soon after the key is created through the first, and stops after revoking."""
    other = Keystile(
        store=RedisStore.from_url(REDIS_URL, namespace=redis_namespace), secret=SECRET
    )
    app, _ = make_app(other)
    try:
        async with client(app) as http:
            assert (await preflight(http, APP)).status_code == 403
            record, secret = await client_key(redis_gate, [APP])

            async def allowed() -> bool:
                return (await preflight(http, APP)).status_code == 204

            await within(2.0, allowed)
            response = await http.get("/items", headers={**bearer(secret), "Origin": APP})
            assert response.status_code == 200
            assert_cors_answer(response, APP)
            await redis_gate.manager.revoke(record.id)

            async def refused() -> bool:
                return (await preflight(http, APP)).status_code == 403

            await within(2.0, refused)
            response = await http.get("/items", headers={**bearer(secret), "Origin": APP})
            assert response.status_code == 401
    finally:
        await other.aclose()


@pytest.fixture
def other_process(redis_namespace: str) -> Iterator[ServerProcess]:
    """uvicorn in another process serving the demo API on the same Redis namespace."""
    env = seed_env(
        [],
        KEYSTILE_REDIS_URL=REDIS_URL,
        KEYSTILE_SECRET=SECRET,
        KEYSTILE_NAMESPACE=redis_namespace,
    )
    with serve(lambda port: uvicorn_argv(port, "--no-access-log"), env) as server:
        yield server


@pytest.mark.redis
async def test_another_process_on_the_same_redis_follows(
    redis_gate: Keystile, other_process: ServerProcess
) -> None:
    """Another process on the same Redis namespace allows a key's origins within a second of
    its creation, follows a change of origins, and refuses them once it is revoked."""
    path = "/cloud/vec/databases"
    async with httpx.AsyncClient(base_url=other_process.base_url, timeout=5.0) as http:

        async def status(origin: str) -> int:
            response = await http.options(path, headers=preflight_headers(origin))
            return response.status_code

        async def becomes(origin: str, code: int) -> None:
            async def check() -> bool:
                return await status(origin) == code

            await within(1.0, check)

        assert await status(APP) == 403
        record, secret = await client_key(redis_gate, [APP])
        await becomes(APP, 204)
        response = await http.get(path, headers={**bearer(secret), "Origin": APP})
        assert response.status_code == 200
        assert_cors_answer(response, APP)
        await redis_gate.store.replace(record.model_copy(update={"allowed_origins": (OTHER,)}))
        await becomes(OTHER, 204)
        await becomes(APP, 403)
        await redis_gate.manager.revoke(record.id)
        await becomes(OTHER, 403)
        response = await http.get(path, headers={**bearer(secret), "Origin": OTHER})
        assert response.status_code == 401


class DeafStore(MemoryStore):
    """A store whose change announcements stopped arriving (as a Redis store's do while its
    subscription is down): its listeners hear of nothing."""

    @property
    def listening(self) -> bool:
        return False

    def _announce(self, key_id: str, digest: str | None) -> None:
        return None


async def test_item4_the_origin_index_ages_on_the_monotonic_clock_it_is_given() -> None:
    """While announcements are not arriving, the preflight index reloads once it is older
    than max_age on the monotonic clock passed to it, and not before: a key added unheard
    is allowed from then on."""
    store = DeafStore()
    now = [500.0]
    index = OriginIndex(store, max_age=10.0, monotonic=lambda: now[0])
    origin = parse_origin(APP.encode())
    assert origin is not None
    assert not await index.allows(origin)  # loaded, empty
    key = ApiKey(
        id=new_key_id(CREATED),
        name="browser",
        type="client",
        hint="client_...test",
        scopes=("vec:read",),
        allowed_origins=(APP,),
        created_at=to_datetime(CREATED),
    )
    await store.add(key, "f" * 64)  # unannounced
    now[0] += 10.0
    assert not await index.allows(origin)  # max_age old, not older
    now[0] += 2**-10
    assert await index.allows(origin)
