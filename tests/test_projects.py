"""Projects: every key belongs to one; an admin key sees and manages its own project's keys
only, and another project's ids answer exactly as ids that do not exist (issue #16, item 1)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

from conftest import SECRET
from keystile import (
    KeyManager,
    KeyNotFound,
    Keystile,
    KeystileMiddleware,
    KeyValidationError,
    ManualClock,
)
from keystile.stores import KeyStore
from test_alert_rules import World
from usage_app import http

ADMIN = ["admin:manage_keys", "admin:view_usage"]


async def whoami(request: Request) -> Response:
    return JSONResponse(
        {"project": request.state.keystile_project, "user": request.user.key.project}
    )


async def project_app() -> tuple[Starlette, Keystile, dict[str, Any]]:
    from keystile.admin import admin_app

    gate = Keystile(secret=SECRET)
    app = Starlette(routes=[Mount("/keys", app=admin_app(gate)), Route("/whoami", whoami)])
    app.add_middleware(KeystileMiddleware, gate=gate)
    made: dict[str, Any] = {}
    for project in ("alpha", "beta"):
        admin = await gate.manager.create(
            {"name": f"{project} admin", "type": "prod", "scopes": ADMIN, "project": project}
        )
        worker = await gate.manager.create(
            {
                "name": f"{project} worker",
                "type": "dev",
                "scopes": ["vec:read"],
                "project": project,
            }
        )
        made[project] = {
            "admin": {"Authorization": f"Bearer {admin.secret.get_secret_value()}"},
            "worker": worker.key.id,
            "worker_token": worker.secret.get_secret_value(),
        }
    return app, gate, made


ROUTES = [
    ("GET", "/keys/{id}", None),
    ("PATCH", "/keys/{id}", {"name": "taken over"}),
    ("POST", "/keys/{id}/revoke", None),
    ("POST", "/keys/{id}/rotate", {"grace_seconds": 0}),
    ("GET", "/keys/{id}/usage", None),
    ("GET", "/keys/{id}/alert-rules", None),
    ("PUT", "/keys/{id}/alert-rules", {"requests_per_minute": 1}),
    ("PATCH", "/keys/{id}/alert-rules", {"requests_per_minute": 1}),
    ("DELETE", "/keys/{id}/alert-rules", None),
]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES)
async def test_another_projects_key_is_indistinguishable_from_no_key(
    method: str, path: str, body: dict[str, Any] | None
) -> None:
    app, gate, made = await project_app()
    alpha, beta = made["alpha"], made["beta"]
    missing = "key_0VgmOZcuNoSuchKey12"
    async with http(app) as client:

        async def call(key_id: str) -> httpx.Response:
            url = path.format(id=key_id)
            return await client.request(method, url, json=body, headers=alpha["admin"])

        theirs, nobodys = await call(beta["worker"]), await call(missing)
        assert theirs.status_code == nobodys.status_code == 404
        assert theirs.json() == {
            "error": {
                **nobodys.json()["error"],
                "message": nobodys.json()["error"]["message"].replace(missing, beta["worker"]),
            }
        }
        assert theirs.headers.keys() == nobodys.headers.keys()
    # Nothing happened to beta's key.
    record = await gate.manager.get(beta["worker"])
    assert record.name == "beta worker" and record.revoked_at is None
    assert record.replaced_by is None
    assert (await gate.manager.key_alert_rules(beta["worker"])).overrides == {}
    await gate.aclose()


async def test_listing_usage_and_audit_stay_within_the_project() -> None:
    app, gate, made = await project_app()
    alpha, beta = made["alpha"], made["beta"]
    async with http(app) as client:
        await client.get("/whoami", headers={"Authorization": f"Bearer {beta['worker_token']}"})
        await gate.usage.flush()
        listed = await client.get("/keys/", headers=alpha["admin"])
        usage = await client.get("/keys/usage", headers=alpha["admin"])
        audit = await client.get("/keys/audit", headers=alpha["admin"])
        elsewhere = await client.post(
            "/keys/", json={"name": "x", "type": "dev", "project": "beta"}, headers=alpha["admin"]
        )
        own = await client.post(
            "/keys/", json={"name": "y", "type": "dev"}, headers=alpha["admin"]
        )
    assert {k["project"] for k in listed.json()["keys"]} == {"alpha"}
    assert beta["worker"] not in listed.text
    rows = usage.json()["keys"]
    alpha_ids = {k["id"] for k in listed.json()["keys"]}
    assert {row["key_id"] for row in rows} <= alpha_ids and beta["worker"] not in usage.text
    assert usage.json()["totals"]["requests"] == sum(r["totals"]["requests"] for r in rows)
    assert all(e["project"] in ("alpha", None) for e in audit.json()["events"])
    assert beta["worker"] not in audit.text
    assert elsewhere.status_code == 422
    assert elsewhere.json()["error"]["fields"][0]["field"] == "project"
    assert own.status_code == 201 and own.json()["key"]["project"] == "alpha"
    await gate.aclose()


async def test_the_project_travels_with_the_request() -> None:
    app, gate, made = await project_app()
    async with http(app) as client:
        answer = await client.get(
            "/whoami", headers={"Authorization": f"Bearer {made['beta']['worker_token']}"}
        )
    assert answer.json() == {"project": "beta", "user": "beta"}
    await gate.aclose()


async def test_operators_work_across_projects_or_within_one(manager: KeyManager) -> None:
    one = await manager.create({"name": "a", "type": "dev", "project": "alpha"})
    two = await manager.create({"name": "b", "type": "dev"}, project="beta")
    assert (one.key.project, two.key.project) == ("alpha", "beta")
    assert {k.id for k in (await manager.list()).keys} >= {one.key.id, two.key.id}
    assert [k.id for k in (await manager.list(project="beta")).keys] == [two.key.id]
    with pytest.raises(KeyNotFound):
        await manager.get(one.key.id, project="beta")
    with pytest.raises(KeyValidationError, match="project"):
        await manager.create({"name": "c", "type": "dev", "project": "alpha"}, project="beta")
    with pytest.raises(KeyValidationError, match="cannot be changed"):
        await manager.update(one.key.id, {"project": "beta"})
    with pytest.raises(KeyValidationError):
        await manager.create({"name": "d", "type": "dev", "project": "Not A Name!"})
    default = await manager.create({"name": "e", "type": "dev"})
    assert default.key.project == "default"


# -- a project's name (issue #16, item 1) ------------------------------------------------


async def test_a_project_has_a_name_set_and_read_through_every_surface(
    store: KeyStore, clock: ManualClock
) -> None:
    """A project not yet named shows its id as its name; renamed over REST it reads back in
    Python and on the command line, and renamed there it reads back over REST; an admin
    key reads and renames only its own project; each rename is in the audit trail."""
    gate = Keystile(store=store, secret=SECRET, clock=clock)
    world = await World(gate).populate()
    manager = gate.manager
    unnamed = await manager.project_info("alpha")
    assert (unnamed.id, unnamed.name, unnamed.recorded, unnamed.created_at) == (
        "alpha",
        "alpha",
        False,
        None,
    )
    async with http(world.app) as client:
        shown = await client.get("/keys/project", headers=world.admin["alpha"])
        assert shown.json()["project"]["name"] == "alpha"
        renamed = await client.patch(
            "/keys/project",
            json={"name": "Alpha Search", "description": "the search team"},
            headers=world.admin["alpha"],
        )
        assert renamed.status_code == 200
        assert renamed.json()["project"]["name"] == "Alpha Search"
        info = await manager.project_info("alpha")
        assert (info.name, info.description, info.recorded) == (
            "Alpha Search",
            "the search team",
            True,
        )
        code, out, _ = await world.cli("projects", "show", "--project", "alpha")
        assert code == 0 and "Alpha Search" in out
        code, _, _ = await world.cli("projects", "rename", "Beta Billing", "--project", "beta")
        assert code == 0
        theirs = await client.get("/keys/project", headers=world.admin["beta"])
        assert theirs.json()["project"]["name"] == "Beta Billing"
        # Alpha's admin still sees alpha only, and cannot name a project in its body.
        mine = await client.get("/keys/project", headers=world.admin["alpha"])
        assert mine.json()["project"]["id"] == "alpha"
        sneaky = await client.patch(
            "/keys/project", json={"id": "beta", "name": "x"}, headers=world.admin["alpha"]
        )
        assert sneaky.status_code == 422
        assert [f["field"] for f in sneaky.json()["error"]["fields"]] == ["id"]
        empty = await client.patch(
            "/keys/project", json={"name": " "}, headers=world.admin["alpha"]
        )
        assert empty.status_code == 422
    assert (await manager.project_info("beta")).name == "Beta Billing"
    code, out, _ = await world.cli("projects", "list", "--json")
    listed = {p["id"]: p for p in json.loads(out)["projects"]}
    assert listed["alpha"]["keys"] == 2 and listed["beta"]["name"] == "Beta Billing"
    assert [p.id for p in await manager.projects()] == ["alpha", "beta"]
    events = (await manager.history(action="update_project")).events
    assert [(e.project, e.outcome) for e in reversed(events)] == [
        ("alpha", "ok"),
        ("beta", "ok"),
        ("alpha", "refused"),
        ("alpha", "refused"),
    ]
    assert events[-1].changes == {
        "name": ["alpha", "Alpha Search"],
        "description": ["", "the search team"],
    }
    code, out, _ = await world.cli("audit", "--action", "update_project", "--project", "beta")
    assert code == 0
    assert "update_project project beta: name 'beta' -> 'Beta Billing'" in out
    await gate.shutdown()


# -- the demo scopes its data by project ---------------------------------------------------


async def test_the_demos_data_is_kept_per_project() -> None:
    """A vec database, a kev entry and a file made with project A's key are invisible to
    project B's key (B may make its own of the same name)."""
    from keystile.demo import build_demo_app

    gate = Keystile(secret=SECRET)
    everything = ["vec:*", "kev:*", "files:*"]
    tokens = {}
    for project in ("alpha", "beta"):
        made = await gate.manager.create(
            {"name": project, "type": "dev", "scopes": everything, "project": project}
        )
        tokens[project] = {"Authorization": f"Bearer {made.secret.get_secret_value()}"}
    async with http(build_demo_app(gate)) as client:
        created = await client.post(
            "/cloud/vec/databases", json={"name": "docs"}, headers=tokens["alpha"]
        )
        assert created.status_code == 201
        await client.put("/cloud/kev/colour", content=b"blue", headers=tokens["alpha"])
        await client.put("/cloud/files/a.txt", content=b"alpha's", headers=tokens["alpha"])
        seen = await client.get("/cloud/vec/databases", headers=tokens["beta"])
        assert seen.json() == {"databases": []}
        assert (await client.get("/cloud/kev/colour", headers=tokens["beta"])).status_code == 404
        assert (await client.get("/cloud/files/a.txt", headers=tokens["beta"])).status_code == 404
        gone = await client.delete("/cloud/vec/databases/docs", headers=tokens["beta"])
        assert gone.status_code == 404
        again = await client.post(
            "/cloud/vec/databases", json={"name": "docs"}, headers=tokens["beta"]
        )
        assert again.status_code == 201
        mine = await client.get("/cloud/vec/databases", headers=tokens["alpha"])
        assert [d["name"] for d in mine.json()["databases"]] == ["docs"]
        assert (await client.get("/cloud/kev/colour", headers=tokens["alpha"])).json() == {
            "key": "colour",
            "value": "blue",
        }
    await gate.aclose()
