"""An app's own key types: a fourth type declared in keystile.toml, a built-in one left
out, prefixes that collide (issue #20, item 1)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from starlette.applications import Starlette

from conftest import REDIS_URL, SECRET, require_redis
from keystile import (
    ConfigurationError,
    KeyHasher,
    KeyManager,
    KeyPolicy,
    Keystile,
    KeystileMiddleware,
    KeyTypePolicy,
    MemoryStore,
    RedisStore,
)
from keystile.addresses import AddressMode
from keystile.models import DEFAULT_TYPE_POLICIES
from keystile.principal import Principal
from test_adoption import cli, import_app
from usage_app import http, lifespan

PARTNER_TOML = """
app = "partner_service:app"

[scopes]
orders = ["read", "write"]

[types]
dev = false

[types.partner]
prefix = "partner_"
rate_limit = "3/minute"
forbidden_scopes = ["orders:write"]
"""

PARTNER_APP = """
from typing import Annotated

from fastapi import FastAPI, Security

from keystile import ApiKey, Keystile, KeystileMiddleware
from keystile.admin import fastapi_router
from keystile.fastapi import api_key

gate = Keystile()  # its scopes and key types from keystile.toml
app = FastAPI()
app.add_middleware(KeystileMiddleware, gate=gate)
app.include_router(fastapi_router(gate, prefix="/keys"))


@app.get("/orders")
async def orders(key: Annotated[ApiKey, Security(api_key, scopes=["orders:read"])]) -> dict:
    return {"caller": key.name, "type": key.type}
"""


async def test_a_type_declared_in_keystile_toml_is_issued_admitted_and_limited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, redis_namespace: str
) -> None:
    """keystile.toml declares ``partner`` (prefix partner_, 3 requests a minute) and leaves
    ``dev`` out. The command line issues a partner_ key through ``--app``; the app admits
    it and refuses its fourth request in the minute; the admin API issues one too and
    refuses an undeclared type, naming the declared ones; a dev key stored earlier is
    refused, listed by ``keys list --undeclared`` and marked by ``keys show``."""
    require_redis()
    (tmp_path / "keystile.toml").write_text(PARTNER_TOML)
    (tmp_path / "partner_service.py").write_text(PARTNER_APP)
    env = {"KEYSTILE_REDIS_URL": REDIS_URL, "KEYSTILE_SECRET": SECRET}
    env["KEYSTILE_NAMESPACE"] = redis_namespace
    # A dev key made before the app left the type out (the default policy).
    before = KeyManager(
        RedisStore.from_url(REDIS_URL, namespace=redis_namespace), KeyHasher(SECRET)
    )
    old_dev = await before.create({"name": "old dev", "type": "dev", "scopes": ["*"]})
    await before.store.close()

    made = cli(
        tmp_path,
        *("keys", "create", "--json", "--name", "partner bot", "--type", "partner"),
        *("--scope", "orders:read"),
        **env,
    )
    assert made.returncode == 0, made.stderr
    created = json.loads(made.stdout)
    secret = created["secret"]
    assert secret.startswith("partner_") and created["key"]["type"] == "partner"
    assert created["key"]["hint"].startswith("partner_...")
    refused = cli(tmp_path, "keys", "create", "--name", "x", "--type", "dev", **env)
    assert refused.returncode == 2
    assert "type: must be one of prod, client, partner" in refused.stderr
    forbidden = cli(
        tmp_path,
        *("keys", "create", "--name", "x", "--type", "partner", "--scope", "orders:write"),
        **env,
    )
    assert forbidden.returncode == 2
    assert "partner keys may not hold 'orders:write'" in forbidden.stderr

    listed = cli(tmp_path, "keys", "list", "--undeclared", "--json", **env)
    assert listed.returncode == 0, listed.stderr
    assert [k["id"] for k in json.loads(listed.stdout)["keys"]] == [old_dev.key.id]
    shown = cli(tmp_path, "keys", "show", old_dev.key.id, **env)
    assert shown.returncode == 0, shown.stderr
    assert "type         dev (not declared: refused)" in shown.stdout

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_CONFIG", raising=False)
    module = import_app(tmp_path, "partner_service", monkeypatch)
    gate: Keystile = module.gate
    admin = await gate.manager.create({"name": "admin", "type": "prod", "scopes": ["*"]})
    admin_auth = {"Authorization": f"Bearer {admin.secret.get_secret_value()}"}
    try:
        async with lifespan(module.app), http(module.app) as client:
            auth = {"Authorization": f"Bearer {secret}"}
            answers = [await client.get("/orders", headers=auth) for _ in range(4)]
            assert [a.status_code for a in answers] == [200, 200, 200, 429]
            assert answers[0].json() == {"caller": "partner bot", "type": "partner"}
            assert answers[0].headers["ratelimit-policy"] == '"partner";q=3;w=60'
            assert answers[3].json()["error"]["code"] == "rate_limited"

            old = {"Authorization": f"Bearer {old_dev.secret.get_secret_value()}"}
            stale = await client.get("/orders", headers=old)
            assert stale.status_code == 401
            assert stale.json()["error"]["code"] == "invalid_api_key"

            new = await client.post(
                "/keys", headers=admin_auth, json={"name": "p2", "type": "partner"}
            )
            assert new.status_code == 201, new.text
            assert new.json()["secret"].startswith("partner_")
            assert new.json()["key"]["type"] == "partner"
            stored = await gate.manager.get(new.json()["key"]["id"])
            assert stored.type == "partner"
            wrong = await client.post(
                "/keys", headers=admin_auth, json={"name": "d", "type": "dev"}
            )
            assert wrong.status_code == 422, wrong.text
            assert wrong.json()["error"]["fields"] == [
                {"field": "type", "message": "must be one of prod, client, partner"}
            ]
            listing = await client.get("/keys?type=partner", headers=admin_auth)
            assert listing.status_code == 200
            assert {k["name"] for k in listing.json()["keys"]} == {"partner bot", "p2"}
            schema = (await client.get("/openapi.json")).json()
            create = schema["paths"]["/keys"]["post"]["requestBody"]["content"]
            enum = create["application/json"]["schema"]["properties"]["type"]["enum"]
            assert enum == ["prod", "client", "partner"]
    finally:
        await gate.aclose()


async def test_a_stored_key_whose_type_is_gone_is_refused_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key whose prefix another type now has, but whose record names a type the policy
    no longer declares, is refused as not valid (never a 500), with one warning naming
    the key and its type."""
    store = MemoryStore()
    old = Keystile(secret=SECRET, store=store)
    dev = await old.manager.create({"name": "d", "type": "dev"})
    # The app renames its "dev" type "sandbox", keeping the prefix.
    types = {k: v for k, v in DEFAULT_TYPE_POLICIES.items() if k != "dev"}
    types["sandbox"] = DEFAULT_TYPE_POLICIES["dev"]
    gate = Keystile(secret=SECRET, store=store, policy=KeyPolicy(types))
    app = KeystileMiddleware(Starlette(), gate=gate)
    auth = {"Authorization": f"Bearer {dev.secret.get_secret_value()}"}
    with caplog.at_level(logging.WARNING, "keystile"):
        async with http(app) as client:
            answers = [await client.get("/", headers=auth) for _ in range(2)]
    assert [a.status_code for a in answers] == [401, 401]
    assert answers[0].json()["error"]["code"] == "invalid_api_key"
    warnings = [r.getMessage() for r in caplog.records if "not declared" in r.getMessage()]
    assert warnings == [
        f"refused key {dev.key.id}: its type 'dev' is not declared by the policy "
        "(declared: prod, client, sandbox)"
    ]
    await gate.aclose()


def test_conflicting_prefixes_stop_start_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two types with one prefix in keystile.toml: Keystile() refuses to start, naming
    the file, both types and the prefix."""
    (tmp_path / "keystile.toml").write_text('[types.partner]\nprefix = "client_"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("KEYSTILE_CONFIG", raising=False)
    with pytest.raises(ConfigurationError) as refused:
        Keystile(secret=SECRET)
    assert str(refused.value) == (
        f"{tmp_path / 'keystile.toml'}: key types 'client' and 'partner' share a prefix "
        "('client_'): each type needs its own"
    )


@pytest.mark.parametrize(
    ("rules", "mode"),
    [
        ({}, AddressMode.IGNORE),
        ({"browser": True}, AddressMode.BY_CLIENT),
        ({"watch_new_ips": True}, AddressMode.WATCH_IPS),
    ],
)
async def test_a_types_usage_mode_comes_from_its_policy(
    rules: dict[str, bool], mode: AddressMode
) -> None:
    """How usage counts a key's addresses follows its type's ``browser`` and
    ``watch_new_ips``, whatever the type is called."""
    partner = KeyTypePolicy(prefix="partner_", **rules)
    policy = KeyPolicy({**DEFAULT_TYPE_POLICIES, "partner": partner})
    gate = Keystile(secret=SECRET, policy=policy)
    created = await gate.manager.create({"name": "p", "type": "partner"})
    assert Principal(created.key, policy).ip_mode is mode
    await gate.aclose()
