"""An app's own scopes, and the mistakes caught when it starts (issue #20, items 1 and 2)."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import pytest
from fastapi import FastAPI, Security
from starlette.applications import Starlette
from starlette.endpoints import HTTPEndpoint
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.websockets import WebSocket

from conftest import REDIS_URL, SECRET, require_redis
from keystile import (
    ApiKey,
    ConfigurationError,
    KeyHasher,
    KeyManager,
    KeyPolicy,
    Keystile,
    KeystileMiddleware,
    KeyType,
    KeyValidationError,
    RedisStore,
    Rule,
    ScopeCatalogue,
    scopes_required,
)
from keystile.checks import route_problems
from keystile.config import load_config
from keystile.fastapi import api_key, require, validation_errors
from keystile.scopes import ADMIN_SCOPES, DEFAULT_CATALOGUE
from usage_app import http, lifespan

ORDERS = ScopeCatalogue({"orders": ["read", "write"]})


def orders_gate() -> Keystile:
    return Keystile(secret=SECRET, policy=KeyPolicy(catalogue=ORDERS))


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


async def start_up(app: Any, answered: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Send ``app`` the lifespan start-up and shut it down again; what it answered."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answered = [] if answered is None else answered

    async def send(message: dict[str, Any]) -> None:
        answered.append(message)
        if message["type"] == "lifespan.startup.complete":
            await inbox.put({"type": "lifespan.shutdown"})

    await inbox.put({"type": "lifespan.startup"})
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    await asyncio.wait_for(app(scope, inbox.get, send), 10)
    return answered


async def refused_start(app: Any) -> str:
    """Start-up fails with ConfigurationError, told to the server once, with the message
    (not a traceback), as the lifespan protocol says; the message."""
    told: list[dict[str, Any]] = []
    with pytest.raises(ConfigurationError) as caught:
        told = await start_up(app, told)
    message = str(caught.value)
    assert told == [{"type": "lifespan.startup.failed", "message": message}]
    return message


# -- your own catalogue ------------------------------------------------------------------------


def test_an_apps_own_catalogue_keeps_the_admin_scopes() -> None:
    assert set(ORDERS.services) == {"orders", "admin"}
    assert ORDERS.all_scopes == {"orders:read", "orders:write"} | ADMIN_SCOPES
    # The demo platform's catalogue stays the default.
    assert "vec:read" in DEFAULT_CATALOGUE.all_scopes and "vec:read" not in ORDERS.all_scopes


async def test_a_key_for_an_apps_own_scope_is_issued_and_admitted() -> None:
    gate = orders_gate()
    app = FastAPI()
    app.add_middleware(KeystileMiddleware, gate=gate)

    @app.get("/orders")
    async def list_orders(
        key: Annotated[ApiKey, Security(api_key, scopes=["orders:read"])],
    ) -> dict[str, Any]:
        return {"caller": key.name}

    reader = await gate.manager.create(
        {"name": "reader", "type": "prod", "scopes": ["orders:read"]}
    )
    admin = await gate.manager.create(
        {"name": "admin", "type": "prod", "scopes": ["admin:manage_keys"]}
    )
    with pytest.raises(KeyValidationError, match="unknown service 'vec'"):
        await gate.manager.create({"name": "x", "type": "prod", "scopes": ["vec:read"]})
    async with lifespan(app), http(app) as client:
        token = reader.secret.get_secret_value()
        answer = await client.get("/orders", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200 and answer.json() == {"caller": "reader"}
        other = admin.secret.get_secret_value()
        answer = await client.get("/orders", headers={"Authorization": f"Bearer {other}"})
        assert answer.status_code == 403
        assert answer.json()["error"]["code"] == "insufficient_scope"


def test_keys_stored_with_scopes_no_longer_in_the_catalogue_are_reported() -> None:
    assert ORDERS.unknown(["orders:read", "vec:read", "orders:*", "*"]) == ["vec:read"]
    # Such a scope grants itself only, never more.
    assert ORDERS.grants(["vec:read"], "vec:read")
    assert not ORDERS.grants(["vec:read"], "orders:read")


@pytest.mark.parametrize(
    "services",
    [{"orders": "read"}, {"orders": []}, {"or ders": ["read"]}, {"orders": ["re:ad"]}, ["orders"]],
)
def test_a_malformed_catalogue_is_refused_with_its_reason(services: Any) -> None:
    with pytest.raises(ValueError, match=r"orders|catalogue"):
        ScopeCatalogue(services)


# -- mistakes caught at start-up ---------------------------------------------------------------


async def reader(key: Annotated[ApiKey, Security(api_key, scopes=["kev:reed"])]) -> ApiKey:
    """A dependency of a route's own: its scopes count as the route's."""
    return key


async def test_a_decorators_typo_stops_start_up_naming_the_route_and_the_closest_scope() -> None:
    @scopes_required("vec:raed")
    async def search(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/health", ok), Route("/cloud/vec/search", search)])
    app.add_middleware(KeystileMiddleware, gate=Keystile())
    message = await refused_start(app)
    assert "route GET /cloud/vec/search" in message
    assert "unknown action 'raed' in scope 'vec:raed'" in message
    assert "did you mean 'vec:read'?" in message


async def test_a_fastapi_security_typo_stops_start_up() -> None:
    app = FastAPI()
    app.add_middleware(KeystileMiddleware, gate=orders_gate())

    @app.post("/orders")
    async def create(
        key: Annotated[ApiKey, Security(api_key, scopes=["orders:wirte"])],
    ) -> dict[str, Any]:
        return {}

    @app.get("/orders/{n}")
    async def show(n: int, key: Annotated[ApiKey, require("nope")]) -> dict[str, Any]:
        return {}

    message = await refused_start(app)
    assert "(2 problems)" in message
    assert "route POST /orders: unknown action 'wirte'" in message
    assert "did you mean 'orders:write'?" in message
    assert "route GET /orders/{n}: 'nope' is not a scope" in message


def test_scopes_deep_in_dependencies_mounts_and_endpoint_classes_are_checked() -> None:
    inner = FastAPI()

    @inner.get("/items")
    async def items(key: Annotated[ApiKey, Security(reader)]) -> dict[str, Any]:
        return {}

    class Things(HTTPEndpoint):
        @scopes_required("files:wrte")
        async def put(self, request: Request) -> Response:
            return JSONResponse({})

    @scopes_required("ai:inferense")
    async def feed(websocket: WebSocket) -> None:
        await websocket.close()

    app = Starlette(
        routes=[
            Mount("/v1", app=inner),
            Route("/things", Things),
            WebSocketRoute("/feed", feed),
        ]
    )
    problems = route_problems(app, DEFAULT_CATALOGUE)
    assert len(problems) == 3, problems
    assert problems[0].startswith("route GET /v1/items: unknown action 'reed'")
    assert "did you mean 'kev:read'?" in problems[0]
    assert problems[1].startswith("route PUT /things: unknown action 'wrte'")
    assert problems[2].startswith("route WEBSOCKET /feed: unknown action 'inferense'")
    assert "did you mean 'ai:inference'?" in problems[2]


async def test_a_rule_with_an_unknown_scope_stops_start_up() -> None:
    app = Starlette(routes=[Route("/orders", ok)])
    rules = [Rule("GET", "/orders", ["orders:read"]), Rule("POST|PUT", "/orders", ["order:write"])]
    app.add_middleware(KeystileMiddleware, gate=orders_gate(), rules=rules)
    message = await refused_start(app)
    assert "rule POST|PUT /orders: unknown service 'order'" in message
    assert "did you mean 'orders:write'?" in message


@pytest.mark.parametrize(
    ("methods", "near"), [("GETT", "'GET'"), ("post|PUTT", "'PUT'"), (["DELETE", "BREW"], None)]
)
def test_a_rule_with_an_unknown_method_is_refused_when_made(
    methods: Any, near: str | None
) -> None:
    with pytest.raises(ValueError, match="unknown HTTP method") as caught:
        Rule(methods, "/x", ["vec:read"])
    message = str(caught.value)
    assert "'/x'" in message
    assert (f"did you mean {near}?" in message) if near else ("did you mean" not in message)


async def test_a_correct_app_starts_and_wildcards_are_valid_scopes() -> None:
    @scopes_required("vec:*")
    async def search(request: Request) -> Response:
        return JSONResponse({})

    app = Starlette(routes=[Route("/s", search), Route("/any", scopes_required("*")(ok))])
    app.add_middleware(
        KeystileMiddleware, gate=Keystile(), rules=[Rule("get", "/s", ["vec:read", "admin:*"])]
    )
    answered = await start_up(app)
    assert [m["type"] for m in answered] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert route_problems(app, DEFAULT_CATALOGUE, [Rule("*", "/s", ["vec:read"])]) == []


def test_uvicorn_refuses_to_start_an_app_with_a_scope_typo(tmp_path: Path) -> None:
    """Under a real server the mistake ends start-up with the message, before any request
    is served."""
    (tmp_path / "typo_app.py").write_text(
        textwrap.dedent(
            """
            from fastapi import FastAPI
            from keystile import Keystile, KeystileMiddleware
            from keystile.fastapi import require

            app = FastAPI()
            app.add_middleware(KeystileMiddleware, gate=Keystile())

            @app.get("/cloud/vec/databases")
            async def databases(key=require("vec:raed")):
                return {}
            """
        )
    )
    ran = subprocess.run(
        # The default lifespan mode ("auto") too: an exception escaping the app's start-up
        # would have it serve on without lifespan.
        [sys.executable, "-m", "uvicorn", "typo_app:app", "--port", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ran.returncode != 0
    assert "route GET /cloud/vec/databases: unknown action 'raed'" in ran.stderr
    assert "did you mean 'vec:read'?" in ran.stderr
    assert "Uvicorn running" not in ran.stderr


# -- one configuration for the app and the command line ----------------------------------------

ORDERS_APP = """
from fastapi import FastAPI, Security
from typing import Annotated

from keystile import ApiKey, KeyPolicy, Keystile, KeystileMiddleware, ScopeCatalogue
from keystile.fastapi import api_key

gate = Keystile(policy=KeyPolicy(catalogue=ScopeCatalogue({"orders": ["read", "write"]})))
app = FastAPI()
app.add_middleware(KeystileMiddleware, gate=gate)


@app.get("/orders")
async def orders(key: Annotated[ApiKey, Security(api_key, scopes=["orders:read"])]) -> dict:
    return {"caller": key.name, "project": key.metadata.get("project")}
"""


def cli(cwd: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The command line, run in ``cwd`` with only the KEYSTILE_ variables given."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    return subprocess.run(
        [sys.executable, "-m", "keystile.cli", *argv],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **env},
    )


def import_app(directory: Path, module: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(directory))
    monkeypatch.delitem(sys.modules, module, raising=False)
    return importlib.import_module(module)


async def test_the_command_line_issues_a_key_for_the_apps_own_scope_with_app(
    tmp_path: Path, redis_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app with its own catalogue (orders:read, orders:write); `keystile keys create
    --app` issues an orders:read key through the app's own gate; the app admits it."""
    require_redis()
    env = {"KEYSTILE_REDIS_URL": REDIS_URL, "KEYSTILE_SECRET": SECRET}
    env["KEYSTILE_NAMESPACE"] = redis_namespace
    (tmp_path / "orders_service.py").write_text(ORDERS_APP)
    made = cli(
        tmp_path,
        *("keys", "create", "--app", "orders_service:app", "--json", "--name", "orders bot"),
        *("--type", "prod", "--scope", "orders:read", "--meta", "project=shop"),
        **env,
    )
    assert made.returncode == 0, made.stderr
    secret = json.loads(made.stdout)["secret"]
    # The default catalogue's scopes are refused: the app's catalogue is in force.
    refused = cli(
        tmp_path,
        *("keys", "create", "--app", "orders_service:gate", "--name", "x", "--type", "prod"),
        *("--scope", "vec:read"),
        **env,
    )
    assert refused.returncode == 2
    assert "unknown service 'vec' in scope 'vec:read' (known: admin, orders)" in refused.stderr

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    module = import_app(tmp_path, "orders_service", monkeypatch)
    try:
        async with lifespan(module.app), http(module.app) as client:
            answer = await client.get("/orders", headers={"Authorization": f"Bearer {secret}"})
        assert answer.status_code == 200
        assert answer.json() == {"caller": "orders bot", "project": "shop"}
    finally:
        await module.gate.aclose()


def test_app_must_name_a_gate_with_a_shared_store(tmp_path: Path) -> None:
    (tmp_path / "memory_service.py").write_text(ORDERS_APP)
    env = {"KEYSTILE_SECRET": SECRET}
    ran = cli(tmp_path, "keys", "list", "--app", "memory_service:app", **env)
    assert ran.returncode == 2 and "keeps its keys in memory" in ran.stderr
    ran = cli(tmp_path, "keys", "list", "--app", "memory_service:FastAPI", **env)
    assert ran.returncode == 2
    assert "neither a Keystile nor an app with KeystileMiddleware" in ran.stderr
    ran = cli(tmp_path, "keys", "list", "--app", "memory_service:nothing", **env)
    assert ran.returncode == 2 and "has no attribute 'nothing'" in ran.stderr
    ran = cli(tmp_path, "keys", "list", "--app", "no_such_module:app", **env)
    assert ran.returncode == 2 and "cannot import 'no_such_module'" in ran.stderr
    assert len(ran.stderr.splitlines()) == 1


PROJECT_TOML = """
[project]
name = "orders-service"

[tool.keystile.scopes]
orders = ["read", "write"]

[tool.keystile.types.client]
rate_limit = "50/minute"
forbidden_scopes = ["admin:*", "orders:write", "*"]
"""


async def test_the_configuration_file_sets_the_apps_scopes_and_key_types(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_namespace: str
) -> None:
    """``[tool.keystile]`` in pyproject.toml gives Keystile() and the command line the same
    catalogue and key-type policy."""
    require_redis()
    (tmp_path / "pyproject.toml").write_text(PROJECT_TOML)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_CONFIG", raising=False)
    gate = Keystile()
    assert set(gate.policy.catalogue.services) == {"orders", "admin"}
    client = gate.policy[KeyType.CLIENT]
    assert client.rate_limit == "50/minute" and client.requires_origins  # the rest kept
    with pytest.raises(KeyValidationError, match="client keys may not hold 'orders:write'"):
        await gate.manager.create(
            {
                "name": "web",
                "type": "client",
                "scopes": ["orders:write"],
                "allowed_origins": ["https://shop.example"],
            }
        )
    env = {"KEYSTILE_SECRET": SECRET, "KEYSTILE_NAMESPACE": redis_namespace}
    made = cli(
        tmp_path,
        *("keys", "create", "--redis", REDIS_URL, "--name", "w", "--type", "prod"),
        *("--scope", "orders:write", "--json"),
        **env,
    )
    assert made.returncode == 0, made.stderr
    refused = cli(
        tmp_path,
        *("keys", "create", "--redis", REDIS_URL, "--name", "w", "--type", "prod"),
        *("--scope", "vec:read"),
        **env,
    )
    assert refused.returncode == 2 and "unknown service 'vec'" in refused.stderr
    # A key stored with a scope the catalogue no longer has is reported, not widened.
    old = KeyManager(RedisStore.from_url(REDIS_URL, namespace=redis_namespace), KeyHasher(SECRET))
    legacy = await old.create({"name": "legacy", "type": "prod", "scopes": ["vec:read"]})
    await old.store.close()
    listed = cli(tmp_path, "keys", "list", "--redis", REDIS_URL, **env)
    assert listed.returncode == 0, listed.stderr
    assert f"note: {legacy.key.id} holds scopes the app's catalogue lacks: vec:read" in (
        listed.stdout
    )
    shown = cli(tmp_path, "keys", "show", legacy.key.id, "--redis", REDIS_URL, **env)
    assert "not in app   vec:read (the catalogue lacks them)" in shown.stdout


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[tool.keystile]\nscope = {}\n", "unknown field 'scope'; did you mean 'scopes'?"),
        (
            "[tool.keystile.types.clinet]\n",
            "types.clinet: a new key type needs its prefix (or did you mean 'client'?)",
        ),
        ("[tool.keystile.types]\nadmin = false\n", "types.admin = false: no such key type"),
        (
            "[tool.keystile.types.partner]\nprefix = 'prod_'\n",
            "key types 'prod' and 'partner' share a prefix ('prod_')",
        ),
        (
            "[tool.keystile.types.client]\nrate_limt = '1/second'\n",
            "types.client: unknown field 'rate_limt'; did you mean 'rate_limit'?",
        ),
        ("[tool.keystile.types.dev]\nrate_limit = 'often'\n", "types.dev.rate_limit"),
        ("[tool.keystile.scopes]\norders = 'read'\n", "must be a list of names"),
        ("[tool.keystile]\napp = 'main'\n", "app must be 'module:attribute'"),
        ("[tool.keystile\n", "cannot be read"),
    ],
)
def test_a_configuration_mistake_is_one_line_naming_the_field(
    tmp_path: Path, text: str, fragment: str
) -> None:
    (tmp_path / "pyproject.toml").write_text(text)
    ran = cli(tmp_path, "keys", "list", "--redis", REDIS_URL, KEYSTILE_SECRET=SECRET)
    assert ran.returncode == 2
    assert fragment in ran.stderr and len(ran.stderr.splitlines()) == 1, ran.stderr
    assert "pyproject.toml" in ran.stderr and "Traceback" not in ran.stderr


def test_keystile_toml_and_the_variable_name_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "other.toml").write_text('default_scopes = true\n[scopes]\nbilling = ["read"]\n')
    found = load_config(tmp_path / "other.toml").policy.catalogue.services
    assert "billing" in found and "vec" in found  # default_scopes: beside the platform's
    monkeypatch.setenv("KEYSTILE_CONFIG", str(tmp_path / "other.toml"))
    assert "vec" in Keystile().policy.catalogue.services
    monkeypatch.delenv("KEYSTILE_CONFIG")
    # keystile.toml in the current directory; a misplaced key is named.
    (tmp_path / "keystile.toml").write_text('[scopes]\nbilling = ["read"]\ndefault_scopes = 1\n')
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=r"the actions of 'default_scopes'"):
        Keystile()
    (tmp_path / "keystile.toml").write_text('[scopes]\nbilling = ["read"]\n')
    assert set(Keystile().policy.catalogue.services) == {"billing", "admin"}


# -- a FastAPI quick start that works when pasted ----------------------------------------------


def quick_start(**options: Any) -> tuple[FastAPI, Keystile]:
    gate = Keystile()
    app = FastAPI()
    app.add_middleware(KeystileMiddleware, gate=gate, **options)

    @app.get("/cloud/vec/databases")
    async def databases(
        key: Annotated[ApiKey, Security(api_key, scopes=["vec:read"])], limit: int = 10
    ) -> dict[str, Any]:
        return {"limit": limit}

    @app.get("/status")
    async def status() -> dict[str, Any]:
        return {}

    return app, gate


@pytest.mark.parametrize("started", [True, False], ids=["after-lifespan", "without-lifespan"])
async def test_the_docs_pages_stay_public_and_document_the_refusals(started: bool) -> None:
    app, gate = quick_start()
    if started:
        await start_up(app)
    async with http(app) as client:
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        assert (await client.get("/redoc")).status_code == 200
        document = await client.get("/openapi.json")
        assert document.status_code == 200
        # Only those pages: the API itself still wants a key.
        refused = await client.get("/cloud/vec/databases")
        assert refused.status_code == 401
        assert (await client.post("/openapi.json")).status_code == 401
        assert (await client.get("/docs/x")).status_code == 401
    schema = document.json()
    answers = schema["paths"]["/cloud/vec/databases"]["get"]["responses"]
    assert {"401", "403", "429"} <= set(answers)
    error = {"$ref": "#/components/schemas/KeystileError"}
    assert answers["429"]["content"]["application/json"]["schema"] == error
    assert {"Retry-After", "RateLimit", "RateLimit-Policy"} <= set(answers["429"]["headers"])
    assert "WWW-Authenticate" in answers["401"]["headers"]
    assert schema["components"]["schemas"]["KeystileError"]["required"] == ["error"]
    # A route that asks for no scope through keystile is left as the app wrote it.
    assert set(schema["paths"]["/status"]["get"]["responses"]) == {"200"}
    await gate.aclose()


async def test_public_docs_can_be_turned_off() -> None:
    app, gate = quick_start(public_docs=False)
    async with http(app) as client:
        assert (await client.get("/docs")).status_code == 401
        assert (await client.get("/openapi.json")).status_code == 401
    await gate.aclose()


async def test_fastapis_validation_errors_can_answer_in_the_librarys_envelope() -> None:
    app, gate = quick_start()
    validation_errors(app)
    created = await gate.manager.create({"name": "r", "type": "dev", "scopes": ["vec:read"]})
    headers = {"Authorization": f"Bearer {created.secret.get_secret_value()}"}
    async with http(app) as client:
        answer = await client.get("/cloud/vec/databases?limit=many", headers=headers)
        assert (await client.get("/cloud/vec/databases?limit=3", headers=headers)).json() == {
            "limit": 3
        }
    assert answer.status_code == 422
    error = answer.json()["error"]
    assert error["code"] == "validation_failed"
    assert error["fields"][0]["field"] == "query.limit"
    assert "integer" in error["fields"][0]["message"]
    assert "detail" not in answer.json()
    await gate.aclose()


async def test_a_starlette_app_has_no_docs_to_open() -> None:
    app = Starlette(routes=[Route("/docs", ok)])
    app.add_middleware(KeystileMiddleware, gate=Keystile())
    async with http(app) as client:
        assert (await client.get("/docs")).status_code == 401


# -- start-up and shutdown never switch lifespan off -------------------------------------------


async def test_an_unexpected_start_up_error_is_logged_and_the_app_starts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug or an odd failure while preparing is logged with its traceback; the server is
    told the app started (else it would serve without lifespan, and lose the last usage)."""
    gate = Keystile()

    async def broken() -> None:
        raise RuntimeError("the limiter's script would not load")

    monkeypatch.setattr(gate, "startup", broken)
    app = Starlette(routes=[Route("/x", ok)])
    app.add_middleware(KeystileMiddleware, gate=gate)
    answered = await start_up(app)
    assert [m["type"] for m in answered] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    logged = [r for r in caplog.records if "preparing at start-up failed" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


async def test_a_failing_shutdown_is_logged_and_the_apps_own_shutdown_goes_on(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = Keystile()
    stopped: list[str] = []

    async def broken() -> None:
        raise RuntimeError("flush failed")

    monkeypatch.setattr(gate, "shutdown", broken)

    @contextlib.asynccontextmanager
    async def own(app: Any) -> AsyncIterator[None]:
        yield
        stopped.append("app")

    app = Starlette(routes=[Route("/x", ok)], lifespan=own)
    app.add_middleware(KeystileMiddleware, gate=gate)
    answered = await start_up(app)
    assert [m["type"] for m in answered][-1] == "lifespan.shutdown.complete"
    assert stopped == ["app"]
    assert any("shutting down failed" in r.getMessage() for r in caplog.records)


def test_keystile_config_is_no_unknown_setting() -> None:
    """KEYSTILE_CONFIG names the configuration file: no warning; a typo of it is one."""
    from keystile.settings import unknown_variables

    found = unknown_variables({"KEYSTILE_CONFIG": "x.toml", "KEYSTILE_CONFIF": "y"})
    assert found == {"KEYSTILE_CONFIF": "KEYSTILE_CONFIG"}
