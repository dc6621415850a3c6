"""KeystileMiddleware authenticates as docs/errors.md says: status, JSON body and
WWW-Authenticate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import fakeredis
import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import AuthCredentials, requires
from starlette.middleware import Middleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.websockets import WebSocket

from conftest import SECRET, fake_redis, new_namespace
from keystile import (
    ApiKey,
    KeyStore,
    ManualClock,
    MemoryStore,
    RedisStore,
    StoreUnavailable,
    generate_key,
)
from keystile.clock import to_datetime
from keystile.gate import Keystile, KeyUser
from keystile.middleware import KeystileMiddleware
from keystile.routing import Rule

Headers = list[tuple[bytes, bytes]]
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
REALM = 'Bearer realm="api"'


# -- helpers shared with test_bad_input and test_routing -------------------------------------


def challenge(error: str, scope: str | None = None, realm: str = REALM) -> str:
    """The WWW-Authenticate value docs/errors.md gives for an error (RFC 6750 §3)."""
    value = f'{realm}, error="{error}"'
    return value if scope is None else f'{value}, scope="{scope}"'


def assert_refused(
    response: httpx.Response, status: int, code: str, www_authenticate: str | None
) -> None:
    """The response is the documented refusal: status, exact JSON shape, exact challenge."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    expected = [] if www_authenticate is None else [www_authenticate]
    assert response.headers.get_list("www-authenticate") == expected


def bearer(token: str, scheme: str = "Bearer") -> dict[str, str]:
    return {"Authorization": f"{scheme} {token}"}


class Seen:
    """What the app's endpoints were called with."""

    def __init__(self) -> None:
        self.connections: list[HTTPConnection] = []

    def __len__(self) -> int:
        return len(self.connections)

    @property
    def last(self) -> HTTPConnection:
        return self.connections[-1]


def make_app(
    gate: Keystile,
    *,
    rules: Iterable[Rule] = (),
    deny_unmatched: bool = False,
    routes: Sequence[BaseRoute] | None = None,
    **options: Any,
) -> tuple[Starlette, Seen]:
    """A Starlette app behind the middleware; by default every path reaches one endpoint."""
    seen = Seen()

    async def endpoint(request: Request) -> JSONResponse:
        seen.connections.append(request)
        user = request.user
        return JSONResponse(
            {
                "path": request.url.path,
                "authenticated": user.is_authenticated,
                "key": user.identity if user.is_authenticated else None,
                "scopes": sorted(request.auth.scopes),
            }
        )

    app = Starlette(
        routes=list(routes)
        if routes is not None
        else [Route("/{rest:path}", endpoint, methods=METHODS)],
        middleware=[
            Middleware(
                KeystileMiddleware,
                gate=gate,
                rules=list(rules),
                deny_unmatched=deny_unmatched,
                **options,
            )
        ],
    )
    return app, seen


@asynccontextmanager
async def client(app: Any, address: str = "127.0.0.1") -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client into ``app``, whose requests come from ``address``."""
    transport = httpx.ASGITransport(app=app, client=(address, 123))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        yield http


async def call(
    app: Any,
    headers: Headers,
    *,
    method: str = "GET",
    path: str = "/x",
    root_path: str = "",
) -> httpx.Response:
    """One raw ASGI HTTP request: the headers go through byte for byte, as a server sends
    them (names lower-case, values anything)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode("utf-8"),
        "root_path": root_path,
        "query_string": b"",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "state": {},
    }
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return httpx.Response(start["status"], headers=start.get("headers", []), content=body)


async def new_key(gate: Keystile, scopes: Sequence[str] = ("vec:read",), **fields: Any) -> str:
    """Issue a production key; its secret."""
    created = await gate.manager.create({"name": "n", "type": "prod", "scopes": scopes, **fields})
    return created.secret.get_secret_value()


class Outage:
    """A store that can be cut off: while ``down``, lookups fail as with Redis unreachable."""

    def __init__(self, store: KeyStore) -> None:
        self.store = store
        self.down = False
        self.finds = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def find(self, digest: str) -> ApiKey | None:
        self.finds += 1
        if self.down:
            raise StoreUnavailable("the store is down (test)")
        return await self.store.find(digest)


@pytest.fixture
async def gate(store: KeyStore, clock: ManualClock) -> Keystile:
    """A gate on each backend, listening to its store's announcements."""
    made = Keystile(store=store, secret=SECRET, clock=clock)
    assert await made.store.start(timeout=2.0)
    return made


@pytest.fixture
def local(clock: ManualClock) -> Keystile:
    """A gate on the in-memory store, for behaviour that does not depend on the backend."""
    return Keystile(store=MemoryStore(), secret=SECRET, clock=clock)


# -- no key, malformed header ----------------------------------------------------------------


async def test_no_authorization_header_is_401_missing_api_key(local: Keystile) -> None:
    """Without Authorization the answer is 401 missing_api_key with a bare Bearer challenge."""
    app, seen = make_app(local)
    async with client(app) as http:
        response = await http.get("/x")
    # RFC 6750 §3.1: no error param when the request carried no credentials.
    assert_refused(response, 401, "missing_api_key", REALM)
    assert len(seen) == 0


@pytest.mark.parametrize(
    ("realm", "header"),
    [
        pytest.param("vectors", 'Bearer realm="vectors"', id="plain"),
        pytest.param('my "api"', r'Bearer realm="my \"api\""', id="quoted"),
    ],
)
async def test_realm_is_configurable(local: Keystile, realm: str, header: str) -> None:
    """The realm option appears in the challenge as an RFC 7235 quoted-string."""
    app, _ = make_app(local, realm=realm)
    async with client(app) as http:
        missing = await http.get("/x")
        invalid = await http.get("/x", headers=bearer("nope"))
    assert_refused(missing, 401, "missing_api_key", header)
    assert_refused(invalid, 401, "invalid_api_key", challenge("invalid_token", realm=header))


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("Basic dXNlcjpwYXNzd29yZA==", id="basic-scheme"),
        pytest.param("Token {key}", id="other-scheme"),
        pytest.param("{key}", id="key-without-scheme"),
        pytest.param("Bearer", id="scheme-only"),
        pytest.param("Bearer ", id="empty-token"),
        pytest.param("Bearer:{key}", id="colon-separator"),
        pytest.param("Bearer {key} extra", id="two-tokens"),
        pytest.param("Bearer {key}, Bearer {key}", id="comma-joined"),
        pytest.param("", id="empty-value"),
    ],
)
async def test_not_bearer_syntax_is_400_invalid_request(local: Keystile, value: str) -> None:
    """A header that is not 'Bearer <token>' is 400 invalid_request, the app never called."""
    app, seen = make_app(local)
    key = await new_key(local)
    async with client(app) as http:
        response = await http.get("/x", headers={"Authorization": value.format(key=key)})
    assert_refused(response, 400, "invalid_request", challenge("invalid_request"))
    assert len(seen) == 0


@pytest.mark.parametrize(
    "second",
    [
        pytest.param("same", id="same-key-twice"),
        pytest.param("other", id="two-valid-keys"),
        pytest.param("garbage", id="valid-and-garbage"),
    ],
)
async def test_authorization_sent_twice_is_400_invalid_request(
    local: Keystile, second: str
) -> None:
    """Two Authorization headers are ambiguous: 400 invalid_request even if both are valid."""
    app, seen = make_app(local)
    key = await new_key(local)
    other = {"same": key, "other": await new_key(local), "garbage": "x"}[second]
    headers = [
        (b"authorization", f"Bearer {key}".encode()),
        (b"authorization", f"Bearer {other}".encode()),
    ]
    response = await call(app, headers)
    assert_refused(response, 400, "invalid_request", challenge("invalid_request"))
    assert len(seen) == 0


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
async def test_scheme_is_case_insensitive(local: Keystile, scheme: str) -> None:
    """The scheme name matches in any case (RFC 7235 §2.1)."""
    app, _ = make_app(local)
    key = await new_key(local)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(key, scheme))
    assert response.status_code == 200


async def test_spaces_after_the_scheme_are_tolerated(local: Keystile) -> None:
    """'Bearer' followed by several spaces and the key is accepted (1*SP, RFC 7235 §2.1)."""
    app, _ = make_app(local)
    key = await new_key(local)
    response = await call(app, [(b"authorization", b"Bearer   " + key.encode())])
    assert response.status_code == 200


# -- invalid, unknown, expired, revoked keys --------------------------------------------------


def _swap_body_case(key: str) -> str:
    prefix, _, tail = key.partition("_")
    return f"{prefix}_{tail.swapcase()}"


def _change_last(key: str) -> str:
    return key[:-1] + ("A" if key[-1] != "A" else "B")


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda k: "live_" + k.removeprefix("prod_"), id="unknown-prefix"),
        pytest.param(lambda k: "dev_" + k.removeprefix("prod_"), id="other-type-prefix"),
        pytest.param(lambda k: k.upper(), id="upper-cased"),
        pytest.param(_swap_body_case, id="body-case-swapped"),
        pytest.param(_change_last, id="checksum-changed"),
        pytest.param(lambda k: k[:-1], id="truncated"),
        pytest.param(lambda k: k + "A", id="one-too-long"),
        pytest.param(lambda k: k.removeprefix("prod_"), id="prefix-dropped"),
        pytest.param(lambda k: "nope", id="short-garbage"),
    ],
)
async def test_bad_prefix_or_checksum_is_401_invalid_api_key(local: Keystile, tamper: Any) -> None:
    """A token with a wrong prefix, checksum or length is 401 invalid_api_key; the token is
    compared exactly."""
    app, seen = make_app(local)
    key = await new_key(local)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(tamper(key)))
    assert_refused(response, 401, "invalid_api_key", challenge("invalid_token"))
    assert len(seen) == 0


async def test_unknown_key_is_401_invalid_api_key(gate: Keystile) -> None:
    """A well-formed key that was never issued is 401 invalid_api_key."""
    app, seen = make_app(gate)
    await new_key(gate)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(generate_key("prod_")))
    assert_refused(response, 401, "invalid_api_key", challenge("invalid_token"))
    assert len(seen) == 0


async def test_key_issued_with_another_secret_is_401_invalid_api_key(
    store: KeyStore, clock: ManualClock
) -> None:
    """A key issued under another server secret is unknown to this gate."""
    issuing = Keystile(store=store, secret="another-secret-0123456789", clock=clock)
    checking = Keystile(store=store, secret=SECRET, clock=clock)
    key = await new_key(issuing)
    app, _ = make_app(checking)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(key))
    assert_refused(response, 401, "invalid_api_key", challenge("invalid_token"))


async def test_valid_key_reaches_the_app(gate: Keystile) -> None:
    """A valid key passes, on every backend, for every method."""
    app, seen = make_app(gate)
    key = await new_key(gate)
    async with client(app) as http:
        for method in METHODS:
            response = await http.request(method, "/x", headers=bearer(key))
            assert response.status_code == 200, method
    assert len(seen) == len(METHODS)


async def test_expired_key_is_401_expired_api_key(gate: Keystile, clock: ManualClock) -> None:
    """A key is accepted until its expiry and refused from that very instant on."""
    expires = clock.now + 60
    app, seen = make_app(gate)
    key = await new_key(gate, expires_at=to_datetime(expires))
    async with client(app) as http:
        assert (await http.get("/x", headers=bearer(key))).status_code == 200
        clock.now = expires - 0.001
        assert (await http.get("/x", headers=bearer(key))).status_code == 200
        clock.now = expires
        at_expiry = await http.get("/x", headers=bearer(key))
        clock.advance(86_400)
        later = await http.get("/x", headers=bearer(key))
    assert_refused(at_expiry, 401, "expired_api_key", challenge("invalid_token"))
    assert_refused(later, 401, "expired_api_key", challenge("invalid_token"))
    assert len(seen) == 2


async def test_revoked_key_is_refused_on_the_very_next_request(gate: Keystile) -> None:
    """A key revoked through the gate's manager is 401 revoked_api_key on the next request,
    while other keys keep working."""
    app, seen = make_app(gate)
    created = await gate.manager.create({"name": "n", "type": "prod", "scopes": ["vec:read"]})
    key = created.secret.get_secret_value()
    other = await new_key(gate)
    async with client(app) as http:
        assert (await http.get("/x", headers=bearer(key))).status_code == 200
        assert (await http.get("/x", headers=bearer(other))).status_code == 200
        await gate.manager.revoke(created.key.id)
        response = await http.get("/x", headers=bearer(key))
        still = await http.get("/x", headers=bearer(other))
    assert_refused(response, 401, "revoked_api_key", challenge("invalid_token"))
    assert still.status_code == 200
    assert len(seen) == 3


async def test_revoked_beats_expired(local: Keystile, clock: ManualClock) -> None:
    """A key both revoked and expired is reported as revoked."""
    app, _ = make_app(local)
    created = await local.manager.create(
        {"name": "n", "type": "prod", "expires_at": to_datetime(clock.now + 10)}
    )
    await local.manager.revoke(created.key.id)
    clock.advance(20)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(created.secret.get_secret_value()))
    assert_refused(response, 401, "revoked_api_key", challenge("invalid_token"))


# -- scopes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("required", "held", "missing"),
    [
        pytest.param(["vec:write"], ["vec:read"], "vec:write", id="one-missing"),
        pytest.param(
            ["vec:read", "vec:write", "kev:read"], ["vec:read"], "vec:write kev:read", id="two"
        ),
        pytest.param(["vec:write"], [], "vec:write", id="no-scopes-at-all"),
    ],
)
async def test_missing_scope_is_403_insufficient_scope(
    local: Keystile, required: list[str], held: list[str], missing: str
) -> None:
    """A key lacking a route's scope is 403 insufficient_scope naming the missing scopes."""
    app, seen = make_app(local, rules=[Rule("POST", "/x", required)])
    key = await new_key(local, scopes=held)
    async with client(app) as http:
        response = await http.post("/x", headers=bearer(key))
    assert_refused(response, 403, "insufficient_scope", challenge("insufficient_scope", missing))
    assert missing in response.json()["error"]["message"]
    assert len(seen) == 0


async def test_granted_scope_passes(local: Keystile) -> None:
    """A key holding every scope a rule requires reaches the app."""
    app, _ = make_app(local, rules=[Rule("POST", "/x", ["vec:read", "vec:write"])])
    key = await new_key(local, scopes=["vec:read", "vec:write", "kev:read"])
    async with client(app) as http:
        response = await http.post("/x", headers=bearer(key))
    assert response.status_code == 200


async def test_authentication_comes_before_authorization(local: Keystile) -> None:
    """Without a key, a scoped route answers 401 missing_api_key, not 403."""
    app, _ = make_app(local, rules=[Rule("POST", "/x", ["vec:write"])])
    async with client(app) as http:
        response = await http.post("/x")
    assert_refused(response, 401, "missing_api_key", REALM)


# -- the store unreachable ----------------------------------------------------------------------


async def test_unreachable_store_is_503_auth_unavailable(unused_redis_url: str) -> None:
    """With Redis unreachable and the key not cached, the answer is 503 auth_unavailable with
    Retry-After, and no authentication challenge."""
    store = RedisStore.from_url(unused_redis_url, timeout=0.2, pool_timeout=0.2)
    unreachable = Keystile(store=store, secret=SECRET)
    app, seen = make_app(unreachable, retry_after=7)
    try:
        async with client(app) as http:
            response = await http.get("/x", headers=bearer(generate_key("prod_")))
    finally:
        await unreachable.aclose()
    assert_refused(response, 503, "auth_unavailable", None)
    assert response.headers["retry-after"] == "7"
    assert len(seen) == 0


async def test_retry_after_defaults_to_one_second(unused_redis_url: str) -> None:
    """The 503's Retry-After is 1 second unless configured."""
    store = RedisStore.from_url(unused_redis_url, timeout=0.2, pool_timeout=0.2)
    unreachable = Keystile(store=store, secret=SECRET)
    app, _ = make_app(unreachable)
    try:
        response = await call(app, [(b"authorization", f"Bearer {generate_key('dev_')}".encode())])
    finally:
        await unreachable.aclose()
    assert_refused(response, 503, "auth_unavailable", None)
    assert response.headers.get_list("retry-after") == ["1"]


async def test_cached_key_works_while_the_store_is_down(
    store: KeyStore, clock: ManualClock
) -> None:
    """A key already cached keeps working with the store down; one not cached gets 503."""
    outage = Outage(store)
    gate = Keystile(store=outage, secret=SECRET, clock=clock)
    assert await gate.store.start(timeout=2.0)
    app, seen = make_app(gate)
    cached = await new_key(gate)
    uncached = await new_key(gate)
    async with client(app) as http:
        assert (await http.get("/x", headers=bearer(cached))).status_code == 200
        outage.down = True
        finds = outage.finds
        still = await http.get("/x", headers=bearer(cached))
        refused = await http.get("/x", headers=bearer(uncached))
        asked = outage.finds - finds
        outage.down = False
        recovered = await http.get("/x", headers=bearer(uncached))
    assert still.status_code == 200
    assert asked == 1  # only the uncached key asked the store
    assert_refused(refused, 503, "auth_unavailable", None)
    assert refused.headers["retry-after"] == "1"
    assert recovered.status_code == 200  # a 503 is not remembered
    assert len(seen) == 3


async def test_cached_key_works_while_the_redis_connection_is_down(clock: ManualClock) -> None:
    """With the Redis connection gone (fakeredis disconnected), a cached key still passes and
    an uncached one gets 503."""
    server = fakeredis.FakeServer()
    store = RedisStore(fake_redis(server), namespace=new_namespace())
    gate = Keystile(store=store, secret=SECRET, clock=clock)
    try:
        assert await gate.store.start(timeout=2.0)
        app, _ = make_app(gate)
        cached = await new_key(gate)
        uncached = await new_key(gate)
        async with client(app) as http:
            assert (await http.get("/x", headers=bearer(cached))).status_code == 200
            server.connected = False
            still = await http.get("/x", headers=bearer(cached))
            refused = await http.get("/x", headers=bearer(uncached))
    finally:
        await gate.aclose()
    assert still.status_code == 200
    assert_refused(refused, 503, "auth_unavailable", None)


async def test_slow_store_is_503_after_the_lookup_timeout(clock: ManualClock) -> None:
    """A store that never answers turns into 503 once the gate's lookup timeout passes."""

    class Hanging(MemoryStore):
        async def find(self, digest: str) -> ApiKey | None:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    gate = Keystile(store=Hanging(), secret=SECRET, clock=clock, lookup_timeout=0.05)
    app, _ = make_app(gate)
    key = await new_key(gate)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(key))
    assert_refused(response, 503, "auth_unavailable", None)


# -- what handlers see --------------------------------------------------------------------------


async def test_request_user_carries_the_record_never_the_secret(local: Keystile) -> None:
    """After success request.user is an authenticated KeyUser whose .key is the ApiKey record,
    and the secret appears nowhere in it."""
    app, seen = make_app(local)
    created = await local.manager.create(
        {"name": "indexer", "type": "prod", "scopes": ["vec:read"]}
    )
    secret = created.secret.get_secret_value()
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(secret))
    assert response.json()["key"] == created.key.id
    user = seen.last.user
    assert isinstance(user, KeyUser)
    assert user.is_authenticated
    assert user.key == created.key
    assert isinstance(user.key, ApiKey)
    assert user.identity == created.key.id
    assert user.display_name == "indexer"
    for text in (repr(user), str(user), user.key.model_dump_json(), repr(user.key)):
        assert secret not in text
        assert secret[len("prod_") :] not in text


async def test_request_auth_holds_expanded_scopes(local: Keystile) -> None:
    """request.auth is AuthCredentials whose scopes are the key's scopes with wildcards
    expanded."""
    app, seen = make_app(local)
    key = await new_key(local, scopes=["vec:*", "ai:inference"])
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(key))
    auth = seen.last.auth
    assert isinstance(auth, AuthCredentials)
    assert {"vec:read", "vec:write", "vec:delete", "ai:inference"} <= set(auth.scopes)
    assert not {"kev:read", "ai:agents"} & set(auth.scopes)
    assert "vec:read" in response.json()["scopes"]


async def test_starlette_requires_works_with_a_wildcard_key(local: Keystile) -> None:
    """starlette.authentication.requires('vec:read') admits a key holding vec:*, and refuses a
    key without it."""

    @requires("vec:read")
    async def read(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    app, _ = make_app(local, routes=[Route("/read", read)])
    wildcard = await new_key(local, scopes=["vec:*"])
    other = await new_key(local, scopes=["kev:*"])
    async with client(app) as http:
        granted = await http.get("/read", headers=bearer(wildcard))
        refused = await http.get("/read", headers=bearer(other))
    assert granted.status_code == 200
    assert refused.status_code == 403


# -- non-HTTP traffic ---------------------------------------------------------------------------


async def test_lifespan_passes_through(local: Keystile) -> None:
    """Lifespan events reach the app's startup and shutdown handlers untouched."""
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = Starlette(lifespan=lifespan, middleware=[Middleware(KeystileMiddleware, gate=local)])
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[str] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message["type"])

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await app(scope, receive, send)
    assert events == ["startup", "shutdown"]
    assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def websocket_app(gate: Keystile) -> Starlette:
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        user = websocket.user
        await websocket.send_json({"key": user.identity, "scopes": sorted(websocket.auth.scopes)})
        await websocket.close()

    return Starlette(
        routes=[WebSocketRoute("/ws", echo)],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )


async def handshake(app: Any, headers: Headers, path: str = "/ws") -> list[dict[str, Any]]:
    """Open a websocket with raw ASGI messages, as a server would; what the app sent.

    (Starlette's TestClient warns about httpx under ``-W error``, so it is not used.)
    """
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
        "subprotocols": [],
        "state": {},
    }
    incoming: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if incoming:
            return incoming.pop(0)
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def authorization(token: str) -> Headers:
    return [(b"authorization", f"Bearer {token}".encode())]


async def test_websocket_with_a_good_key_is_accepted(local: Keystile) -> None:
    """A websocket handshake carrying a valid key is accepted and sees the key's user."""
    created = await local.manager.create({"name": "n", "type": "prod", "scopes": ["vec:read"]})
    sent = await handshake(websocket_app(local), authorization(created.secret.get_secret_value()))
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.send", "websocket.close"]
    assert json.loads(sent[1]["text"]) == {"key": created.key.id, "scopes": ["vec:read"]}


@pytest.mark.parametrize(
    ("headers", "reason"),
    [
        pytest.param([], "missing_api_key", id="no-key"),
        pytest.param(authorization(generate_key("prod_")), "invalid_api_key", id="unknown-key"),
        pytest.param(authorization("garbage"), "invalid_api_key", id="bad-key"),
        pytest.param([(b"authorization", b"Basic Zm9vOmJhcg==")], "invalid_request", id="basic"),
    ],
)
async def test_websocket_without_a_good_key_is_refused_with_1008(
    local: Keystile, headers: Headers, reason: str
) -> None:
    """A websocket handshake without a valid key is closed with 1008 before it is accepted."""
    sent = await handshake(websocket_app(local), headers)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": reason}]


async def test_websocket_with_a_revoked_key_is_refused_with_1008(local: Keystile) -> None:
    """A revoked key cannot open a websocket."""
    created = await local.manager.create({"name": "n", "type": "prod"})
    await local.manager.revoke(created.key.id)
    sent = await handshake(websocket_app(local), authorization(created.secret.get_secret_value()))
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "revoked_api_key"}]
