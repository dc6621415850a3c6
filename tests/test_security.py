"""Security properties the rest of the suite does not pin down on its own."""

from __future__ import annotations

import io
import re
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import Mount

from conftest import SECRET
from keystile import ApiKey, KeyManager, KeystileMiddleware, KeyValidationError, ManualClock
from keystile.admin import admin_app
from keystile.cli import build_parser, execute
from keystile.clock import to_datetime
from keystile.gate import Keystile
from keystile.keys import new_key_id
from keystile.models import DEFAULT_POLICY
from keystile.stores import KeyStore

# -- item 7: a wildcard origin may not cover a public suffix -----------------------------------

PUBLIC_SUFFIX_WILDCARDS = [
    pytest.param("https://*.co.uk", "co.uk", id="co-uk"),
    pytest.param("https://*.vercel.app", "vercel.app", id="vercel-app-private"),
    pytest.param("https://*.github.io", "github.io", id="github-io-private"),
    pytest.param("https://*.com", "com", id="com"),
    pytest.param("https://*.uk", "uk", id="uk"),
    pytest.param("https://*.example.co.uk", None, id="example-co-uk"),
    pytest.param("https://*.myapp.vercel.app", None, id="myapp-vercel-app"),
    pytest.param("https://*.example.com", None, id="example-com"),
]


def client_settings(*origins: str) -> dict[str, Any]:
    return {"name": "web", "type": "client", "scopes": ["vec:read"], "allowed_origins": origins}


@pytest.mark.parametrize(("entry", "suffix"), PUBLIC_SUFFIX_WILDCARDS)
def test_item7_a_wildcard_over_a_public_suffix_is_refused(entry: str, suffix: str | None) -> None:
    """A new key's wildcard origin over a public suffix (ICANN or private section of the
    list) is a validation error on that entry naming the suffix; one under a registrable
    domain is accepted."""
    settings = client_settings("https://app.example.com", entry)
    if suffix is None:
        made = DEFAULT_POLICY.validate(settings, now=to_datetime(0))
        assert made.allowed_origins[1] == entry
        return
    with pytest.raises(KeyValidationError) as refused:
        DEFAULT_POLICY.validate(settings, now=to_datetime(0))
    [error] = refused.value.errors
    assert error.field == "allowed_origins[1]"
    assert f"{suffix!r}" in error.message


@pytest.fixture
async def admin_http(store: KeyStore, clock: ManualClock) -> Any:
    """An HTTP client on the admin API (each backend), with a key allowed to manage keys."""
    gate = Keystile(store=store, secret=SECRET, clock=clock)
    app = Starlette(
        routes=[Mount("/cloud/keys", app=admin_app(gate))],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )
    created = await gate.manager.create(
        {"name": "admin", "type": "prod", "scopes": ["admin:manage_keys"]}
    )
    token = created.secret.get_secret_value()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://test/cloud/keys",
        headers={"Authorization": f"Bearer {token}"},
    ) as http:
        yield http
    await gate.aclose()


def refusal_fields(response: httpx.Response) -> dict[str, str]:
    assert response.status_code == 422, response.text
    return {f["field"]: f["message"] for f in response.json()["error"]["fields"]}


async def test_item7_the_admin_api_answers_422_naming_the_suffix(admin_http: Any) -> None:
    """POST and PATCH with a wildcard over a public suffix answer 422 naming the entry and
    the suffix; nothing is created, the key is left as it was."""
    http: httpx.AsyncClient = admin_http
    fields = refusal_fields(await http.post("/", json=client_settings("https://*.vercel.app")))
    assert list(fields) == ["allowed_origins[0]"]
    assert "'vercel.app'" in fields["allowed_origins[0]"]
    assert len((await http.get("/")).json()["keys"]) == 1  # the admin key alone

    made = await http.post("/", json=client_settings("https://*.myapp.vercel.app"))
    assert made.status_code == 201, made.text
    key = made.json()["key"]
    origins = ["https://app.example.com", "https://*.github.io"]
    fields = refusal_fields(await http.patch(f"/{key['id']}", json={"allowed_origins": origins}))
    assert list(fields) == ["allowed_origins[1]"]
    assert "'github.io'" in fields["allowed_origins[1]"]
    assert (await http.get(f"/{key['id']}")).json()["key"] == key


async def test_item7_the_command_line_refuses_with_one_line(manager: KeyManager) -> None:
    """keys create and keys update with a wildcard over a public suffix exit 2 with one line
    naming the suffix, and change nothing."""

    async def run(*argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await execute(build_parser().parse_args(list(argv)), manager, out, err)
        return code, out.getvalue(), err.getvalue()

    create = ("keys", "create", "--name", "web", "--type", "client", "--scope", "vec:read")
    code, out, err = await run(*create, "--origin", "https://*.co.uk")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and "allowed_origins[0]" in err and "'co.uk'" in err
    assert (await manager.list()).keys == ()

    code, out, err = await run(*create, "--origin", "https://*.example.co.uk")
    assert code == 0, err
    [key] = (await manager.list()).keys
    code, out, err = await run("keys", "update", key.id, "--origin", "https://*.github.io")
    assert (code, out) == (2, "")
    assert len(err.splitlines()) == 1 and "'github.io'" in err
    assert await manager.get(key.id) == key


async def test_item7_a_key_stored_before_the_rule_still_loads(
    manager: KeyManager, clock: ManualClock
) -> None:
    """A key that already holds such a wildcard (stored before the rule) still loads and can
    be renamed — only settings being changed are judged — but it cannot be rotated into a
    new key, nor be given the wildcard again."""
    record = ApiKey(
        id=new_key_id(clock()),
        name="old",
        type="client",
        hint="client_...old1",
        scopes=("vec:read",),
        allowed_origins=("https://*.vercel.app",),
        created_at=to_datetime(clock()),
    )
    await manager.store.add(record, "0" * 64)
    renamed = await manager.update(record.id, name="renamed")
    assert (renamed.name, renamed.allowed_origins) == ("renamed", ("https://*.vercel.app",))
    with pytest.raises(KeyValidationError, match=re.escape("'vercel.app'")):
        await manager.rotate(record.id)
    with pytest.raises(KeyValidationError, match=re.escape("'vercel.app'")):
        await manager.update(record.id, allowed_origins=["https://*.vercel.app"])
    assert await manager.get(record.id) == renamed
