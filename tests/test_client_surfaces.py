"""What a client meets: the admin collection at its mount path, the command line, the demo
and apps sharing one store by default, and key records with their status and last use."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from conftest import REDIS_URL, SECRET
from keystile import KeyInfo, KeyManager, KeyStatus, Keystile, KeystileMiddleware, ManualClock
from keystile.admin import admin_mount, admin_rules, fastapi_router
from keystile.cli import build_parser, execute
from keystile.clock import to_datetime
from keystile.demo import build_demo_app
from keystile.demo_server import demo_gate

KEYSTILE = os.path.join(os.path.dirname(sys.executable), "keystile")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def admin_token(gate: Keystile) -> str:
    created = await gate.manager.create(
        {"name": "admin", "type": "prod", "scopes": ["admin:manage_keys", "vec:*"]}
    )
    return created.secret.get_secret_value()


def starlette_admin(gate: Keystile) -> Starlette:
    return Starlette(
        routes=[admin_mount(gate, "/cloud/keys")],
        middleware=[
            Middleware(
                KeystileMiddleware,
                gate=gate,
                rules=admin_rules("/cloud/keys"),
                deny_unmatched=True,
            )
        ],
    )


def fastapi_admin(gate: Keystile) -> FastAPI:
    app = FastAPI()
    app.add_middleware(KeystileMiddleware, gate=gate)
    app.include_router(fastapi_router(gate, prefix="/cloud/keys"))
    return app


@pytest.mark.parametrize("kind", ["starlette", "fastapi", "demo"])
async def test_the_collection_answers_at_its_mount_path_without_a_redirect(kind: str) -> None:
    """GET and POST /cloud/keys answer as /cloud/keys/ do: no 307 that curl and httpx would
    not follow."""
    gate = Keystile(store="memory://", secret=SECRET)
    token = await admin_token(gate)
    app = {"starlette": starlette_admin, "fastapi": fastapi_admin, "demo": build_demo_app}[kind](
        gate
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
        for path in ("/cloud/keys", "/cloud/keys/"):
            made = await http.post(
                path, json={"name": f"via {path}", "type": "dev"}, headers=bearer(token)
            )
            assert made.status_code == 201, (path, made.status_code, made.text)
            assert made.json()["key"]["name"] == f"via {path}"
            listed = await http.get(path, headers=bearer(token))
            assert listed.status_code == 200, (path, listed.status_code)
            assert f"via {path}" in {k["name"] for k in listed.json()["keys"]}
        anonymous = await http.get("/cloud/keys")
        assert anonymous.status_code == 401
        assert (await http.get("/cloud/keys/nothing/here", headers=bearer(token))).status_code in (
            403,
            404,
        )
    await gate.aclose()


def test_fastapi_documents_the_collection_once_at_its_prefix() -> None:
    gate = Keystile(store="memory://", secret=SECRET)
    paths = fastapi_admin(gate).openapi()["paths"]
    assert set(paths["/cloud/keys"]) == {"get", "post"}
    assert "/cloud/keys/" not in paths


# -- one store for the command line, the demo and apps ---------------------------------------


def keystile(*argv: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KEYSTILE_")}
    return subprocess.run(
        [KEYSTILE, *argv], capture_output=True, text=True, timeout=60, env={**clean, **env}
    )


async def test_a_key_made_on_the_command_line_works_in_the_demo_and_in_an_app(
    redis_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keystile keys create --redis URL` with KEYSTILE_NAMESPACE/KEYSTILE_SECRET set, then
    the demo and a Keystile() app built from the same environment: the key works in both."""
    env = {"KEYSTILE_SECRET": SECRET, "KEYSTILE_NAMESPACE": redis_namespace}
    made = keystile(
        *("keys", "create", "--redis", REDIS_URL, "--json", "--name", "shell", "--type", "dev"),
        *("--scope", "vec:read"),
        env=env,
    )
    assert made.returncode == 0, made.stderr
    token = json.loads(made.stdout)["secret"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    async def endpoint(request: Request) -> JSONResponse:
        return JSONResponse({"name": request.user.key.name})

    demo = demo_gate(REDIS_URL)  # keystile demo --redis URL
    app = Keystile(redis_url=REDIS_URL)  # an app configured by the environment
    try:
        served = [
            build_demo_app(demo),
            Starlette(
                routes=[Route("/cloud/vec/databases", endpoint)],
                middleware=[Middleware(KeystileMiddleware, gate=app)],
            ),
        ]
        for asgi in served:
            transport = httpx.ASGITransport(app=asgi)
            async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
                answer = await http.get("/cloud/vec/databases", headers=bearer(token))
                assert answer.status_code == 200, answer.text
    finally:
        await demo.aclose()
        await app.aclose()


async def test_the_command_line_reads_the_usage_of_a_demo_made_key(
    redis_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A key the demo seeded, used through the demo: `keystile usage KEY_ID` reports its
    requests, and `keystile usage` names it."""
    monkeypatch.setenv("KEYSTILE_SECRET", SECRET)
    monkeypatch.setenv("KEYSTILE_NAMESPACE", redis_namespace)
    gate = demo_gate(REDIS_URL)
    try:
        from keystile.demo import seed_demo_keys

        keys = await seed_demo_keys(gate)
        dev = keys["dev"]
        transport = httpx.ASGITransport(app=build_demo_app(gate))
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            for _ in range(3):
                answer = await http.get(
                    "/cloud/vec/databases", headers=bearer(dev.secret.get_secret_value())
                )
                assert answer.status_code == 200
        await gate.usage.flush()
    finally:
        await gate.aclose()
    env = {"KEYSTILE_SECRET": SECRET, "KEYSTILE_NAMESPACE": redis_namespace}
    one = keystile("usage", dev.key.id, "--redis", REDIS_URL, "--json", env=env)
    assert one.returncode == 0, one.stderr
    assert json.loads(one.stdout)["all_time"]["requests"] == 3
    every = keystile("usage", "--redis", REDIS_URL, env=env)
    assert every.returncode == 0, every.stderr
    [line] = [x for x in every.stdout.splitlines() if x.startswith(dev.key.id)]
    assert "demo dev key" in line
    overview = keystile("usage", "--redis", REDIS_URL, "--json", env=env)
    names = {k["key_id"]: k["name"] for k in json.loads(overview.stdout)["keys"]}
    assert names == {dev.key.id: "demo dev key"}


# -- status and last use --------------------------------------------------------------------


def statuses_admin(described: dict[str, KeyInfo]) -> str:
    [admin] = [i for i, d in described.items() if d.key.name == "admin"]
    return admin


async def run_cli(manager: KeyManager, *argv: str) -> str:
    args = build_parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    assert await execute(args, manager, out, err) == 0, err.getvalue()
    return out.getvalue()


async def test_records_carry_their_status_and_last_use_everywhere() -> None:
    """active, rotated (in its grace), expired, revoked — computed from the record and the
    clock — and last_used_at from the usage counts: in Python, the REST API and the CLI."""
    clock = ManualClock(1_800_000_000.0)
    gate = Keystile(store="memory://", secret=SECRET, clock=clock)
    manager = gate.manager
    used = await manager.create({"name": "used", "type": "dev", "scopes": ["vec:read"]})
    idle = await manager.create({"name": "idle", "type": "dev"})
    soon = await manager.create(
        {"name": "soon", "type": "dev", "expires_at": to_datetime(clock() + 30)}
    )
    gone = await manager.create({"name": "gone", "type": "dev"})
    await manager.revoke(gone.key.id)
    old = await manager.create({"name": "old", "type": "dev"})
    await manager.rotate(old.key.id, grace=timedelta(hours=1))
    admin = await admin_token(gate)

    async def probe(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = Starlette(
        routes=[Route("/probe", probe), admin_mount(gate, "/cloud/keys")],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
        assert (
            await http.get("/probe", headers=bearer(used.secret.get_secret_value()))
        ).status_code == 200
        used_at = to_datetime(clock())
        await gate.usage.flush()
        clock.advance(60)  # "soon" has expired

        info = await manager.info(used.key.id)
        assert isinstance(info, KeyInfo)
        assert (info.status, info.last_used_at) == (KeyStatus.ACTIVE, used_at)
        described = {i.key.id: i for i in (await manager.describe((await manager.list()).keys))}
        statuses = {i: d.status.value for i, d in described.items()}
        successor = described[old.key.id].key.replaced_by
        assert successor is not None
        assert statuses == {
            used.key.id: "active",
            idle.key.id: "active",
            soon.key.id: "expired",
            gone.key.id: "revoked",
            old.key.id: "rotated",
            successor: "active",
            statuses_admin(described): "active",
        }
        assert described[idle.key.id].last_used_at is None
        rotated = await manager.list(status="rotated")
        assert [k.name for k in rotated.keys] == ["old"]

        one = await http.get(f"/cloud/keys/{used.key.id}", headers=bearer(admin))
        assert one.status_code == 200
        record = one.json()["key"]
        assert record["status"] == "active"
        assert record["last_used_at"] == used_at.isoformat().replace("+00:00", "Z")
        listed = (await http.get("/cloud/keys", headers=bearer(admin))).json()["keys"]
        by_id: dict[str, Any] = {k["id"]: k for k in listed}
        assert by_id[gone.key.id]["status"] == "revoked"
        assert by_id[soon.key.id]["status"] == "expired"
        assert by_id[old.key.id]["status"] == "rotated"
        assert by_id[successor]["status"] == "active"
        assert by_id[idle.key.id]["last_used_at"] is None
        assert by_id[used.key.id]["last_used_at"] == record["last_used_at"]
        made = await http.post(
            "/cloud/keys", json={"name": "new", "type": "dev"}, headers=bearer(admin)
        )
        assert made.json()["key"]["status"] == "active"
        assert made.json()["key"]["last_used_at"] is None

    table = await run_cli(manager, "keys", "list")
    header, *rows = table.splitlines()
    assert "STATUS" in header and "LAST USED" in header
    [row] = [r for r in rows if r.startswith(used.key.id)]
    assert used_at.strftime("%Y-%m-%dT%H:%M:%SZ") in row and " active " in row
    [row] = [r for r in rows if r.startswith(old.key.id)]
    assert " rotated " in row and row.rstrip().endswith("never")
    shown = json.loads(await run_cli(manager, "keys", "show", used.key.id, "--json"))
    assert shown["key"]["last_used_at"] == record["last_used_at"]
    assert "last used" in await run_cli(manager, "keys", "show", used.key.id)
    only_rotated = (await run_cli(manager, "keys", "list", "--status", "rotated")).splitlines()
    assert [r.split()[0] for r in only_rotated[1:]] == [old.key.id]
    await gate.aclose()
