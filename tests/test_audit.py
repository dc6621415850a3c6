"""The audit trail: every management action and refused attempt, with who, what, when and
from where, through each surface (issue #17, item 4)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from typing import Any

import fakeredis
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from conftest import REDIS_URL, SECRET, require_redis
from keystile import (
    KeyHasher,
    KeyManager,
    KeyNotFound,
    Keystile,
    KeystileMiddleware,
    KeyValidationError,
    ManualClock,
    RedisStore,
    RotationRefused,
    ScopeRefused,
)
from keystile.admin import admin_app
from keystile.audit import Actor, AuditEvent, MemoryAuditTrail, RedisAuditTrail, matcher
from keystile.clock import to_datetime
from usage_app import http


def events_json(events: list[AuditEvent]) -> str:
    return json.dumps([e.model_dump(mode="json") for e in events])


async def test_every_action_and_refusal_is_recorded_through_python(
    manager: KeyManager, clock: ManualClock
) -> None:
    """Create, update (old -> new), rotate, revoke, and four kinds of refusal; newest first,
    by "python", never a secret."""
    created = await manager.create(
        {"name": "search", "type": "prod", "scopes": ["vec:read"], "project": "p1"}
    )
    clock.advance(1)
    await manager.update(created.key.id, {"name": "search v2", "scopes": ["vec:*"]})
    clock.advance(1)
    rotated = await manager.rotate(created.key.id, grace=0)
    clock.advance(1)
    await manager.revoke(rotated.key.id)
    narrow = await manager.create({"name": "narrow", "type": "dev", "scopes": ["kev:read"]})
    with pytest.raises(ScopeRefused):
        await manager.create({"name": "x", "type": "dev", "scopes": ["*"]}, actor=narrow.key)
    with pytest.raises(KeyValidationError):
        await manager.create({"name": "x", "type": "client", "scopes": ["vec:read"]})
    with pytest.raises(KeyNotFound):
        await manager.revoke("key_doesnotexist0000")
    with pytest.raises(RotationRefused):
        await manager.rotate(rotated.key.id)

    page = await manager.history()
    actions = [(e.action, e.outcome) for e in page.events]
    assert actions == [
        ("rotate", "refused"),
        ("revoke", "refused"),
        ("create", "refused"),
        ("create", "refused"),
        ("create", "ok"),
        ("revoke", "ok"),
        ("rotate", "ok"),
        ("update", "ok"),
        ("create", "ok"),
    ]
    rotate_refused, not_found, invalid, beyond, _, revoke, rotate, update, create = page.events
    assert create.key_id == created.key.id and create.project == "p1"
    assert create.changes["scopes"] == [None, ["vec:read"]]
    assert update.changes == {
        "name": ["search", "search v2"],
        "scopes": [["vec:read"], ["vec:*"]],
    }
    assert rotate.changes["replaced_by"] == [None, rotated.key.id]
    assert revoke.key_id == rotated.key.id and "revoked_at" in revoke.changes
    assert beyond.actor == Actor.of_key(narrow.key) and "lacks *" in (beyond.reason or "")
    assert invalid.actor.kind == "python" and "allowed_origins" in (invalid.reason or "")
    assert not_found.key_id == "key_doesnotexist0000"
    assert "rotated" in (rotate_refused.reason or "")
    assert [e.at for e in page.events] == sorted((e.at for e in page.events), reverse=True)
    text = events_json(page.events)
    for secret in (created.secret, rotated.secret, narrow.secret):
        assert secret.get_secret_value() not in text
    # Filters and pages.
    about = await manager.history(key_id=created.key.id)
    assert [e.action for e in about.events] == ["rotate", "update", "create"]
    refused = await manager.history(outcome="refused", limit=2)
    assert len(refused.events) == 2 and refused.next is not None
    rest = await manager.history(outcome="refused", limit=2, cursor=refused.next)
    assert [e.action for e in rest.events] == ["create", "create"]
    by_key = await manager.history(actor=narrow.key.id)
    assert [e.outcome for e in by_key.events] == ["refused"]


async def test_a_pasted_secret_never_reaches_the_trail(manager: KeyManager) -> None:
    created = await manager.create({"name": "a", "type": "dev"})
    token = created.secret.get_secret_value()
    with pytest.raises(KeyNotFound):
        await manager.revoke(token)  # a secret where an id belongs
    [event, _] = (await manager.history()).events
    assert event.outcome == "refused" and event.key_id == "(not a key id)"
    assert token not in events_json([event])


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"action": "delete"}, "action"),
        ({"outcome": "maybe"}, "outcome"),
        ({"limit": 0}, "limit"),
        ({"cursor": "x;drop"}, "cursor"),
    ],
)
async def test_bad_filters_name_their_field(
    manager: KeyManager, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(KeyValidationError) as caught:
        await manager.history(**options)
    assert [e.field for e in caught.value.errors] == [field]


async def test_the_rest_api_records_the_calling_key_and_its_address() -> None:
    gate = Keystile(secret=SECRET)
    app = Starlette(routes=[Mount("/keys", app=admin_app(gate))])
    app.add_middleware(KeystileMiddleware, gate=gate)
    admin = await gate.manager.create(
        {"name": "admin", "type": "prod", "scopes": ["admin:manage_keys", "admin:view_usage"]}
    )
    manage_only = await gate.manager.create(
        {"name": "m", "type": "prod", "scopes": ["admin:manage_keys"]}
    )
    headers = {"Authorization": f"Bearer {admin.secret.get_secret_value()}"}
    async with http(app, ip="203.0.113.9") as client:
        made = await client.post("/keys/", json={"name": "w", "type": "dev"}, headers=headers)
        assert made.status_code == 201
        key_id = made.json()["key"]["id"]
        assert (
            await client.patch(f"/keys/{key_id}", json={"name": "w2"}, headers=headers)
        ).status_code == 200
        assert (await client.post(f"/keys/{key_id}/rotate", headers=headers)).status_code == 201
        assert (await client.post(f"/keys/{key_id}/revoke", headers=headers)).status_code == 200
        refused = await client.post(
            "/keys/", json={"name": "w", "type": "dev", "scopes": ["*"]}, headers=headers
        )
        assert refused.status_code == 403
        trail = await client.get("/keys/audit", headers=headers)
        other = {"Authorization": f"Bearer {manage_only.secret.get_secret_value()}"}
        forbidden = await client.get("/keys/audit", headers=other)
        filtered = await client.get(
            "/keys/audit", params={"key_id": key_id, "action": "update"}, headers=headers
        )
        bad = await client.get("/keys/audit", params={"action": "nope"}, headers=headers)
    assert trail.status_code == 200
    events = trail.json()["events"]
    assert [(e["action"], e["outcome"]) for e in events[:5]] == [
        ("create", "refused"),
        ("revoke", "ok"),
        ("rotate", "ok"),
        ("update", "ok"),
        ("create", "ok"),
    ]
    for event in events[:5]:
        assert event["actor"] == {
            "kind": "key",
            "key_id": admin.key.id,
            "hint": admin.key.hint,
            "user": None,
            "host": None,
            "address": "203.0.113.9",
        }
    assert events[3]["changes"] == {"name": ["w", "w2"]}
    assert forbidden.status_code == 403
    assert [e["action"] for e in filtered.json()["events"]] == ["update"]
    assert bad.status_code == 422 and bad.json()["error"]["fields"][0]["field"] == "action"
    assert admin.secret.get_secret_value() not in trail.text
    await gate.aclose()


def test_the_command_line_records_its_user_and_host_and_reads_the_trail(
    redis_namespace: str,
) -> None:
    require_redis()
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    env |= {"KEYSTILE_SECRET": SECRET, "KEYSTILE_NAMESPACE": redis_namespace}

    def keystile(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "keystile.cli", *argv, "--redis", REDIS_URL],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
        )

    made = keystile("keys", "create", "--name", "ops", "--type", "dev", "--json")
    assert made.returncode == 0, made.stderr
    key_id = json.loads(made.stdout)["key"]["id"]
    assert keystile("keys", "revoke", key_id).returncode == 0
    listed = keystile("audit", "--json")
    assert listed.returncode == 0, listed.stderr
    events = json.loads(listed.stdout)["events"]
    assert [(e["action"], e["key_id"]) for e in events] == [
        ("revoke", key_id),
        ("create", key_id),
    ]
    actor = events[0]["actor"]
    assert actor["kind"] == "command line" and actor["host"] and actor["user"]
    table = keystile("audit", "--action", "revoke")
    assert table.returncode == 0 and f"revoke {key_id}" in table.stdout
    assert "(command line)" in table.stdout
    wrong = keystile("audit", "--cursor", "nope")
    assert wrong.returncode == 2 and "cursor" in wrong.stderr


@pytest.mark.parametrize("kind", ["memory", "fakeredis", "redis"])
async def test_the_trail_is_bounded_and_keeps_its_retention(
    kind: str, redis_namespace: str
) -> None:
    """At most ``max_events``, none older than ``retention`` (judged on the real clock
    here: a stream's entry ids are the Redis server's time)."""
    trail: Any
    client: Any = None
    if kind == "memory":
        trail = MemoryAuditTrail(retention=1, max_events=100)
    else:
        if kind == "redis":
            require_redis()
        client = (
            fakeredis.FakeAsyncRedis()
            if kind == "fakeredis"
            else RedisStore.from_url(REDIS_URL, namespace=redis_namespace).client
        )
        trail = RedisAuditTrail(client, namespace=redis_namespace, retention=1, max_events=100)

    def event(n: int) -> AuditEvent:
        at = to_datetime(time.time())
        return AuditEvent(
            at=at, action="revoke", outcome="ok", actor=Actor.python(), key_id=f"k{n}"
        )

    for n in range(300):
        await trail.append(event(n))
    page = await trail.read(matcher(), limit=1000)
    assert len(page.events) == 100
    assert [e.key_id for e in page.events[:2]] == ["k299", "k298"]
    if client is not None:
        assert await client.xlen(trail.name) == 100
        assert 0 < await client.ttl(trail.name) <= 1  # the stream ends with its retention
    await asyncio.sleep(1.1)  # everything is now past the retention
    await trail.append(event(300))
    page = await trail.read(matcher(), limit=1000)
    assert [e.key_id for e in page.events] == ["k300"]
    if client is not None:
        await client.aclose()


async def test_a_manager_without_a_gate_records_on_the_store_it_manages(
    redis_namespace: str,
) -> None:
    """Two managers on one Redis (say, the command line and an app) share one trail."""
    require_redis()
    stores = [RedisStore.from_url(REDIS_URL, namespace=redis_namespace) for _ in range(2)]
    one, two = (KeyManager(s, KeyHasher(SECRET)) for s in stores)
    created = await one.create({"name": "a", "type": "dev"})
    await two.revoke(created.key.id, by=Actor.command_line())
    events = (await one.history()).events
    assert [(e.action, e.actor.kind) for e in events] == [
        ("revoke", "command line"),
        ("create", "python"),
    ]
    for store in stores:
        await store.close()
