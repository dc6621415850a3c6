"""Alert rules you can set: per project, with per-key overrides, through Python, REST and the
command line, kept in the store; the alerter judges each key by its own (issue #16, item 2)."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette

from conftest import BACKENDS, SECRET
from keystile import KeyNotFound, KeystileMiddleware, KeyValidationError, ManualClock, RedisStore
from keystile.admin import admin_mount
from keystile.alerts import AlertRules
from keystile.cli import build_parser, execute
from keystile.gate import Keystile
from keystile.manager import KeyManager
from keystile.projects import MAX_KEY_OVERRIDES, RuleBook
from keystile.stores import KeyStore
from test_alerts import Rig
from usage_app import http

REDIS_BACKENDS = [kind for kind in BACKENDS if kind != "memory"]

ADMIN = ["admin:manage_keys", "admin:view_usage"]
MISSING = "key_0VgmOZcuNoSuchKey12"


class World:
    """A gate on one backend with the admin API at /keys, and per project (alpha, beta)
    an admin key's headers and a worker key's id."""

    def __init__(self, gate: Keystile) -> None:
        self.gate = gate
        self.manager: KeyManager = gate.manager
        self.app = Starlette(routes=[admin_mount(gate, "/keys")])
        self.app.add_middleware(KeystileMiddleware, gate=gate)
        self.admin: dict[str, dict[str, str]] = {}
        self.worker: dict[str, str] = {}

    async def populate(self) -> World:
        for project in ("alpha", "beta"):
            admin = await self.manager.create(
                {"name": "admin", "type": "prod", "scopes": ADMIN, "project": project}
            )
            worker = await self.manager.create(
                {"name": "worker", "type": "dev", "scopes": ["vec:read"], "project": project}
            )
            token = admin.secret.get_secret_value()
            self.admin[project] = {"Authorization": f"Bearer {token}"}
            self.worker[project] = worker.key.id
        return self

    async def cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await execute(build_parser().parse_args(list(argv)), self.manager, out, err)
        return code, out.getvalue(), err.getvalue()


@pytest.fixture
async def world(store: KeyStore, clock: ManualClock) -> AsyncIterator[World]:
    gate = Keystile(store=store, secret=SECRET, clock=clock)
    yield await World(gate).populate()
    await gate.shutdown()


async def test_rules_set_through_each_surface_read_through_the_others(world: World) -> None:
    """Rules set in Python are what REST and the command line show, and the other way
    round, for a project's rules and for a key's overrides; stored in the store."""
    manager, worker = world.manager, world.worker["alpha"]
    await manager.set_alert_rules(requests_per_minute=5, project="alpha")
    async with http(world.app) as client:
        got = (await client.get("/keys/alert-rules", headers=world.admin["alpha"])).json()
        assert got["alert_rules"]["rules"] == {"requests_per_minute": 5}
        assert got["alert_rules"]["effective"]["requests_per_minute"] == 5
        assert got["alert_rules"]["default"]["requests_per_minute"] is None
        code, out, _ = await world.cli("alerts", "rules", "show", "--project", "alpha", "--json")
        assert code == 0
        assert json.loads(out)["alert_rules"]["rules"] == {"requests_per_minute": 5}

        put = await client.put(
            f"/keys/{worker}/alert-rules",
            json={"error_rate": 0.1, "cooldown": 60},
            headers=world.admin["alpha"],
        )
        assert put.status_code == 200
        mine = await manager.key_alert_rules(worker)
        assert mine.overrides == {"error_rate": 0.1, "cooldown": 60.0}
        assert mine.effective.requests_per_minute == 5  # from the project
        assert mine.effective.error_rate == 0.1

        code, _, err = await world.cli(
            "alerts", "rules", "set", "--key", worker, "error_rate=off", "rotation_due=off"
        )
        assert (code, err) == (0, "")
        got = (
            await client.get(f"/keys/{worker}/alert-rules", headers=world.admin["alpha"])
        ).json()["alert_rules"]
        assert got["overrides"] == {"error_rate": None, "cooldown": 60.0, "rotation_due": False}
        assert got["effective"]["error_rate"] is None

        patch = await client.patch(
            "/keys/alert-rules", json={"error_min_requests": 50}, headers=world.admin["alpha"]
        )
        assert patch.json()["alert_rules"]["rules"] == {
            "requests_per_minute": 5,
            "error_min_requests": 50,
        }
        assert patch.json()["alert_rules"]["overridden"] == [worker]
        code, out, _ = await world.cli("alerts", "rules", "show", "--project", "alpha")
        assert "requests_per_minute   5" in out and "(project)" in out

        # PUT replaces what the level sets; DELETE clears it.
        put = await client.put(
            "/keys/alert-rules", json={"error_rate": 0.9}, headers=world.admin["alpha"]
        )
        assert put.json()["alert_rules"]["rules"] == {"error_rate": 0.9}
        gone = await client.delete(f"/keys/{worker}/alert-rules", headers=world.admin["alpha"])
        assert gone.json()["alert_rules"]["overrides"] == {}
        assert (await manager.alert_rules("alpha")).overridden == []
        code, _, _ = await world.cli("alerts", "rules", "clear", "--project", "alpha")
        assert code == 0
        assert (await manager.alert_rules("alpha")).rules == {}
    # Beta never saw any of it.
    assert (await manager.alert_rules("beta")).rules == {}


ROUTES = [
    ("GET", None),
    ("PUT", {"requests_per_minute": 1}),
    ("PATCH", {"requests_per_minute": 1}),
    ("DELETE", None),
]


@pytest.mark.parametrize(("method", "body"), ROUTES, ids=[m for m, _ in ROUTES])
async def test_another_projects_key_rules_answer_as_a_missing_key(
    world: World, method: str, body: dict[str, Any] | None
) -> None:
    """Every method of ``/{id}/alert-rules`` answers another project's key exactly as a
    key that does not exist (404), and changes nothing of it."""
    theirs = world.worker["beta"]
    await world.manager.set_key_alert_rules(theirs, requests_per_minute=7)
    async with http(world.app) as client:
        answers = [
            await client.request(
                method, f"/keys/{key_id}/alert-rules", json=body, headers=world.admin["alpha"]
            )
            for key_id in (theirs, MISSING)
        ]
    assert [a.status_code for a in answers] == [404, 404]
    assert (
        answers[0].json()
        == answers[1].json()
        == {"error": {"code": "not_found", "message": "There is no key with this id."}}
    )
    assert (await world.manager.key_alert_rules(theirs)).overrides == {"requests_per_minute": 7}
    with pytest.raises(KeyNotFound):
        await world.manager.key_alert_rules(theirs, project="alpha")


async def test_bad_rules_are_refused_field_by_field(world: World) -> None:
    """Unknown rules and out-of-range values are a 422 naming each field (REST), a
    KeyValidationError (Python) and one line with exit 2 (the command line); a body that is
    not JSON is a 400; nothing is stored."""
    async with http(world.app) as client:
        admin = world.admin["alpha"]
        unknown = await client.patch(
            "/keys/alert-rules", json={"requests": 5, "rpm": 1}, headers=admin
        )
        assert unknown.status_code == 422
        assert [f["field"] for f in unknown.json()["error"]["fields"]] == ["requests", "rpm"]
        bad = await client.put(
            f"/keys/{world.worker['alpha']}/alert-rules",
            json={"requests_per_minute": 0, "error_rate": 2, "quota_thresholds": [0.5, -1]},
            headers=admin,
        )
        assert bad.status_code == 422
        body = bad.json()["error"]
        assert body["code"] == "validation_failed"
        assert {f["field"] for f in body["fields"]} == {
            "requests_per_minute",
            "error_rate",
            "quota_thresholds[1]",
        }
        broken = await client.put("/keys/alert-rules", content=b"{", headers=admin)
        assert (broken.status_code, broken.json()["error"]["code"]) == (400, "invalid_json")
        listed = await client.put("/keys/alert-rules", json=[1], headers=admin)
        assert listed.status_code == 422
    with pytest.raises(KeyValidationError) as caught:
        await world.manager.set_alert_rules(cooldown=-1, project="alpha")
    assert [e.field for e in caught.value.errors] == ["cooldown"]
    with pytest.raises(KeyValidationError):
        await world.manager.set_alert_rules(project="Not A Slug", cooldown=60)
    code, _, err = await world.cli("alerts", "rules", "set", "error_rate=lots")
    assert code == 2 and err.startswith("keystile: invalid input: error_rate")
    assert (await world.manager.alert_rules("alpha")).rules == {}
    assert (await world.manager.key_alert_rules(world.worker["alpha"])).overrides == {}


async def test_writes_need_manage_keys(store: KeyStore, clock: ManualClock) -> None:
    """A key that may only view usage reads the rules but cannot change them (403)."""
    gate = Keystile(store=store, secret=SECRET, clock=clock)
    world = World(gate)
    viewer = await gate.manager.create(
        {"name": "viewer", "type": "dev", "scopes": ["admin:view_usage"]}
    )
    headers = {"Authorization": f"Bearer {viewer.secret.get_secret_value()}"}
    async with http(world.app) as client:
        assert (await client.get("/keys/alert-rules", headers=headers)).status_code == 200
        for method in ("PUT", "PATCH", "DELETE"):
            answer = await client.request(
                method, "/keys/alert-rules", json={"cooldown": 60}, headers=headers
            )
            assert answer.status_code == 403, method
    assert (await gate.manager.alert_rules()).rules == {}
    await gate.shutdown()


async def test_every_change_is_audited(world: World) -> None:
    """Each change — project rules, a key's overrides, over REST or Python — is an
    ``alert_rules`` event with its actor, project, key and each field's old → new; a
    refused attempt is recorded as refused."""
    worker = world.worker["alpha"]
    async with http(world.app) as client:
        await client.patch(
            "/keys/alert-rules", json={"requests_per_minute": 5}, headers=world.admin["alpha"]
        )
        await client.patch(
            "/keys/alert-rules", json={"requests_per_minute": 9}, headers=world.admin["alpha"]
        )
        await client.put(
            f"/keys/{worker}/alert-rules", json={"cooldown": 0}, headers=world.admin["alpha"]
        )
    await world.manager.set_key_alert_rules(worker, cooldown=120)
    page = await world.manager.history(action="alert_rules", project="alpha")
    events = list(reversed(page.events))
    assert [(e.outcome, e.key_id, e.changes) for e in events] == [
        ("ok", None, {"requests_per_minute": ["(inherited)", 5]}),
        ("ok", None, {"requests_per_minute": [5, 9]}),
        ("refused", worker, {}),
        ("ok", worker, {"cooldown": ["(inherited)", 120.0]}),
    ]
    assert events[0].actor.kind == "key" and events[0].project == "alpha"
    assert events[3].actor.kind == "python"
    assert "cooldown" in (events[2].reason or "")


async def test_a_projects_threshold_fires_and_the_default_does_not(
    store: KeyStore, clock: ManualClock
) -> None:
    """With no process-wide request threshold, project A's ``requests_per_minute=5`` fires
    for A's key at its 6th request in a minute, while B's key (the default) fires nothing;
    a key of A overriding the threshold to off fires nothing either."""
    rig = Rig(store, clock, AlertRules())
    try:
        manager = rig.gate.manager
        a_key, a_headers = await rig.key(project="alpha")
        b_key, b_headers = await rig.key(project="beta")
        quiet_key, quiet_headers = await rig.key(project="alpha")
        await manager.set_alert_rules(requests_per_minute=5, project="alpha")
        await manager.set_key_alert_rules(quiet_key, requests_per_minute=None)
        for headers in (a_headers, b_headers, quiet_headers):
            assert await rig.send(headers, n=6) == [200] * 6
        assert await rig.flush() == ["requests_per_minute"]
        assert [a.key_id for a in rig.alerts] == [a_key]
        assert rig.alerts[0].message.endswith("(threshold 5)")
        # A key override wins over its project's rules: 100 lets B-like volume through...
        await manager.set_key_alert_rules(a_key, requests_per_minute=100)
        await manager.set_alert_rules(requests_per_minute=2, project="beta")
        rig.clock.advance(60)
        await rig.cool_down()
        for headers in (a_headers, b_headers):
            assert await rig.send(headers, n=6) == [200] * 6
        assert await rig.flush() == ["requests_per_minute"]
        assert rig.alerts[-1].key_id == b_key  # ...and beta's new rule is seen at once
    finally:
        await rig.close()


async def test_a_flush_reads_rules_once_per_project_within_the_ttl(
    store: KeyStore, clock: ManualClock
) -> None:
    """The alerter reads a project's rules at most once per TTL, however many keys and
    flushes: no store round trip per key per flush."""
    rig = Rig(store, clock, AlertRules())
    reads: list[list[str]] = []
    projects = rig.gate.projects
    real = projects.rules

    async def counted(wanted: Any) -> Any:
        wanted = list(wanted)
        reads.append(sorted(wanted))
        return await real(wanted)

    projects.rules = counted  # type: ignore[method-assign]
    book = rig.gate.alerts.rulebook
    assert isinstance(book, RuleBook)
    book.monotonic = lambda: 0.0  # no time passes: the cache holds
    try:
        headers = [(await rig.key(project="alpha"))[1] for _ in range(5)]
        headers += [(await rig.key(project="beta"))[1] for _ in range(5)]
        for _ in range(3):
            for each in headers:
                assert await rig.send(each) == [200]
            await rig.flush()
        assert reads == [["alpha", "beta"]]
    finally:
        await rig.close()


async def test_overrides_follow_the_key(world: World) -> None:
    """A rotated key's successor inherits its overrides; a revoked key's are removed, so a
    project keeps no rules for keys that can do nothing more."""
    manager, worker = world.manager, world.worker["alpha"]
    await manager.set_key_alert_rules(worker, requests_per_minute=42)
    rotated = await manager.rotate(worker, grace=0)
    assert (await manager.key_alert_rules(rotated.key.id)).overrides == {"requests_per_minute": 42}
    await manager.revoke(rotated.key.id)
    assert (await manager.key_alert_rules(rotated.key.id)).overrides == {}
    assert (await manager.alert_rules("alpha")).overridden == [worker]


@pytest.mark.parametrize("backend", REDIS_BACKENDS, indirect=True)
async def test_a_project_keeps_one_small_rule_hash(world: World) -> None:
    """On Redis a project's rules are one hash, tagged by the project: a field for its own
    rules and one per overridden key, no more."""
    store = world.gate.store.store
    assert isinstance(store, RedisStore)
    await world.manager.set_alert_rules(requests_per_minute=5, project="alpha")
    await world.manager.set_key_alert_rules(world.worker["alpha"], cooldown=60)
    name = f"{store.namespace}:project:{{alpha}}:rules"
    held = {k.decode(): json.loads(v) for k, v in (await store.client.hgetall(name)).items()}
    assert held == {
        "project": {"requests_per_minute": 5},
        f"key:{world.worker['alpha']}": {"cooldown": 60.0},
    }
    assert MAX_KEY_OVERRIDES == 10_000


@pytest.mark.parametrize("backend", REDIS_BACKENDS, indirect=True)
async def test_a_change_made_elsewhere_is_seen_within_the_ttl(
    store: KeyStore, clock: ManualClock
) -> None:
    """Rules changed by another process (here: another manager on the same Redis, as the
    command line is) reach the alerter once the cached rules are older than the TTL."""
    assert isinstance(store, RedisStore)  # another process shares only a Redis store
    rig = Rig(store, clock, AlertRules())
    book = rig.gate.alerts.rulebook
    assert isinstance(book, RuleBook)
    now = [0.0]
    book.monotonic = lambda: now[0]
    elsewhere = KeyManager(store, rig.gate.hasher)
    try:
        _, headers = await rig.key(project="alpha")
        assert await rig.send(headers, n=6) == [200] * 6
        assert await rig.flush() == []  # alpha's rules are read (none) and cached
        await elsewhere.set_alert_rules(requests_per_minute=5, project="alpha")
        assert await rig.send(headers, n=6) == [200] * 6
        assert await rig.flush() == []  # within the TTL: the cached rules
        now[0] += book.ttl
        assert await rig.send(headers, n=6) == [200] * 6
        assert await rig.flush() == ["requests_per_minute"]
    finally:
        await rig.close()


async def test_a_project_holds_a_bounded_number_of_key_overrides(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the most key overrides a project holds, another key's is refused (422 over
    REST, naming key_id); changing a key that has one, and the project's own, still work."""
    monkeypatch.setattr("keystile.projects.MAX_KEY_OVERRIDES", 2)
    manager = world.manager
    await manager.set_alert_rules(cooldown=60, project="alpha")
    made = [world.worker["alpha"]]
    for n in range(2):
        made.append(
            (await manager.create({"name": f"k{n}", "type": "dev"}, project="alpha")).key.id
        )
    await manager.set_key_alert_rules(made[0], cooldown=61)
    await manager.set_key_alert_rules(made[1], cooldown=62)
    async with http(world.app) as client:
        refused = await client.put(
            f"/keys/{made[2]}/alert-rules", json={"cooldown": 63}, headers=world.admin["alpha"]
        )
    assert refused.status_code == 422
    assert [f["field"] for f in refused.json()["error"]["fields"]] == ["key_id"]
    await manager.set_key_alert_rules(made[0], cooldown=64)
    await manager.set_alert_rules(cooldown=65, project="alpha")
    rules = await manager.alert_rules("alpha")
    assert (rules.overridden, rules.rules) == (sorted(made[:2]), {"cooldown": 65.0})
    await manager.clear_key_alert_rules(made[1])
    assert (await manager.set_key_alert_rules(made[2], cooldown=66)).overrides == {
        "cooldown": 66.0
    }


async def test_quota_alerts_follow_the_projects_and_the_keys_thresholds(
    store: KeyStore, clock: ManualClock
) -> None:
    """A project's quota thresholds replace the default's (50 % fires, 80 % does not), and
    a key's override replaces its project's."""
    rig = Rig(store, clock, AlertRules())
    try:
        manager = rig.gate.manager
        project_key, project_headers = await rig.key(project="alpha", token_quota=100)
        own_key, own_headers = await rig.key(project="alpha", token_quota=100)
        await manager.set_alert_rules(quota_thresholds=[0.5], project="alpha")
        await manager.set_key_alert_rules(own_key, quota_thresholds=[0.25])
        # The first flush of a project reads its rules; spends are judged by them after.
        assert await rig.send(project_headers, "/infer/1") == [200]
        assert await rig.send(own_headers, "/infer/1") == [200]
        await rig.flush()
        assert await rig.send(project_headers, "/infer/54") == [200]
        assert await rig.send(own_headers, "/infer/29") == [200]
        assert await rig.flush() == ["quota", "quota"]
        assert {(a.key_id, a.details["used"]) for a in rig.alerts} == {
            (project_key, 55),
            (own_key, 30),
        }
        assert await rig.send(project_headers, "/infer/30") == [200]  # 85 %: not alpha's
        assert await rig.flush() == []
    finally:
        await rig.close()
