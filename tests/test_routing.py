"""Per-route scopes (docs/key-format.md): the decorator, the FastAPI dependency and the central
rule table."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from fastapi import FastAPI, Security
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from conftest import SECRET
from keystile import ApiKey, ManualClock, MemoryStore
from keystile.fastapi import api_key, require
from keystile.gate import Keystile
from keystile.middleware import KeystileMiddleware
from keystile.routing import Rule, RuleTable, public, scopes_required
from test_middleware import (
    REALM,
    assert_refused,
    bearer,
    call,
    challenge,
    client,
    handshake,
    make_app,
    new_key,
)


@pytest.fixture
def local(clock: ManualClock) -> Keystile:
    return Keystile(store=MemoryStore(), secret=SECRET, clock=clock)


def authorization(token: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {token}".encode())]


# -- at the endpoint: the Starlette decorator ------------------------------------------------


@scopes_required("vec:write")
async def write(request: Request) -> Response:
    return PlainTextResponse("written")


@scopes_required("vec:write")
async def stream(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text("streaming")
    await websocket.close()


class Databases(HTTPEndpoint):
    @scopes_required("vec:delete")
    async def delete(self, request: Request) -> Response:
        return PlainTextResponse("deleted")


def decorated_app(gate: Keystile, **options: Any) -> Any:
    app, _ = make_app(
        gate,
        routes=[
            Route("/write", write, methods=["POST"]),
            Route("/databases", Databases),
            WebSocketRoute("/stream", stream),
        ],
        **options,
    )
    return app


async def test_decorator_refuses_a_key_without_the_scope(local: Keystile) -> None:
    """@scopes_required answers 403 insufficient_scope with the documented body and challenge."""
    app = decorated_app(local)
    key = await new_key(local, scopes=["vec:read"])
    async with client(app) as http:
        response = await http.post("/write", headers=bearer(key))
    assert_refused(
        response, 403, "insufficient_scope", challenge("insufficient_scope", "vec:write")
    )


@pytest.mark.parametrize("scopes", [["vec:write"], ["vec:*"], ["*"]], ids=["exact", "vec:*", "*"])
async def test_decorator_admits_a_key_with_the_scope(local: Keystile, scopes: list[str]) -> None:
    """@scopes_required lets through a key holding the scope, directly or by wildcard."""
    app = decorated_app(local)
    key = await new_key(local, scopes=scopes)
    async with client(app) as http:
        response = await http.post("/write", headers=bearer(key))
    assert response.status_code == 200
    assert response.text == "written"


async def test_decorator_works_on_endpoint_methods(local: Keystile) -> None:
    """@scopes_required on an HTTPEndpoint method checks that method's scopes."""
    app = decorated_app(local)
    reader = await new_key(local, scopes=["vec:read"])
    deleter = await new_key(local, scopes=["vec:delete"])
    async with client(app) as http:
        refused = await http.delete("/databases", headers=bearer(reader))
        granted = await http.delete("/databases", headers=bearer(deleter))
    assert_refused(
        refused, 403, "insufficient_scope", challenge("insufficient_scope", "vec:delete")
    )
    assert granted.text == "deleted"


async def test_decorator_refuses_a_websocket_with_1008(local: Keystile) -> None:
    """A decorated websocket endpoint closes the handshake with 1008 when the scope is
    missing, and accepts it when the scope is held."""
    app = decorated_app(local)
    reader = await new_key(local, scopes=["vec:read"])
    writer = await new_key(local, scopes=["vec:write"])
    refused = await handshake(app, authorization(reader), path="/stream")
    accepted = await handshake(app, authorization(writer), path="/stream")
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "insufficient_scope"}]
    assert [m["type"] for m in accepted] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]


async def test_decorator_behind_a_public_rule_still_wants_a_key(local: Keystile) -> None:
    """A decorated endpoint on a public path answers 401 missing_api_key, not the handler."""
    app = decorated_app(local, rules=[public("/write")])
    async with client(app) as http:
        response = await http.post("/write")
    assert_refused(response, 401, "missing_api_key", REALM)


def test_decorator_needs_a_request_parameter() -> None:
    """Decorating a function that takes no request or websocket is a TypeError at once."""

    async def endpoint(conn: Request) -> Response:
        return PlainTextResponse("")

    with pytest.raises(TypeError, match="request"):
        scopes_required("vec:read")(endpoint)


@scopes_required("vec:read")
def plain_read(request: Request) -> Response:
    return PlainTextResponse("plain")


async def test_decorator_refuses_on_a_plain_def_endpoint(local: Keystile) -> None:
    """@scopes_required on a plain ``def`` endpoint refuses a key without the scope."""
    app, _ = make_app(local, routes=[Route("/plain", plain_read)])
    key = await new_key(local, scopes=["kev:read"])
    async with client(app) as http:
        response = await http.get("/plain", headers=bearer(key))
    assert_refused(
        response, 403, "insufficient_scope", challenge("insufficient_scope", "vec:read")
    )


async def test_decorator_admits_on_a_plain_def_endpoint(local: Keystile) -> None:
    """@scopes_required on a plain ``def`` endpoint lets a key holding the scope through."""
    app, _ = make_app(local, routes=[Route("/plain", plain_read)])
    key = await new_key(local, scopes=["vec:read"])
    async with client(app) as http:
        response = await http.get("/plain", headers=bearer(key))
    assert response.status_code == 200
    assert response.text == "plain"


# -- at the endpoint: the FastAPI dependency --------------------------------------------------


def fastapi_app(gate: Keystile | None) -> tuple[FastAPI, list[str]]:
    """A FastAPI app with scoped routes, behind the middleware unless ``gate`` is None."""
    called: list[str] = []
    app = FastAPI(middleware=[] if gate is None else [Middleware(KeystileMiddleware, gate=gate)])

    @app.post("/cloud/vec/databases")
    async def create(key: Annotated[ApiKey, Security(api_key, scopes=["vec:write"])]) -> Any:
        called.append(key.id)
        return {"created_by": key.id}

    @app.get("/cloud/vec/databases")
    async def listing(key: Annotated[ApiKey, require("vec:read")]) -> Any:
        called.append(key.id)
        return {"listed_by": key.id}

    @app.get("/open")
    async def open_route() -> Any:
        return {}

    @app.websocket("/cloud/vec/stream")
    async def stream(websocket: WebSocket, key: Annotated[ApiKey, require("vec:read")]) -> None:
        called.append(key.id)
        await websocket.accept()
        await websocket.send_text(f"streaming for {key.id}")
        await websocket.close()

    return app, called


async def test_fastapi_security_refuses_a_key_without_the_scope(local: Keystile) -> None:
    """Security(api_key, scopes=[...]) answers 403 with the documented body and challenge."""
    app, called = fastapi_app(local)
    key = await new_key(local, scopes=["vec:read"])
    async with client(app) as http:
        response = await http.post("/cloud/vec/databases", headers=bearer(key))
    assert_refused(
        response, 403, "insufficient_scope", challenge("insufficient_scope", "vec:write")
    )
    assert called == []


async def test_fastapi_security_admits_a_key_with_the_scope(local: Keystile) -> None:
    """Security(api_key, scopes=[...]) hands the endpoint the key's record when it is granted."""
    app, called = fastapi_app(local)
    created = await local.manager.create({"name": "n", "type": "prod", "scopes": ["vec:*"]})
    headers = bearer(created.secret.get_secret_value())
    async with client(app) as http:
        written = await http.post("/cloud/vec/databases", headers=headers)
        listed = await http.get("/cloud/vec/databases", headers=headers)
    assert written.status_code == 200 and written.json() == {"created_by": created.key.id}
    assert listed.status_code == 200 and listed.json() == {"listed_by": created.key.id}
    assert called == [created.key.id, created.key.id]


async def test_fastapi_route_without_a_key_is_401(local: Keystile) -> None:
    """Without a key the middleware answers 401 before the dependency runs."""
    app, called = fastapi_app(local)
    async with client(app) as http:
        response = await http.post("/cloud/vec/databases")
    assert_refused(response, 401, "missing_api_key", REALM)
    assert called == []


async def test_fastapi_security_on_a_websocket_route(local: Keystile) -> None:
    """On a FastAPI websocket route the dependency accepts a key holding the scope and
    closes the handshake with 1008 insufficient_scope otherwise (never a 500)."""
    app, called = fastapi_app(local)
    reader = await local.manager.create({"name": "r", "type": "dev", "scopes": ["vec:read"]})
    writer = await new_key(local, scopes=["vec:write"])
    accepted = await handshake(
        app, authorization(reader.secret.get_secret_value()), path="/cloud/vec/stream"
    )
    refused = await handshake(app, authorization(writer), path="/cloud/vec/stream")
    assert accepted == [
        {"type": "websocket.accept", "subprotocol": None, "headers": []},
        {"type": "websocket.send", "text": f"streaming for {reader.key.id}"},
        {"type": "websocket.close", "code": 1000, "reason": ""},
    ]
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "insufficient_scope"}]
    assert called == [reader.key.id]


def test_fastapi_scopes_appear_in_openapi(local: Keystile) -> None:
    """The generated OpenAPI document lists each operation's scopes under the Keystile bearer
    scheme."""
    app, _ = fastapi_app(local)
    document = app.openapi()
    paths = document["paths"]
    assert paths["/cloud/vec/databases"]["post"]["security"] == [{"Keystile": ["vec:write"]}]
    assert paths["/cloud/vec/databases"]["get"]["security"] == [{"Keystile": ["vec:read"]}]
    assert "security" not in paths["/open"]["get"]
    scheme = document["components"]["securitySchemes"]["Keystile"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    assert scheme["bearerFormat"]


def mounted_fastapi_app(gate: Keystile) -> tuple[Starlette, list[str]]:
    """The FastAPI app mounted at /api under a Starlette app that carries the middleware."""
    sub, called = fastapi_app(None)
    parent = Starlette(
        routes=[Mount("/api", app=sub)],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )
    return parent, called


async def test_fastapi_sub_app_mounted_under_the_middleware_admits(local: Keystile) -> None:
    """A FastAPI app mounted under the middleware's app admits a key holding the scope."""
    app, called = mounted_fastapi_app(local)
    key = await new_key(local, scopes=["vec:write"])
    response = await call(app, authorization(key), method="POST", path="/api/cloud/vec/databases")
    assert response.status_code == 200
    assert len(called) == 1


async def test_fastapi_sub_app_mounted_under_the_middleware_refuses(local: Keystile) -> None:
    """A FastAPI app mounted under the middleware's app refuses a missing scope with the
    documented 403, never a 500."""
    app, called = mounted_fastapi_app(local)
    key = await new_key(local, scopes=["vec:read"])
    response = await call(app, authorization(key), method="POST", path="/api/cloud/vec/databases")
    assert response.status_code == 403, f"{response.status_code} {response.text}"
    assert_refused(
        response, 403, "insufficient_scope", challenge("insufficient_scope", "vec:write")
    )
    assert called == []


# -- centrally: the rule table ------------------------------------------------------------------

TABLE = [
    public("/health"),
    Rule("GET", "/vec/databases/stats", ["admin:view_usage"]),
    Rule("GET", "/vec/databases/{name}", ["vec:read"]),
    Rule("POST|PUT", "/vec/databases/{name}", ["vec:write"]),
    Rule(["DELETE"], "/vec/databases/{name}", ["vec:delete"]),
    Rule("GET", "/files/{path:path}", ["files:read"]),
    Rule("get", "/data/tables/{n:int}", ["data:read"]),
    Rule("*", "/ai/{rest:path}", ["ai:inference"]),
    Rule("GET", "/me"),
]


@pytest.mark.parametrize(
    ("method", "path", "index"),
    [
        pytest.param("GET", "/health", 0, id="public"),
        pytest.param("POST", "/health", 0, id="public-any-method"),
        pytest.param("GET", "/healthz", None, id="no-prefix-match"),
        pytest.param("GET", "/Health", None, id="case-sensitive"),
        pytest.param("GET", "/vec/databases/stats", 1, id="first-match-wins"),
        pytest.param("GET", "/vec/databases/docs", 2, id="param"),
        pytest.param("HEAD", "/vec/databases/docs", 2, id="get-covers-head"),
        pytest.param("POST", "/vec/databases/docs", 3, id="pipe-methods-post"),
        pytest.param("PUT", "/vec/databases/docs", 3, id="pipe-methods-put"),
        pytest.param("DELETE", "/vec/databases/docs", 4, id="list-methods"),
        pytest.param("PATCH", "/vec/databases/docs", None, id="method-not-covered"),
        pytest.param("GET", "/vec/databases/a/b", None, id="param-is-one-segment"),
        pytest.param("GET", "/vec/databases/", None, id="param-is-not-empty"),
        pytest.param("GET", "/files/a/b/c.txt", 5, id="path-param-spans-segments"),
        pytest.param("GET", "/files/", 5, id="path-param-may-be-empty"),
        pytest.param("HEAD", "/files/a", 5, id="path-param-head"),
        pytest.param("POST", "/files/a", None, id="get-does-not-cover-post"),
        pytest.param("GET", "/data/tables/42", 6, id="int-param"),
        pytest.param("HEAD", "/data/tables/42", 6, id="lower-case-method"),
        pytest.param("GET", "/data/tables/x", None, id="int-param-refuses-text"),
        pytest.param("OPTIONS", "/ai/chat", 7, id="any-method"),
        pytest.param("PATCH", "/ai/agents/1/run", 7, id="any-method-path"),
        pytest.param("GET", "/me", 8, id="no-scopes"),
        pytest.param("GET", "/me/", None, id="trailing-slash"),
    ],
)
def test_rule_table_matches(method: str, path: str, index: int | None) -> None:
    """Method and path pick the first rule that covers them, as Starlette would route."""
    found = RuleTable(TABLE).match(method, path)
    assert found is (None if index is None else TABLE[index])


def test_first_rule_wins_whatever_is_more_specific() -> None:
    """Rules are tried in order: a general rule listed first shadows a specific one."""
    general = Rule("GET", "/vec/databases/{name}", ["vec:read"])
    specific = Rule("GET", "/vec/databases/stats", ["admin:view_usage"])
    assert RuleTable([general, specific]).match("GET", "/vec/databases/stats") is general
    assert RuleTable([specific, general]).match("GET", "/vec/databases/stats") is specific


def test_an_empty_table_matches_nothing() -> None:
    """No rules, no match."""
    assert RuleTable([]).match("GET", "/") is None
    assert not RuleTable([])


@pytest.mark.parametrize(
    ("method", "path", "scopes", "status", "missing"),
    [
        pytest.param("GET", "/vec/databases/docs", ["vec:read"], 200, None, id="granted"),
        pytest.param("HEAD", "/vec/databases/docs", ["vec:read"], 200, None, id="head"),
        pytest.param("POST", "/vec/databases/docs", ["vec:read"], 403, "vec:write", id="write"),
        pytest.param("DELETE", "/vec/databases/x", ["vec:write"], 403, "vec:delete", id="del"),
        pytest.param(
            "GET", "/vec/databases/stats", ["vec:read"], 403, "admin:view_usage", id="1st"
        ),
        pytest.param("GET", "/files/a/b.txt", ["vec:read"], 403, "files:read", id="path"),
        pytest.param("GET", "/files/a/b.txt", ["files:read"], 200, None, id="path-granted"),
        pytest.param("GET", "/data/tables/7", ["data:read"], 200, None, id="int"),
        pytest.param("POST", "/ai/chat", ["vec:*"], 403, "ai:inference", id="any-method"),
        pytest.param("GET", "/me", [], 200, None, id="authenticated-only"),
        pytest.param("GET", "/unlisted", [], 200, None, id="unmatched-allowed"),
    ],
)
async def test_rule_table_in_the_middleware(
    local: Keystile,
    method: str,
    path: str,
    scopes: list[str],
    status: int,
    missing: str | None,
) -> None:
    """The middleware refuses a request its matching rule does not grant, and passes the rest."""
    app, seen = make_app(local, rules=TABLE)
    key = await new_key(local, scopes=scopes)
    async with client(app) as http:
        response = await http.request(method, path, headers=bearer(key))
    if missing is None:
        assert response.status_code == status
        assert len(seen) == 1
    else:
        assert_refused(
            response, status, "insufficient_scope", challenge("insufficient_scope", missing)
        )
        assert len(seen) == 0


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-key"),
        pytest.param(bearer("garbage"), id="bad-key"),
        pytest.param({"Authorization": "Basic Zm9vOmJhcg=="}, id="other-scheme"),
    ],
)
async def test_public_paths_skip_authentication(local: Keystile, headers: dict[str, str]) -> None:
    """A public path is served without a key (whatever the header says), to an anonymous user."""
    app, seen = make_app(local, rules=TABLE, deny_unmatched=True)
    async with client(app) as http:
        response = await http.get("/health", headers=headers)
    assert response.status_code == 200
    assert response.json() == {
        "path": "/health",
        "authenticated": False,
        "key": None,
        "scopes": [],
    }
    assert len(seen) == 1


async def test_public_rule_limited_to_some_methods(local: Keystile) -> None:
    """public(path, methods) opens only those methods; the others still need a key."""
    app, _ = make_app(local, rules=[public("/status", methods="GET")])
    async with client(app) as http:
        opened = await http.get("/status")
        head = await http.head("/status")
        closed = await http.post("/status")
    assert opened.status_code == 200
    assert head.status_code == 200
    assert_refused(closed, 401, "missing_api_key", REALM)


async def test_deny_unmatched_refuses_uncovered_routes(local: Keystile) -> None:
    """With deny_unmatched, an authenticated request no rule covers is 403 while covered and
    public routes keep working."""
    app, seen = make_app(local, rules=TABLE, deny_unmatched=True)
    key = await new_key(local, scopes=["*"])
    async with client(app) as http:
        uncovered = await http.get("/unlisted", headers=bearer(key))
        wrong_method = await http.patch("/vec/databases/docs", headers=bearer(key))
        covered = await http.get("/vec/databases/docs", headers=bearer(key))
        scopeless = await http.get("/me", headers=bearer(key))
        open_route = await http.get("/health")
    for refused in (uncovered, wrong_method):
        # No single scope would grant it, so the challenge names none.
        assert_refused(refused, 403, "insufficient_scope", challenge("insufficient_scope"))
    assert (covered.status_code, scopeless.status_code, open_route.status_code) == (200, 200, 200)
    assert len(seen) == 3


async def test_deny_unmatched_authenticates_first(local: Keystile) -> None:
    """With deny_unmatched, an uncovered route without a key is still 401 missing_api_key."""
    app, _ = make_app(local, rules=TABLE, deny_unmatched=True)
    async with client(app) as http:
        response = await http.get("/unlisted")
    assert_refused(response, 401, "missing_api_key", REALM)


async def test_rules_apply_to_websockets(local: Keystile) -> None:
    """A websocket handshake is matched as GET: a key lacking the rule's scope gets 1008."""

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    app, _ = make_app(
        local,
        routes=[WebSocketRoute("/vec/databases/{name}", echo)],
        rules=[Rule("GET", "/vec/databases/{name}", ["vec:read"])],
    )
    reader = await new_key(local, scopes=["vec:read"])
    writer = await new_key(local, scopes=["vec:write"])
    refused = await handshake(app, authorization(writer), path="/vec/databases/docs")
    accepted = await handshake(app, authorization(reader), path="/vec/databases/docs")
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "insufficient_scope"}]
    assert accepted[0]["type"] == "websocket.accept"


# -- wildcards (docs/key-format.md) ---------------------------------------------------------


@pytest.mark.parametrize(
    ("held", "required", "granted"),
    [
        pytest.param(["vec:*"], "vec:read", True, id="service-wildcard-grants-read"),
        pytest.param(["vec:*"], "vec:write", True, id="service-wildcard-grants-write"),
        pytest.param(["vec:*"], "vec:delete", True, id="service-wildcard-grants-delete"),
        pytest.param(["vec:*"], "kev:read", False, id="service-wildcard-stays-in-service"),
        pytest.param(["vec:*"], "vec:*", True, id="service-wildcard-grants-itself"),
        pytest.param(["vec:*"], "*", False, id="service-wildcard-is-not-everything"),
        pytest.param(["vec:read"], "vec:write", False, id="action-grants-only-itself"),
        pytest.param(["vec:read"], "vec:*", False, id="one-action-is-not-the-service"),
        pytest.param(
            ["vec:read", "vec:write", "vec:delete"], "vec:*", True, id="every-action-is-service"
        ),
        pytest.param(["*"], "vec:read", True, id="star-grants-vec"),
        pytest.param(["*"], "admin:manage_keys", True, id="star-grants-admin"),
        pytest.param(["*"], "data:admin", True, id="star-grants-data-admin"),
        pytest.param(["*"], "files:*", True, id="star-grants-service-wildcard"),
        pytest.param(["*"], "*", True, id="star-grants-star"),
        pytest.param(["kev:*", "ai:agents"], "ai:agents", True, id="mixed-exact"),
        pytest.param(["kev:*", "ai:agents"], "ai:workflows", False, id="mixed-missing"),
    ],
)
async def test_wildcard_scopes(
    local: Keystile, held: list[str], required: str, granted: bool
) -> None:
    """service:* grants every action of that service and * grants everything, no more."""
    app, _ = make_app(local, rules=[Rule("GET", "/x", [required])])
    key = await new_key(local, scopes=held)
    async with client(app) as http:
        response = await http.get("/x", headers=bearer(key))
    if granted:
        assert response.status_code == 200
    else:
        assert_refused(
            response, 403, "insufficient_scope", challenge("insufficient_scope", required)
        )


# -- configuration errors -------------------------------------------------------------------------


def test_public_rule_with_scopes_is_a_value_error() -> None:
    """A rule cannot be both public and scoped."""
    with pytest.raises(ValueError, match="public"):
        Rule("GET", "/health", ["vec:read"], public=True)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("health", id="no-leading-slash"),
        pytest.param("", id="empty"),
        pytest.param("/x/{id", id="unclosed-brace"),
        pytest.param("/x/{id}}", id="extra-brace"),
        pytest.param("/x/{}", id="empty-param"),
        pytest.param("/x/{1id}", id="param-starts-with-digit"),
        pytest.param("/x/{id:nope}", id="unknown-convertor"),
        pytest.param("/x/{id:Path}", id="convertor-case"),
        pytest.param("/x/{id:}", id="empty-convertor"),
    ],
)
def test_bad_path_pattern_is_a_value_error(path: str) -> None:
    """A malformed path pattern fails when the rule is made, not on the first request."""
    with pytest.raises(ValueError, match=r"path|convertor|parameter"):
        Rule("GET", path, ["vec:read"])
    with pytest.raises(ValueError, match=r"path|convertor|parameter"):
        public(path)


@pytest.mark.parametrize("methods", ["", " | ", []], ids=["empty", "blank", "empty-list"])
def test_rule_without_methods_is_a_value_error(methods: Any) -> None:
    """A rule must name at least one method."""
    with pytest.raises(ValueError, match="method"):
        Rule(methods, "/x")


# -- rules must match what Starlette routes ---------------------------------------------------


async def inside(request: Request) -> Response:
    return PlainTextResponse("in")


async def _routed(app: Any, token: str, method: str, path: str, root_path: str = "") -> Any:
    return await call(app, authorization(token), method=method, path=path, root_path=root_path)


@pytest.mark.parametrize(
    ("route_path", "request_path"),
    [
        pytest.param("/x", "/x\n", id="plain"),
        pytest.param("/files/{p:path}", "/files/a.txt\n", id="path-param"),
    ],
)
async def test_trailing_newline_does_not_skip_the_rule(
    local: Keystile, route_path: str, request_path: str
) -> None:
    """A path with a trailing (percent-encoded) newline, which Starlette routes to the
    endpoint, is still held to the endpoint's rule."""
    app, _ = make_app(
        local,
        routes=[Route(route_path, inside, methods=["POST"])],
        rules=[Rule("POST", route_path, ["vec:write"])],
    )
    key = await new_key(local, scopes=["vec:read"])
    response = await _routed(app, key, "POST", request_path)
    assert response.status_code == 403, f"{response.status_code} {response.text}"


async def test_uuid_without_hyphens_does_not_skip_the_rule(local: Keystile) -> None:
    """A hyphen-less UUID, which Starlette's uuid convertor accepts, is held to the rule."""
    app, _ = make_app(
        local,
        routes=[Route("/items/{id:uuid}", inside)],
        rules=[Rule("GET", "/items/{id:uuid}", ["vec:write"])],
    )
    key = await new_key(local, scopes=["vec:read"])
    hyphenated = await _routed(app, key, "GET", "/items/12345678-1234-1234-1234-123456789abc")
    assert hyphenated.status_code == 403
    bare = await _routed(app, key, "GET", "/items/12345678123412341234123456789abc")
    assert bare.status_code == 403, f"{bare.status_code} {bare.text}"


async def test_root_path_does_not_skip_the_rule(local: Keystile) -> None:
    """Served under a root_path, a route is still held to the rule written for it."""
    app, _ = make_app(
        local,
        routes=[Route("/x", inside, methods=["POST"])],
        rules=[Rule("POST", "/x", ["vec:write"])],
    )
    key = await new_key(local, scopes=["vec:read"])
    response = await _routed(app, key, "POST", "/api/x", root_path="/api")
    assert response.status_code == 403, f"{response.status_code} {response.text}"


async def test_rule_is_enforced_on_the_plain_path(local: Keystile) -> None:
    """Control for the three tests above: the same rule refuses the ordinary request."""
    app, _ = make_app(
        local,
        routes=[Route("/x", inside, methods=["POST"])],
        rules=[Rule("POST", "/x", ["vec:write"])],
    )
    key = await new_key(local, scopes=["vec:read"])
    response = await _routed(app, key, "POST", "/x")
    assert_refused(
        response, 403, "insufficient_scope", challenge("insufficient_scope", "vec:write")
    )


# -- issue #18 item 1: a method's spelling does not skip its rule ---------------------------

# One scope per method, each rule's method spelled differently.
SPELLED_RULES = [
    Rule("GET", "/items/{name}", ["vec:read"]),
    Rule("post", "/items/{name}", ["vec:write"]),
    Rule("Put", "/items/{name}", ["kev:write"]),
    Rule(["pAtCh"], "/items/{name}", ["files:write"]),
    Rule("DELETE", "/items/{name}", ["vec:delete"]),
    Rule("options", "/items/{name}", ["data:read"]),
]
ALL_RULE_SCOPES = ["vec:read", "vec:write", "kev:write", "files:write", "vec:delete", "data:read"]


class MethodBlindApp:
    """An ASGI app that serves any spelling of a method as the method, as WSGI bridges
    (a2wsgi) and Starlette's HTTPEndpoint up to 1.0.1 do."""

    def __init__(self) -> None:
        self.served: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.served.append(scope["method"].upper())
        await PlainTextResponse(f"served {scope['method'].upper()}")(scope, receive, send)


@pytest.mark.parametrize(
    ("method", "scope"),
    [
        pytest.param("get", "vec:read", id="get"),
        pytest.param("Get", "vec:read", id="Get"),
        pytest.param("gEt", "vec:read", id="gEt"),
        pytest.param("head", "vec:read", id="head-as-get"),
        pytest.param("Head", "vec:read", id="Head-as-get"),
        pytest.param("post", "vec:write", id="post"),
        pytest.param("POST", "vec:write", id="POST-rule-spelled-post"),
        pytest.param("put", "kev:write", id="put"),
        pytest.param("PUT", "kev:write", id="PUT-rule-spelled-Put"),
        pytest.param("patch", "files:write", id="patch"),
        pytest.param("PATCH", "files:write", id="PATCH-rule-spelled-pAtCh"),
        pytest.param("delete", "vec:delete", id="delete"),
        pytest.param("Delete", "vec:delete", id="Delete"),
        pytest.param("options", "data:read", id="options"),
        pytest.param("OPTIONS", "data:read", id="OPTIONS-rule-spelled-options"),
    ],
)
async def test_item1_method_case_does_not_bypass_the_rule(
    local: Keystile, method: str, scope: str
) -> None:
    """A method that differs from a rule's only in case is held to that rule: without the
    rule's scope it is 403 insufficient_scope and never reaches the app (even with
    deny_unmatched off); with the scope it is served."""
    legacy = MethodBlindApp()
    app, _ = make_app(
        local, routes=[Route("/items/{name}", legacy)], rules=SPELLED_RULES, deny_unmatched=False
    )
    lacking = await new_key(local, scopes=[s for s in ALL_RULE_SCOPES if s != scope])
    holding = await new_key(local, scopes=[scope])
    refused = await call(app, authorization(lacking), method=method, path="/items/docs")
    assert_refused(refused, 403, "insufficient_scope", challenge("insufficient_scope", scope))
    assert legacy.served == []
    granted = await call(app, authorization(holding), method=method, path="/items/docs")
    assert granted.status_code == 200
    assert legacy.served == [method.upper()]


@pytest.mark.parametrize("method", ["get", "Get", "head", "post", "Put", "delete", "OPTIONS"])
def test_item1_rule_table_matches_any_case(method: str) -> None:
    """The rule table gives every spelling of a method the rule of its upper-case form."""
    table = RuleTable(SPELLED_RULES)
    expected = "GET" if method.upper() == "HEAD" else method.upper()
    found = table.match(method, "/items/x")
    assert found is not None and expected in found.method_set
    assert found is table.match(method.upper(), "/items/x")
