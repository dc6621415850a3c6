"""The admin REST API (docs/management.md): endpoints, scopes, JSON shapes, errors, on each
backend."""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from conftest import REDIS_URL, SECRET, Figures, budget
from keystile import KeystileMiddleware, ManualClock, RedisStore, Rule
from keystile.admin import AdminAPI, admin_app, admin_routes, admin_rules, fastapi_router
from keystile.clock import to_datetime
from keystile.gate import Keystile
from keystile.stores import KeyStore

# The record's fields, in the documented order (docs/management.md).
RECORD_FIELDS = [
    "id",
    "name",
    "type",
    "hint",
    "scopes",
    "allowed_origins",
    "allowed_ips",
    "rate_limit",
    "address_rate_limit",
    "token_quota",
    "metadata",
    "project",
    "created_at",
    "expires_at",
    "revoked_at",
    "replaces",
    "replaced_by",
    "status",
    "last_used_at",
]
# Both admin scopes, and the scopes the tests' keys are given: a key grants only what it holds.
ADMIN_SCOPES = ["admin:manage_keys", "admin:view_usage", "vec:*", "kev:*"]
NEW_KEY = {"name": "search service", "type": "prod", "scopes": ["vec:read"]}
UNKNOWN = "key_0000000000nothinghere"


async def probe(request: Request) -> JSONResponse:
    return JSONResponse({"key": request.user.identity})


def build_app(gate: Keystile, *, routes: bool = False, **options: Any) -> Starlette:
    """The admin API mounted at /cloud/keys, and a probe route at /x, behind the middleware."""
    admin = (
        Mount("/cloud/keys", routes=admin_routes(gate))
        if routes
        else Mount("/cloud/keys", app=admin_app(gate))
    )
    return Starlette(
        routes=[admin, Route("/x", probe)],
        middleware=[Middleware(KeystileMiddleware, gate=gate, **options)],
    )


@dataclass
class Admin:
    """An HTTP client on the app, and an admin key."""

    http: httpx.AsyncClient
    gate: Keystile
    token: str
    secrets: list[str] = field(default_factory=list)  # every secret the API handed out
    key_id: str = ""  # the admin key's id

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def request(self, method: str, path: str, **options: Any) -> httpx.Response:
        options.setdefault("headers", self.headers)
        response = await self.http.request(method, "/cloud/keys" + path, **options)
        if response.status_code == 201:
            self.secrets.append(response.json()["secret"])
        return response

    async def create(self, **fields: Any) -> dict[str, Any]:
        response = await self.request("POST", "/", json={**NEW_KEY, **fields})
        assert response.status_code == 201, response.text
        body: dict[str, Any] = response.json()
        return body

    async def probe(self, token: str) -> tuple[int, str | None]:
        response = await self.http.get("/x", headers={"Authorization": f"Bearer {token}"})
        code = response.json()["error"]["code"] if response.status_code >= 400 else None
        return response.status_code, code


@pytest.fixture
async def gate(store: KeyStore, clock: ManualClock) -> AsyncIterator[Keystile]:
    """A gate on each backend, with the manual clock."""
    made = Keystile(store=store, secret=SECRET, clock=clock)
    assert await made.store.start(timeout=2.0)
    yield made
    await made.aclose()


async def client_for(app: Any, gate: Keystile, scopes: list[str], **settings: Any) -> Admin:
    created = await gate.manager.create(
        {"name": "admin", "type": "prod", "scopes": scopes, **settings}
    )
    transport = httpx.ASGITransport(app=app)
    http = httpx.AsyncClient(transport=transport, base_url="http://test")
    return Admin(http, gate, created.secret.get_secret_value(), key_id=created.key.id)


@pytest.fixture
async def admin(gate: Keystile) -> AsyncIterator[Admin]:
    """The admin API on each backend, with a key holding both admin scopes."""
    made = await client_for(build_app(gate), gate, ADMIN_SCOPES)
    async with made.http:
        yield made


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is the documented error envelope with this status and code."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"}
    error: dict[str, Any] = body["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


def field_names(response: httpx.Response) -> set[str]:
    """The fields a 422 answer names (and the answer is the documented envelope with a list)."""
    error = assert_error(response, 422, "validation_failed")
    assert set(error) == {"code", "message", "fields"}
    assert all(set(f) == {"field", "message"} and f["message"] for f in error["fields"])
    return {f["field"] for f in error["fields"]}


# -- create ----------------------------------------------------------------------------------


async def test_create_answers_201_with_the_record_and_the_secret(
    admin: Admin, clock: ManualClock
) -> None:
    """POST / answers 201 with the record in the documented shape and the secret, which works
    at once; the answer must not be cached."""
    response = await admin.request(
        "POST",
        "/",
        json={**NEW_KEY, "metadata": {"project": "search"}, "expires_at": "2030-01-01T00:00:00Z"},
    )
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert list(body) == ["key", "secret"]
    record = body["key"]
    assert list(record) == RECORD_FIELDS
    assert record["id"].startswith("key_")
    assert record["type"] == "prod"
    assert record["hint"] == f"prod_...{body['secret'][-4:]}"
    assert record["scopes"] == ["vec:read"]
    assert record["metadata"] == {"project": "search"}
    assert record["created_at"] == to_datetime(clock.now).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert record["expires_at"] == "2030-01-01T00:00:00Z"
    for absent in (
        "rate_limit",
        "address_rate_limit",
        "token_quota",
        "revoked_at",
        "replaces",
        "replaced_by",
    ):
        assert record[absent] is None
    assert record["allowed_origins"] == [] and record["allowed_ips"] == []
    assert await admin.probe(body["secret"]) == (200, None)


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        pytest.param({"name": "n"}, {"type"}, id="no-type"),
        pytest.param({"type": "prod"}, {"name"}, id="no-name"),
        pytest.param({**NEW_KEY, "type": "admin"}, {"type"}, id="bad-type"),
        pytest.param(
            {**NEW_KEY, "scopes": ["vec:fly", "vec:read", "x"]}, {"scopes[0]", "scopes[2]"}
        ),
        pytest.param(
            {"name": "web", "type": "client", "scopes": ["admin:manage_keys"]},
            {"scopes[0]", "allowed_origins"},
            id="client",
        ),
        pytest.param({**NEW_KEY, "expires_at": "2020-01-01T00:00:00Z"}, {"expires_at"}),
        pytest.param(
            {**NEW_KEY, "expires_at": "9999-12-31T20:00:00-05:00"}, {"expires_at"}, id="past-9999"
        ),
        pytest.param({**NEW_KEY, "allowed_ips": ["10.0.0.0/33"]}, {"allowed_ips[0]"}),
        pytest.param(
            {**NEW_KEY, "token_quota": "lots", "rate_limit": 5}, {"token_quota", "rate_limit"}
        ),
        pytest.param({**NEW_KEY, "secret": "prod_x"}, {"secret"}, id="secret"),
        pytest.param([NEW_KEY], {"body"}, id="array"),
        pytest.param("key", {"body"}, id="string"),
    ],
)
async def test_invalid_create_is_422_naming_each_field(
    admin: Admin, body: Any, fields: set[str]
) -> None:
    """Invalid settings answer 422 validation_failed with one entry per offending field,
    and create nothing."""
    response = await admin.request("POST", "/", json=body)
    assert field_names(response) == fields
    listed = (await admin.request("GET", "/")).json()["keys"]
    assert len(listed) == 1  # the admin key alone


@pytest.mark.parametrize(
    "content",
    [b"{", b"", b"   ", b"\xff\xfe{}", b'{"name": "n",}', b"[" * 50_000],
    ids=["truncated", "empty", "blank", "not-utf8", "trailing-comma", "too-deep"],
)
async def test_malformed_json_is_400(admin: Admin, content: bytes) -> None:
    """A body that is not JSON answers 400 invalid_json, never a 5xx."""
    for method, path in (("POST", "/"), ("PATCH", f"/{UNKNOWN}")):
        response = await admin.request(
            method,
            path,
            content=content,
            headers={**admin.headers, "content-type": "application/json"},
        )
        assert_error(response, 400, "invalid_json")


async def test_a_huge_body_is_413(admin: Admin) -> None:
    """A body over 64 KiB answers 413 too_large."""
    response = await admin.request("POST", "/", content=b" " * (65 * 1024))
    assert_error(response, 413, "too_large")


# -- read ------------------------------------------------------------------------------------


async def test_get_answers_the_record_without_the_secret(admin: Admin) -> None:
    """GET /{id} answers {"key": record}, the same record create answered, and no secret."""
    created = await admin.create()
    response = await admin.request("GET", f"/{created['key']['id']}")
    assert response.status_code == 200
    assert response.json() == {"key": created["key"]}
    assert created["secret"] not in response.text


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/{UNKNOWN}"),
        ("PATCH", f"/{UNKNOWN}"),
        ("POST", f"/{UNKNOWN}/revoke"),
        ("POST", f"/{UNKNOWN}/rotate"),
        ("GET", f"/{UNKNOWN}/usage"),
        ("GET", "/not-even-an-id"),
    ],
)
async def test_unknown_id_is_404(admin: Admin, method: str, path: str) -> None:
    """Every endpoint answers 404 not_found for an id no key has."""
    response = await admin.request(method, path, json={"name": "x"} if method == "PATCH" else None)
    assert_error(response, 404, "not_found")


async def test_unknown_routes_and_methods_answer_in_the_envelope(admin: Admin) -> None:
    """Unknown paths under the mount are 404 and unsupported methods 405, both in JSON."""
    created = await admin.create()
    assert_error(await admin.request("GET", f"/{created['key']['id']}/nothing"), 404, "not_found")
    deleted = await admin.request("DELETE", f"/{created['key']['id']}")
    assert_error(deleted, 405, "method_not_allowed")
    assert "PATCH" in deleted.headers["allow"]


# -- list ------------------------------------------------------------------------------------


async def test_list_filters_by_type_status_and_metadata(admin: Admin, clock: ManualClock) -> None:
    """GET / filters with type, status and meta.<name>, alone and together."""
    dev = await admin.create(type="dev", metadata={"project": "a"})
    prod = await admin.create(type="prod", metadata={"project": "b"})
    revoked = await admin.create(type="prod", metadata={"project": "a"})
    await admin.request("POST", f"/{revoked['key']['id']}/revoke")
    expiring = await admin.create(type="dev", expires_at=to_datetime(clock.now + 5).isoformat())
    clock.advance(10)

    async def ids(query: str) -> set[str]:
        response = await admin.request("GET", f"/?{query}")
        assert response.status_code == 200, response.text
        return {k["id"] for k in response.json()["keys"]}

    assert await ids("type=dev") == {dev["key"]["id"], expiring["key"]["id"]}
    assert await ids("status=revoked") == {revoked["key"]["id"]}
    assert await ids("status=expired") == {expiring["key"]["id"]}
    assert await ids("meta.project=a") == {dev["key"]["id"], revoked["key"]["id"]}
    assert await ids("meta.project=a&status=active") == {dev["key"]["id"]}
    assert await ids("type=prod&status=active&meta.project=b") == {prod["key"]["id"]}


async def test_list_pages_with_an_opaque_cursor(admin: Admin) -> None:
    """GET / pages with limit and the previous answer's next, visiting every key once."""
    for n in range(5):
        await admin.create(name=f"k{n}")
    seen: list[str] = []
    query = "/?limit=2"
    while True:
        response = await admin.request("GET", query)
        body = response.json()
        assert list(body) == ["keys", "next"]
        assert len(body["keys"]) <= 2
        assert all(list(k) == RECORD_FIELDS for k in body["keys"])
        seen += [k["id"] for k in body["keys"]]
        if body["next"] is None:
            break
        query = f"/?limit=2&cursor={body['next']}"
    assert len(seen) == 6 and seen == sorted(set(seen))


@pytest.mark.parametrize(
    ("query", "fields"),
    [
        ("type=admin", {"type"}),
        ("status=gone", {"status"}),
        ("limit=0", {"limit"}),
        ("limit=1001", {"limit"}),
        ("limit=ten", {"limit"}),
        ("limit=-1", {"limit"}),
        ("cursor=abc", {"cursor"}),
        ("project=a", {"project"}),
        ("type=dev&type=prod", {"type"}),
        ("colour=red&limit=x", {"colour", "limit"}),
    ],
)
async def test_invalid_list_parameters_are_422(admin: Admin, query: str, fields: set[str]) -> None:
    """Unknown, repeated or malformed query parameters answer 422 naming each."""
    assert field_names(await admin.request("GET", f"/?{query}")) == fields


# -- update ----------------------------------------------------------------------------------


async def test_patch_updates_and_takes_effect_on_the_next_request(admin: Admin) -> None:
    """PATCH /{id} changes the given fields, answers the record, and the key's new scopes
    apply to the very next request."""
    created = await admin.create(scopes=["vec:read"])
    key_id = created["key"]["id"]
    gated = Starlette(
        routes=[Route("/x", probe)],
        middleware=[
            Middleware(
                KeystileMiddleware, gate=admin.gate, rules=[Rule("GET", "/x", ["vec:read"])]
            )
        ],
    )
    transport = httpx.ASGITransport(app=gated)
    headers = {"Authorization": f"Bearer {created['secret']}"}
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as other:
        assert (await other.get("/x", headers=headers)).status_code == 200
        response = await admin.request(
            "PATCH", f"/{key_id}", json={"scopes": ["kev:read"], "metadata": {"team": "x"}}
        )
        assert response.status_code == 200, response.text
        record = response.json()["key"]
        assert (record["scopes"], record["metadata"]) == (["kev:read"], {"team": "x"})
        assert record["name"] == created["key"]["name"]
        assert created["secret"] not in response.text
        assert (await other.get("/x", headers=headers)).status_code == 403


@pytest.mark.parametrize(
    ("body", "fields"),
    [
        ({"type": "dev"}, {"type"}),
        ({"scopes": ["vec:read", "vec:fly"]}, {"scopes[1]"}),
        ({"name": ""}, {"name"}),
        ({"expires_at": "2020-01-01T00:00:00Z"}, {"expires_at"}),
        ({"expires_at": "tomorrow"}, {"expires_at"}),
        ({"expires_at": "0001-01-01T00:00:00+01:00"}, {"expires_at"}),
        ({"id": "key_x", "hint": "x", "colour": 1}, {"id", "hint", "colour"}),
        ([], {"body"}),
    ],
)
async def test_invalid_patch_is_422_naming_each_field(
    admin: Admin, body: Any, fields: set[str]
) -> None:
    """An invalid update answers 422 with a field-by-field list and changes nothing."""
    created = await admin.create()
    key_id = created["key"]["id"]
    assert field_names(await admin.request("PATCH", f"/{key_id}", json=body)) == fields
    assert (await admin.request("GET", f"/{key_id}")).json()["key"] == created["key"]


# -- revoke and rotate -----------------------------------------------------------------------


async def test_revoke_is_immediate_and_idempotent(admin: Admin, clock: ManualClock) -> None:
    """POST /{id}/revoke answers the revoked record; the key is refused on the next request;
    revoking again changes nothing."""
    created = await admin.create()
    key_id = created["key"]["id"]
    assert await admin.probe(created["secret"]) == (200, None)
    first = await admin.request("POST", f"/{key_id}/revoke")
    assert first.status_code == 200
    assert first.json()["key"]["revoked_at"] == to_datetime(clock.now).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    assert await admin.probe(created["secret"]) == (401, "revoked_api_key")
    clock.advance(5)
    again = await admin.request("POST", f"/{key_id}/revoke")
    assert again.status_code == 200 and again.json() == first.json()


async def test_rotate_answers_the_successor_its_secret_and_the_previous_record(
    admin: Admin, clock: ManualClock
) -> None:
    """POST /{id}/rotate answers 201 with the new record, its secret and the previous record,
    linked to each other; the old key works until the default 24-hour grace ends."""
    created = await admin.create()
    key_id = created["key"]["id"]
    response = await admin.request("POST", f"/{key_id}/rotate")
    assert response.status_code == 201, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert list(body) == ["key", "secret", "previous"]
    new, previous = body["key"], body["previous"]
    assert list(new) == RECORD_FIELDS and list(previous) == RECORD_FIELDS
    assert (previous["replaced_by"], new["replaces"]) == (new["id"], key_id)
    assert new["scopes"] == created["key"]["scopes"] and new["name"] == created["key"]["name"]
    assert body["secret"] != created["secret"]
    assert previous["expires_at"] == to_datetime(clock.now + 86_400).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert await admin.probe(body["secret"]) == (200, None)
    clock.advance(86_400 - 1)
    assert await admin.probe(created["secret"]) == (200, None)
    clock.advance(1)
    assert await admin.probe(created["secret"]) == (401, "expired_api_key")
    assert await admin.probe(body["secret"]) == (200, None)


async def test_rotate_takes_a_grace_in_seconds(admin: Admin, clock: ManualClock) -> None:
    """{"grace_seconds": n} sets the old key's remaining life; 0 ends it at once."""
    first = await admin.create()
    short = await admin.request(
        "POST", f"/{first['key']['id']}/rotate", json={"grace_seconds": 90}
    )
    assert short.json()["previous"]["expires_at"] == to_datetime(clock.now + 90).strftime(
        "%Y-%m-%dT%H:%M:%SZ"
    )
    second = await admin.create()
    await admin.request("POST", f"/{second['key']['id']}/rotate", json={"grace_seconds": 0})
    assert await admin.probe(second["secret"]) == (401, "expired_api_key")


@pytest.mark.parametrize(
    "body",
    [
        {"grace_seconds": -1},
        {"grace_seconds": 1.5},
        {"grace_seconds": "24h"},
        {"grace_seconds": True},
        {"grace_seconds": 10**12},
        {"grace_seconds": 10**400},
        {"grace": 60},
    ],
    ids=["negative", "float", "text", "bool", "huge", "past-any-float", "misnamed"],
)
async def test_invalid_grace_is_422(admin: Admin, body: dict[str, Any]) -> None:
    """A grace that is not a whole number of seconds from 0 to a year answers 422."""
    created = await admin.create()
    response = await admin.request("POST", f"/{created['key']['id']}/rotate", json=body)
    assert field_names(response) == ({"grace"} if "grace" in body else {"grace_seconds"})


async def test_rotating_a_revoked_or_rotated_key_is_409(admin: Admin) -> None:
    """Rotating a revoked key answers 409 key_revoked; rotating a key twice answers 409
    key_already_rotated, naming the successor."""
    revoked = await admin.create()
    await admin.request("POST", f"/{revoked['key']['id']}/revoke")
    assert_error(
        await admin.request("POST", f"/{revoked['key']['id']}/rotate"), 409, "key_revoked"
    )
    rotated = await admin.create()
    successor = (await admin.request("POST", f"/{rotated['key']['id']}/rotate")).json()["key"]
    error = assert_error(
        await admin.request("POST", f"/{rotated['key']['id']}/rotate"), 409, "key_already_rotated"
    )
    assert successor["id"] in error["message"]


async def test_a_key_that_keeps_changing_is_409_conflict(
    admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When other processes keep rewriting a key faster than an update can land, PATCH
    answers 409 conflict (try again), not a 500."""
    created = await admin.create()

    async def always_changed(key: Any, *, expected: Any = None) -> None:
        from keystile import KeyChanged

        raise KeyChanged(f"key {key.id} changed meanwhile")

    monkeypatch.setattr(admin.gate.manager.store, "replace", always_changed)
    response = await admin.request("PATCH", f"/{created['key']['id']}", json={"name": "x"})
    assert "try again" in assert_error(response, 409, "conflict")["message"]


# -- usage -----------------------------------------------------------------------------------


async def test_usage_endpoints_answer_the_reports(admin: Admin) -> None:
    """GET /{id}/usage answers the key's report (totals, series, busiest IPs, last use) and
    GET /usage every key's totals; bad query parameters are a 422."""
    created = await admin.create()
    key_id = created["key"]["id"]
    one = await admin.request("GET", f"/{key_id}/usage")
    days = await admin.request(
        "GET", f"/{key_id}/usage?granularity=day&start=2020-01-01T00:00:00Z"
    )
    everything = await admin.request("GET", "/usage")
    assert one.status_code == days.status_code == everything.status_code == 200
    body = one.json()
    assert body["key_id"] == key_id
    assert {"totals", "all_time", "series", "top_ips", "top_origins", "last_use"} <= set(body)
    assert days.json()["granularity"] == "day"
    assert "keys" in everything.json()
    for query, named in (
        ("granularity=week", "granularity"),
        ("start=yesterday", "start"),
        ("start=2027-01-01T00:00:00", "start"),
        ("start=0001-01-01T00:00:00%2B01:00", "start"),  # year 0 in UTC
        ("end=9999-12-31T23:00:00-05:00", "end"),
        ("start=2999-01-01T00:00:00Z", "end"),  # the end (now) before the start
        ("x=1", "x"),
    ):
        bad = await admin.request("GET", f"/{key_id}/usage?{query}")
        assert bad.status_code == 422 and field_names(bad) == {named}, (query, bad.text)


# -- scopes ----------------------------------------------------------------------------------

ENDPOINTS = [
    ("POST", "/", "admin:manage_keys"),
    ("GET", "/", "admin:manage_keys"),
    ("GET", "/{id}", "admin:manage_keys"),
    ("PATCH", "/{id}", "admin:manage_keys"),
    ("POST", "/{id}/revoke", "admin:manage_keys"),
    ("POST", "/{id}/rotate", "admin:manage_keys"),
    ("GET", "/{id}/usage", "admin:view_usage"),
    ("GET", "/usage", "admin:view_usage"),
    ("GET", "/project", "admin:view_usage"),
    ("PATCH", "/project", "admin:manage_keys"),
    ("GET", "/alert-rules", "admin:view_usage"),
    ("PUT", "/alert-rules", "admin:manage_keys"),
    ("PATCH", "/alert-rules", "admin:manage_keys"),
    ("DELETE", "/alert-rules", "admin:manage_keys"),
    ("GET", "/{id}/alert-rules", "admin:view_usage"),
    ("PUT", "/{id}/alert-rules", "admin:manage_keys"),
    ("PATCH", "/{id}/alert-rules", "admin:manage_keys"),
    ("DELETE", "/{id}/alert-rules", "admin:manage_keys"),
]


def body_for(method: str, path: str) -> dict[str, Any] | None:
    """A valid body for each endpoint that takes one."""
    if path.endswith("alert-rules"):
        return {"cooldown": 60} if method in ("PUT", "PATCH") else None
    if path == "/":
        return NEW_KEY if method == "POST" else None
    return {"name": "x"} if method == "PATCH" else {} if method == "POST" else None


@pytest.mark.parametrize(("method", "path", "scope"), ENDPOINTS)
async def test_each_endpoint_requires_its_scope(
    gate: Keystile, method: str, path: str, scope: str
) -> None:
    """Without a key an endpoint answers 401 missing_api_key; with a key lacking its scope,
    403 insufficient_scope naming that scope — and nothing changes."""
    target = await gate.manager.create(NEW_KEY)
    other = {"admin:manage_keys": "admin:view_usage"}.get(scope, "admin:manage_keys")
    app = build_app(gate)
    admin = await client_for(app, gate, ["vec:*", other])
    async with admin.http:
        url = path.replace("{id}", target.key.id)
        body = body_for(method, path)
        anonymous = await admin.request(method, url, json=body, headers={})
        refused = await admin.request(method, url, json=body)
    assert_error(anonymous, 401, "missing_api_key")
    assert_error(refused, 403, "insufficient_scope")
    assert refused.headers["www-authenticate"].endswith(f'scope="{scope}"')
    assert await gate.manager.get(target.key.id) == target.key
    assert (await gate.manager.key_alert_rules(target.key.id)).overrides == {}
    assert (await gate.manager.alert_rules()).rules == {}
    assert not (await gate.manager.project_info()).recorded


async def test_routes_mounted_without_the_sub_app_work_too(gate: Keystile) -> None:
    """admin_routes() mounted with Mount(routes=...) serves the same endpoints."""
    admin = await client_for(build_app(gate, routes=True), gate, ADMIN_SCOPES)
    async with admin.http:
        created = await admin.create()
        assert (await admin.request("GET", f"/{created['key']['id']}")).status_code == 200


async def test_admin_rules_let_the_api_through_a_deny_unmatched_table(gate: Keystile) -> None:
    """With deny_unmatched, admin_rules() opens the admin API to keys with its scopes and
    refuses the others at the middleware."""
    app = build_app(gate, rules=admin_rules("/cloud/keys"), deny_unmatched=True)
    admin = await client_for(app, gate, ADMIN_SCOPES)
    outsider = await gate.manager.create({"name": "o", "type": "prod", "scopes": ["vec:*"]})
    async with admin.http:
        created = await admin.create()
        for method, path, _ in ENDPOINTS:
            url = path.replace("{id}", created["key"]["id"])
            body = body_for(method, path)
            response = await admin.request(method, url, json=body)
            assert response.status_code in (200, 201, 409), (method, path, response.text)
            refused = await admin.request(
                method,
                url,
                json=body,
                headers={"Authorization": f"Bearer {outsider.secret.get_secret_value()}"},
            )
            assert_error(refused, 403, "insufficient_scope")


# -- secrets ---------------------------------------------------------------------------------


async def test_secrets_appear_only_in_create_and_rotate_answers_and_never_in_logs(
    admin: Admin, caplog: pytest.LogCaptureFixture
) -> None:
    """Across a whole workflow, a secret appears in its create or rotate answer's "secret"
    field and nowhere else: not in other answers, not in records, not in any log line."""
    caplog.set_level(logging.DEBUG)
    answers: list[httpx.Response] = []
    created = await admin.request("POST", "/", json={**NEW_KEY, "metadata": {"project": "p"}})
    key_id = created.json()["key"]["id"]
    rotated = await admin.request("POST", f"/{key_id}/rotate")
    new_id = rotated.json()["key"]["id"]
    answers += [
        await admin.request("GET", "/"),
        await admin.request("GET", f"/{key_id}"),
        await admin.request("GET", f"/{new_id}"),
        await admin.request("PATCH", f"/{new_id}", json={"name": "renamed"}),
        await admin.request("PATCH", f"/{new_id}", json={"secret": "nope"}),
        await admin.request("GET", f"/{new_id}/usage"),
        await admin.request("GET", "/usage"),
        await admin.request("POST", f"/{key_id}/rotate"),  # 409: already rotated
        await admin.request("POST", f"/{new_id}/revoke"),
        await admin.request("POST", f"/{new_id}/rotate"),  # 409: revoked
    ]
    secrets = [created.json()["secret"], rotated.json()["secret"]]
    assert admin.secrets == secrets
    for answer in (created, rotated):
        body = answer.json()
        assert body["secret"] in secrets
        without = {k: v for k, v in body.items() if k != "secret"}
        assert not any(s in json.dumps(without) for s in secrets)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert key_id in logged and new_id in logged
    for secret in secrets:
        for text in [a.text for a in answers] + [logged]:
            assert secret not in text
            assert secret[5:20] not in text


# -- FastAPI ---------------------------------------------------------------------------------


def fastapi_app(gate: Keystile) -> FastAPI:
    app = FastAPI()
    app.add_middleware(KeystileMiddleware, gate=gate)
    app.include_router(fastapi_router(gate), prefix="/cloud/keys")
    app.add_api_route("/x", probe)
    return app


def test_fastapi_router_shows_every_endpoint_and_its_scope_in_openapi(
    gate: Keystile,
) -> None:
    """The OpenAPI document lists each admin endpoint with its scope under the Keystile
    scheme, and the create, update and rotate bodies, with no dangling reference."""
    document = fastapi_app(gate).openapi()
    paths = document["paths"]
    for method, path, scope in ENDPOINTS:
        operation = paths["/cloud/keys" + path.replace("{id}", "{key_id}")][method.lower()]
        assert operation["security"] == [{"Keystile": [scope]}], (method, path)
    create = paths["/cloud/keys/"]["post"]["requestBody"]["content"]["application/json"]
    assert create["schema"]["properties"]["type"]["enum"] == ["dev", "prod", "client"]
    assert set(create["schema"]["required"]) == {"name", "type"}
    update = paths["/cloud/keys/{key_id}"]["patch"]["requestBody"]["content"]["application/json"]
    assert "type" not in update["schema"]["properties"]
    assert "scopes" in update["schema"]["properties"]
    rotate = paths["/cloud/keys/{key_id}/rotate"]["post"]["requestBody"]
    assert rotate["required"] is False
    assert "grace_seconds" in rotate["content"]["application/json"]["schema"]["properties"]
    listing = {p["name"] for p in paths["/cloud/keys/"]["get"]["parameters"]}
    assert {"type", "status", "limit", "cursor"} <= listing
    assert "#/$defs" not in json.dumps(document)
    assert document["components"]["securitySchemes"]["Keystile"]["scheme"] == "bearer"


async def test_fastapi_router_answers_like_the_starlette_routes(gate: Keystile) -> None:
    """Through FastAPI the admin API creates (201), validates (422 with fields), refuses a
    missing scope with the documented 403 and 404s an unknown id, in the same envelopes."""
    app = fastapi_app(gate)
    admin = await client_for(app, gate, ADMIN_SCOPES)
    outsider = await client_for(app, gate, ["admin:view_usage"])
    async with admin.http:
        created = await admin.create()
        assert list(created["key"]) == RECORD_FIELDS
        listed = await admin.request("GET", "/?type=prod&limit=10")
        assert created["key"] in listed.json()["keys"]
        invalid = await admin.request("PATCH", f"/{created['key']['id']}", json={"type": "dev"})
        assert field_names(invalid) == {"type"}
        assert_error(await admin.request("GET", f"/{UNKNOWN}"), 404, "not_found")
        assert_error(
            await admin.request("POST", "/", content=b"{", headers=admin.headers),
            400,
            "invalid_json",
        )
        rotated = await admin.request("POST", f"/{created['key']['id']}/rotate")
        assert rotated.status_code == 201 and "previous" in rotated.json()
        refused = await admin.request("GET", "/", headers=outsider.headers)
        assert_error(refused, 403, "insufficient_scope")
        assert (await admin.request("GET", "/usage", headers=outsider.headers)).status_code == 200
    await outsider.http.aclose()


# -- the bounds of admin:manage_keys (issue #18 item 3) --------------------------------------

DEPUTY = ["admin:manage_keys", "vec:*"]
APPS = {"starlette": build_app, "fastapi": fastapi_app}


@pytest.fixture(params=list(APPS))
def app_kind(request: pytest.FixtureRequest) -> str:
    """The admin API as the Starlette app and as the FastAPI router."""
    kind: str = request.param
    return kind


def assert_scope_refusal(response: httpx.Response, missing: str) -> None:
    """403 insufficient_scope naming ``missing`` in the message and in the RFC 6750
    challenge, with no secret in the answer."""
    error = assert_error(response, 403, "insufficient_scope")
    assert missing in error["message"]
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="api", error="insufficient_scope", scope="{missing}"'
    )
    assert "secret" not in response.json()


async def stored(gate: Keystile) -> dict[str, dict[str, Any]]:
    """Every record in the store, by id, as the API shows them."""
    page = await gate.manager.list(limit=1000)
    return {i.key.id: i.json() for i in await gate.manager.describe(page.keys)}


@pytest.mark.parametrize(
    ("scopes", "missing"),
    [
        (["*"], "*"),
        (["kev:read"], "kev:read"),
        (["vec:read", "admin:view_usage"], "admin:view_usage"),
        (["admin:*"], "admin:*"),
    ],
    ids=["star", "other-service", "other-admin-scope", "admin-wildcard"],
)
async def test_item3_a_manage_keys_key_grants_only_scopes_it_holds(
    gate: Keystile, app_kind: str, scopes: list[str], missing: str
) -> None:
    """A key with admin:manage_keys and vec:* can neither create a key with a scope it
    lacks nor PATCH one onto a key: 403 insufficient_scope naming the scope, and the store
    holds what it held."""
    target = await gate.manager.create(NEW_KEY)
    admin = await client_for(APPS[app_kind](gate), gate, DEPUTY)
    before = await stored(gate)
    async with admin.http:
        created = await admin.request("POST", "/", json={**NEW_KEY, "scopes": scopes})
        patched = await admin.request("PATCH", f"/{target.key.id}", json={"scopes": scopes})
    assert_scope_refusal(created, missing)
    assert_scope_refusal(patched, missing)
    assert await stored(gate) == before


@pytest.mark.parametrize(
    "scopes",
    [["vec:read"], ["vec:read", "vec:delete"], ["vec:*"], ["admin:manage_keys", "vec:write"]],
    ids=["one", "two", "wildcard", "its-own-admin-scope"],
)
async def test_item3_held_wildcards_cover_the_scopes_granted(
    gate: Keystile, app_kind: str, scopes: list[str]
) -> None:
    """A key holding vec:* may grant vec:read, vec:* and scopes it holds itself, and PATCH
    and rotate keys within them."""
    admin = await client_for(APPS[app_kind](gate), gate, DEPUTY)
    async with admin.http:
        created = await admin.create(scopes=scopes)
        key_id = created["key"]["id"]
        patched = await admin.request("PATCH", f"/{key_id}", json={"scopes": ["vec:*"]})
        rotated = await admin.request("POST", f"/{key_id}/rotate")
    assert created["key"]["scopes"] == scopes
    assert patched.status_code == 200 and patched.json()["key"]["scopes"] == ["vec:*"]
    assert rotated.status_code == 201 and rotated.json()["key"]["scopes"] == ["vec:*"]


@pytest.mark.parametrize(
    ("held", "missing"),
    [
        (["*"], "*"),
        (["vec:read", "kev:read"], "kev:read"),
        (["admin:view_usage"], "admin:view_usage"),
    ],
    ids=["star", "one-more", "other-admin-scope"],
)
async def test_item3_a_manage_keys_key_cannot_take_over_a_key_holding_more(
    gate: Keystile, app_kind: str, held: list[str], missing: str
) -> None:
    """A key with admin:manage_keys may not PATCH (not even rename or narrow) nor rotate a
    key holding a scope it lacks — a rotation would hand it the successor's secret: 403
    naming the scope, no secret, no successor, and the victim's key still works."""
    victim = await gate.manager.create({"name": "root", "type": "prod", "scopes": held})
    admin = await client_for(APPS[app_kind](gate), gate, DEPUTY)
    before = await stored(gate)
    url = f"/{victim.key.id}"
    async with admin.http:
        answers = [
            await admin.request("PATCH", url, json={"name": "mine"}),
            await admin.request("PATCH", url, json={"allowed_ips": ["203.0.113.0/24"]}),
            await admin.request("PATCH", url, json={"scopes": ["vec:read"]}),
            await admin.request("PATCH", url, json={"expires_at": "2027-01-16T00:00:00Z"}),
            await admin.request("POST", f"{url}/rotate", json={"grace_seconds": 31_536_000}),
            await admin.request("POST", f"{url}/rotate", json={"grace_seconds": 0}),
        ]
        probe = await admin.probe(victim.secret.get_secret_value())
    for answer in answers:
        assert_scope_refusal(answer, missing)
    assert admin.secrets == []
    assert await stored(gate) == before
    assert probe == (200, None)


@pytest.mark.parametrize(
    "changes",
    [
        {"scopes": ["admin:manage_keys", "vec:*", "kev:*"]},
        {"scopes": ["admin:manage_keys"]},
        {"allowed_ips": []},
        {"allowed_ips": ["0.0.0.0/0"]},
        {"allowed_origins": ["https://elsewhere.example"]},
        {"expires_at": None},
        {"expires_at": "2030-01-01T00:00:00Z"},
        {"name": "renamed", "expires_at": "2027-01-20T00:00:00Z"},
    ],
    ids=[
        "widen-scopes",
        "narrow-scopes",
        "lift-ips",
        "open-ips",
        "add-origin",
        "no-expiry",
        "later-expiry",
        "earlier-expiry-and-rename",
    ],
)
async def test_item3_a_manage_keys_key_cannot_change_its_own_bounds(
    gate: Keystile, app_kind: str, changes: dict[str, Any]
) -> None:
    """A key without * cannot PATCH its own scopes, IP or origin allowlists or expiry: 403
    naming the scope it lacks (* for changes to itself), and its record unchanged."""
    admin = await client_for(
        APPS[app_kind](gate),
        gate,
        DEPUTY,
        allowed_ips=["127.0.0.0/8"],  # the test client's address
        expires_at="2027-03-01T00:00:00Z",
    )
    before = await stored(gate)
    async with admin.http:
        response = await admin.request("PATCH", f"/{admin.key_id}", json=changes)
        renamed = await admin.request("PATCH", f"/{admin.key_id}", json={"name": "me"})
    wanted = set(changes.get("scopes", [])) - {"admin:manage_keys", "vec:*"}
    assert_scope_refusal(response, " ".join(sorted(wanted)) or "*")
    assert await stored(gate) == {
        **before,
        admin.key_id: {**before[admin.key_id], "name": "me"},
    }
    assert renamed.status_code == 200


async def test_item3_a_star_key_keeps_full_power(gate: Keystile, app_kind: str) -> None:
    """A * key creates * keys, rotates other * keys (receiving their successor's secret)
    and changes its own scopes, allowlists and expiry."""
    admin = await client_for(APPS[app_kind](gate), gate, ["*"])
    async with admin.http:
        created = await admin.create(scopes=["*"])
        rotated = await admin.request(
            "POST", f"/{created['key']['id']}/rotate", json={"grace_seconds": 31_536_000}
        )
        own = await admin.request(
            "PATCH",
            f"/{admin.key_id}",
            json={
                "scopes": ["*", "vec:read"],
                "allowed_ips": ["127.0.0.0/8"],
                "expires_at": "2030-01-01T00:00:00Z",
            },
        )
    assert rotated.status_code == 201 and rotated.json()["key"]["scopes"] == ["*"]
    assert own.status_code == 200, own.text
    assert own.json()["key"]["allowed_ips"] == ["127.0.0.0/8"]


async def test_item3_the_handlers_refuse_a_request_without_a_key(gate: Keystile) -> None:
    """The handlers of AdminAPI, used without the scope checks and the middleware, refuse
    to create, update or rotate rather than act unbounded."""
    api = AdminAPI(gate.manager)
    target = await gate.manager.create(NEW_KEY)
    app = Starlette(
        routes=[
            Route("/", api.create, methods=["POST"]),
            Route("/{key_id}", api.update, methods=["PATCH"]),
            Route("/{key_id}/rotate", api.rotate, methods=["POST"]),
        ]
    )
    before = await stored(gate)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        answers = [
            await http.post("/", json={**NEW_KEY, "scopes": ["*"]}),
            await http.patch(f"/{target.key.id}", json={"scopes": ["*"]}),
            await http.post(f"/{target.key.id}/rotate"),
        ]
    for answer in answers:
        assert_error(answer, 401, "missing_api_key")
    assert await stored(gate) == before


# -- a rotated-out key stays out (issue #18 item 8) ------------------------------------------


@pytest.mark.parametrize(
    ("grace", "expires_at"),
    [
        (0, None),
        (0, "2030-01-01T00:00:00Z"),
        (3600, None),
        (3600, "2027-01-15T09:00:01Z"),
    ],
    ids=["no-grace-no-expiry", "no-grace-later", "grace-no-expiry", "grace-a-second-later"],
)
async def test_item8_a_rotated_out_key_cannot_be_revived(
    admin: Admin, clock: ManualClock, grace: int, expires_at: str | None
) -> None:
    """PATCHing a rotated key's expiry away or later is 422 naming expires_at; the record is
    unchanged and the old secret is refused once the grace ends."""
    created = await admin.create()
    key_id = created["key"]["id"]
    rotated = await admin.request("POST", f"/{key_id}/rotate", json={"grace_seconds": grace})
    previous = rotated.json()["previous"]
    assert previous["expires_at"] == to_datetime(clock.now + grace).strftime("%Y-%m-%dT%H:%M:%SZ")
    response = await admin.request("PATCH", f"/{key_id}", json={"expires_at": expires_at})
    assert field_names(response) == {"expires_at"}
    assert rotated.json()["key"]["id"] in response.json()["error"]["message"]
    assert (await stored(admin.gate))[key_id] == previous
    clock.advance(grace)
    assert await admin.probe(created["secret"]) == (401, "expired_api_key")


@pytest.mark.parametrize(
    "changes",
    [{"revoked_at": None}, {"expires_at": None}, {"expires_at": None, "revoked_at": None}],
    ids=["unrevoke", "no-expiry", "both"],
)
async def test_item8_a_revocation_stays_final(admin: Admin, changes: dict[str, Any]) -> None:
    """No PATCH brings a revoked key back: its secret is refused as revoked afterwards."""
    created = await admin.create(expires_at="2027-06-01T00:00:00Z")
    key_id = created["key"]["id"]
    await admin.request("POST", f"/{key_id}/revoke")
    response = await admin.request("PATCH", f"/{key_id}", json=changes)
    assert response.status_code in (200, 422), response.text
    assert (await stored(admin.gate))[key_id]["revoked_at"] is not None
    assert await admin.probe(created["secret"]) == (401, "revoked_api_key")


# -- across processes ------------------------------------------------------------------------

TRIALS = 20


@pytest.mark.timing
async def test_a_key_revoked_through_the_api_is_refused_by_another_process_within_100_ms(
    redis_namespace: str, figures: Figures
) -> None:
    """Over 20 trials, an app in another process that had just admitted a key refuses it
    within 100 ms of the REST revocation being answered."""
    peer = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("admin_peer.py")),
            REDIS_URL,
            redis_namespace,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "KEYSTILE_SECRET": SECRET},
    )
    assert peer.stdin is not None and peer.stdout is not None
    gate = Keystile(store=RedisStore.from_url(REDIS_URL, namespace=redis_namespace), secret=SECRET)
    admin = await client_for(build_app(gate), gate, ADMIN_SCOPES)
    delays = []
    try:
        assert peer.stdout.readline().strip() == "ready"
        for _ in range(TRIALS):
            created = await admin.create()
            peer.stdin.write(f"watch {created['secret']}\n")
            peer.stdin.flush()
            assert peer.stdout.readline().strip() == "watching"
            response = await admin.request("POST", f"/{created['key']['id']}/revoke")
            answered = time.monotonic()
            assert response.status_code == 200
            word, code, seen = peer.stdout.readline().split()
            assert (word, code) == ("refused", "revoked_api_key")
            delays.append(max(0.0, float(seen) - answered))
    finally:
        peer.stdin.close()
        peer.wait(timeout=10)
        peer.stdout.close()
        await admin.http.aclose()
        await gate.aclose()
    median, worst = statistics.median(delays), max(delays)
    figures.add(
        f"REST revocation seen by another app process over {TRIALS} trials: "
        f"median {median * 1000:.2f} ms, max {worst * 1000:.2f} ms"
    )
    assert worst < budget(0.100), f"max delay {worst * 1000:.1f} ms"
