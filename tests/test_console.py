"""The web console over ASGI, on the memory store and the real Redis: sign-in and its session
cookie, CSRF, security headers, projects (another project's key id answers as a missing one
on every route), create / rotate / revoke, usage, and a page of 1,000 keys (issue #16)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware

from conftest import REDIS_URL, SECRET, cleanup_namespace, new_namespace, require_redis
from keystile import Keystile, KeystileMiddleware
from keystile.admin import admin_mount, admin_rules
from keystile.console import console_mount, console_rules
from keystile.console.session import COOKIE, SESSION_SECONDS
from keystile.demo import DEMO_RULES, build_demo_app
from usage_app import http

ADMIN = ["*"]
MISSING = "key_0VgmOZcuNoSuchKey12"


@dataclass
class World:
    gate: Keystile
    app: Any
    admin: str  # alpha's admin key
    admin_id: str
    viewer: str  # alpha, admin:view_usage only
    worker: str  # alpha's dev key id
    worker_token: str
    theirs: str  # beta's key id


@pytest.fixture(params=["memory", "redis"])
async def world(request: pytest.FixtureRequest) -> AsyncIterator[World]:
    """A gate (memory or real Redis) serving the admin API and the console, with keys in two
    projects."""
    namespace = new_namespace()
    if request.param == "redis":
        require_redis()
        gate = Keystile(store=REDIS_URL, secret=SECRET, namespace=namespace)
    else:
        gate = Keystile(secret=SECRET)
    app = Starlette(
        routes=[admin_mount(gate, "/cloud/keys"), console_mount(gate, "/console")],
        middleware=[
            Middleware(
                KeystileMiddleware,
                gate=gate,
                rules=[*admin_rules("/cloud/keys"), *console_rules("/console")],
            )
        ],
    )
    create = gate.manager.create
    admin = await create(
        {"name": "alpha admin", "type": "prod", "scopes": ADMIN, "project": "alpha"}
    )
    viewer = await create(
        {"name": "viewer", "type": "prod", "scopes": ["admin:view_usage"], "project": "alpha"}
    )
    worker = await create(
        {"name": "worker", "type": "dev", "scopes": ["vec:read"], "project": "alpha"}
    )
    theirs = await create({"name": "beta key", "type": "dev", "project": "beta"})
    try:
        yield World(
            gate,
            app,
            admin.secret.get_secret_value(),
            admin.key.id,
            viewer.secret.get_secret_value(),
            worker.key.id,
            worker.secret.get_secret_value(),
            theirs.key.id,
        )
    finally:
        await gate.aclose()
        if request.param == "redis":
            cleanup_namespace(namespace)


async def sign_in(client: httpx.AsyncClient, key: str) -> httpx.Response:
    return await client.post("/console/signin", data={"key": key})


async def csrf(client: httpx.AsyncClient) -> str:
    page = await client.get("/console/keys/new")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found is not None, page.text
    return found[1]


def secret_on(page: str) -> str | None:
    found = re.search(r'id="secret" class="secret" readonly value="([^"]+)"', page)
    return found[1] if found else None


async def test_sign_in_with_an_admin_key_sets_a_strict_http_only_cookie(world: World) -> None:
    """A good admin key gets a session cookie (HttpOnly, SameSite=Strict, short-lived, not
    Secure over http) holding no part of the key; the keys page then opens."""
    async with http(world.app) as client:
        answer = await sign_in(client, world.admin)
        assert answer.status_code == 303 and answer.headers["location"] == "/console/keys"
        cookie = answer.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        flags = [f.strip().lower() for f in cookie.split(";")[1:]]
        assert "httponly" in flags and "samesite=strict" in flags
        assert "secure" not in flags and f"max-age={SESSION_SECONDS}" in flags
        assert "path=/console" in flags
        assert world.admin not in cookie and world.admin[-12:] not in cookie
        keys = await client.get("/console/keys")
        assert keys.status_code == 200 and "alpha admin" in keys.text


async def test_the_cookie_is_secure_over_https(world: World) -> None:
    """Served over https, the session cookie is Secure."""
    transport = httpx.ASGITransport(app=world.app, client=("198.51.100.7", 40_000))
    async with httpx.AsyncClient(transport=transport, base_url="https://console.test") as client:
        answer = await client.post(
            "/console/signin",
            data={"key": world.admin},
            headers={"origin": "https://console.test"},
        )
    flags = [f.strip().lower() for f in answer.headers["set-cookie"].split(";")]
    assert "secure" in flags


@pytest.mark.parametrize(
    ("which", "message"),
    [
        ("bad", "This is not a valid key."),
        ("garbage", "This is not a valid key."),
        ("viewer", "does not hold admin:manage_keys"),
        ("worker", "does not hold admin:manage_keys"),
    ],
)
async def test_a_key_that_is_not_an_admin_key_cannot_sign_in(
    world: World, which: str, message: str
) -> None:
    """An unknown key, a malformed one and a key without admin:manage_keys get 401, no
    cookie, and a message saying why."""
    token = {
        "bad": "dev_" + "A" * 40,
        "garbage": "<script>",
        "viewer": world.viewer,
        "worker": world.worker_token,
    }[which]
    async with http(world.app) as client:
        answer = await sign_in(client, token)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers
        assert message in answer.text and "<script>" not in answer.text
        assert (await client.get("/console/keys")).status_code == 303


async def test_a_tampered_or_expired_cookie_is_refused(world: World) -> None:
    """A cookie changed by one character, or past its expiry, signs nobody in."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        value = client.cookies[COOKIE]
    body, signature = value.split(".")
    flipped = signature[:-1] + ("A" if signature[-1] != "A" else "B")
    for forged in (f"{body}.{flipped}", f"{body[:-2]}x.{signature}", "x.y", ""):
        async with http(world.app) as client:
            client.cookies.set(COOKIE, forged)
            answer = await client.get("/console/keys")
            assert answer.status_code == 303
            assert answer.headers["location"].startswith("/console/signin")
    world.gate.clock = lambda: 10**10  # long after the session's end
    async with http(world.app) as client:
        client.cookies.set(COOKIE, value)
        assert (await client.get("/console/keys")).status_code == 303


async def test_revoking_the_admin_key_signs_its_session_out(world: World) -> None:
    """Every page reads the key again: once it is revoked, the session is over."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        assert (await client.get("/console/keys")).status_code == 200
        await world.gate.manager.revoke(world.admin_id)
        answer = await client.get("/console/keys")
        assert answer.status_code == 303
        assert f"{COOKIE}=" in answer.headers["set-cookie"]  # cleared
        posted = await client.post("/console/keys/new", data={"csrf": "x", "name": "n"})
        assert posted.status_code == 403


@pytest.mark.parametrize("token", [None, "", "wrong"])
async def test_a_write_without_the_sessions_csrf_token_is_refused(
    world: World, token: str | None
) -> None:
    """A form without the session's CSRF token, or with another, is refused 403 and
    changes nothing; so is a form from another origin."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data = {"name": "sneaky", "type": "dev"}
        if token is not None:
            data["csrf"] = token
        answer = await client.post("/console/keys/new", data=data)
        assert answer.status_code == 403
        revoke = await client.post(f"/console/keys/{world.worker}/revoke", data=data)
        assert revoke.status_code == 403
        good = await csrf(client)
        foreign = await client.post(
            f"/console/keys/{world.worker}/revoke",
            data={"csrf": good},
            headers={"origin": "https://evil.example"},
        )
        assert foreign.status_code == 403
    assert not (await world.gate.manager.get(world.worker)).revoked
    names = [k.name for k in (await world.gate.manager.list()).keys]
    assert "sneaky" not in names


async def test_every_page_sends_a_strict_content_security_policy(world: World) -> None:
    """CSP without inline script, framing refused, nosniff, no referrer, no caching of
    pages; the sign-in page and a 404 too."""
    async with http(world.app) as client:
        answers = [await client.get("/console/signin"), await client.get("/console/nowhere")]
        await sign_in(client, world.admin)
        answers += [await client.get("/console/keys"), await client.get("/console/audit")]
    for answer in answers:
        policy = answer.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert answer.headers["referrer-policy"] == "same-origin"
        assert answer.headers["cache-control"] == "no-store"
        assert "<script>" not in answer.text and " style=" not in answer.text


BOLA_ROUTES = [
    ("GET", "/console/keys/{id}"),
    ("GET", "/console/keys/{id}/edit"),
    ("POST", "/console/keys/{id}/edit"),
    ("GET", "/console/keys/{id}/rotate"),
    ("POST", "/console/keys/{id}/rotate"),
    ("GET", "/console/keys/{id}/revoke"),
    ("POST", "/console/keys/{id}/revoke"),
    ("GET", "/console/keys/{id}/alert-rules"),
    ("POST", "/console/keys/{id}/alert-rules"),
    ("POST", "/console/keys/{id}/alert-rules/clear"),
]


@pytest.mark.parametrize(("method", "path"), BOLA_ROUTES)
async def test_another_projects_key_answers_exactly_as_a_missing_one(
    world: World, method: str, path: str
) -> None:
    """On every console route, another project's key id gets the very page a missing id
    gets (404), and the key is untouched."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        token = await csrf(client)

        async def call(key_id: str) -> httpx.Response:
            data = {"csrf": token, "name": "taken", "grace": "0"} if method == "POST" else None
            return await client.request(method, path.format(id=key_id), data=data)

        theirs, nobodys = await call(world.theirs), await call(MISSING)
    assert theirs.status_code == nobodys.status_code == 404
    assert theirs.text == nobodys.text
    assert world.theirs not in theirs.text
    record = await world.gate.manager.get(world.theirs)
    assert record.name == "beta key" and not record.revoked and record.replaced_by is None
    assert (await world.gate.manager.key_alert_rules(world.theirs)).overrides == {}


async def test_the_keys_page_lists_the_own_project_only_with_filters(world: World) -> None:
    """The keys page shows the project's keys (never another project's), filtered by type,
    status and name; a bad filter is a 400 page."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        page = (await client.get("/console/keys")).text
        assert "alpha admin" in page and "worker" in page and "beta key" not in page
        assert world.theirs not in page
        dev = (await client.get("/console/keys", params={"type": "dev"})).text
        assert "worker" in dev and "alpha admin" not in dev
        named = (await client.get("/console/keys", params={"q": "VIEW"})).text
        assert "viewer" in named and "worker" not in named
        await world.gate.manager.revoke(world.worker)
        revoked = (await client.get("/console/keys", params={"status": "revoked"})).text
        assert "worker" in revoked and "viewer" not in revoked
        for bad in ({"type": "root"}, {"status": "dead"}, {"cursor": "!!"}):
            answer = await client.get("/console/keys", params=bad)
            assert answer.status_code == 400 and "Bad request" in answer.text


@pytest.mark.parametrize(
    ("fields", "prefix"),
    [
        ({"type": "dev", "scopes": ["vec:read", "kev:write"]}, "dev_"),
        (
            {"type": "prod", "scopes": ["data:read"], "allowed_ips": "203.0.113.7\n10.0.0.0/8"},
            "prod_",
        ),
        (
            {"type": "client", "scopes": ["vec:read"], "allowed_origins": "https://app.example"},
            "client_",
        ),
    ],
    ids=["dev", "prod", "client"],
)
async def test_a_key_made_through_the_form_is_shown_once_and_works(
    world: World, fields: dict[str, Any], prefix: str
) -> None:
    """Creating a key of each type: the secret is shown once (then 410, never again), the
    record holds what the form said, in the admin's project, and the key authenticates."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data = {"csrf": await csrf(client), "name": f"made {prefix}", **fields}
        answer = await client.post("/console/keys/new", data=data)
        assert answer.status_code == 303
        shown = await client.get(answer.headers["location"])
        assert shown.status_code == 200 and shown.headers["cache-control"] == "no-store"
        assert "copy it now, it will only be shown once" in shown.text.lower()
        secret = secret_on(shown.text)
        assert secret is not None and secret.startswith(prefix)
        again = await client.get(answer.headers["location"])
        assert again.status_code == 410 and secret not in again.text
        listing = (await client.get("/console/keys")).text
        assert secret not in listing
    record = await world.gate.store.find(world.gate.hasher.digest(secret))
    assert record is not None and record.project == "alpha" and record.name == f"made {prefix}"
    assert set(record.scopes) == set(fields["scopes"])
    if "allowed_ips" in fields:
        assert (
            record.allowed_ips == ("203.0.113.7/32", "10.0.0.0/8") or len(record.allowed_ips) == 2
        )
    if "allowed_origins" in fields:
        assert record.allowed_origins == ("https://app.example",)
    async with http(world.app) as client:
        usage = await client.get(
            f"/cloud/keys/{record.id}", headers={"Authorization": f"Bearer {world.admin}"}
        )
        assert usage.status_code == 200


async def test_validation_messages_stand_beside_their_fields(world: World) -> None:
    """A bad form comes back 422 with each field's message beside it, what was typed kept,
    and no key made."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data = {
            "csrf": await csrf(client),
            "name": "browser key",
            "type": "client",
            "scopes": ["vec:read", "admin:manage_keys"],
            "allowed_origins": "",
            "expires_at": "yesterday",
        }
        answer = await client.post("/console/keys/new", data=data)
        assert answer.status_code == 422
        assert 'id="expires_at-error"' in answer.text and "must be a date" in answer.text
        data["expires_at"] = "2001-01-01"
        answer = await client.post("/console/keys/new", data=data)
        assert answer.status_code == 422
        scopes = re.search(r'id="scopes-error">(.*?)</div>', answer.text)
        assert scopes is not None and "may not hold" in scopes[1]
        origins = re.search(r'id="allowed_origins-error">(.*?)</div>', answer.text)
        assert origins is not None and "at least one origin" in origins[1]
        expiry = re.search(r'id="expires_at-error">(.*?)</div>', answer.text)
        assert expiry is not None and "not in the future" in expiry[1]
        assert 'value="browser key"' in answer.text
    names = [k.name for k in (await world.gate.manager.list()).keys]
    assert "browser key" not in names


async def test_rotate_and_revoke_through_the_console(world: World) -> None:
    """Rotating shows the successor's secret once and gives the old key its grace; revoking
    (after its confirmation page) refuses the key at once."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        token = await csrf(client)
        confirm = await client.get(f"/console/keys/{world.worker}/rotate")
        assert confirm.status_code == 200 and 'name="grace"' in confirm.text
        bad = await client.post(
            f"/console/keys/{world.worker}/rotate", data={"csrf": token, "grace": "5"}
        )
        assert bad.status_code == 400
        rotated = await client.post(
            f"/console/keys/{world.worker}/rotate", data={"csrf": token, "grace": "3600"}
        )
        assert rotated.status_code == 303
        secret = secret_on((await client.get(rotated.headers["location"])).text)
        assert secret is not None and secret.startswith("dev_")
        old = await world.gate.manager.get(world.worker)
        assert old.replaced_by is not None and old.expires_at is not None
        successor = old.replaced_by
        question = await client.get(f"/console/keys/{successor}/revoke")
        assert question.status_code == 200 and "cannot be undone" in question.text
        assert not (await world.gate.manager.get(successor)).revoked
        done = await client.post(f"/console/keys/{successor}/revoke", data={"csrf": token})
        assert done.status_code == 303
        assert (await world.gate.manager.get(successor)).revoked
        api = await client.get("/cloud/keys/", headers={"Authorization": f"Bearer {secret}"})
        assert api.status_code == 401


async def test_editing_a_key_changes_what_the_form_changed(world: World) -> None:
    """The edit form renames a key and changes its scopes; the audit trail shows it."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data = {"csrf": await csrf(client), "name": "renamed", "scopes": ["vec:read", "vec:write"]}
        answer = await client.post(f"/console/keys/{world.worker}/edit", data=data)
        assert answer.status_code == 303
        record = await world.gate.manager.get(world.worker)
        assert record.name == "renamed" and set(record.scopes) == {"vec:read", "vec:write"}
        audit = await client.get("/console/audit", params={"action": "update"})
        assert audit.status_code == 200 and world.worker in audit.text
        bad = await client.get("/console/audit", params={"action": "explode"})
        assert bad.status_code == 400


async def test_the_usage_page_shows_the_requests_made(world: World) -> None:
    """After requests with a key, its page shows them: the totals, the chart's bars and
    the busiest address."""
    demo = build_demo_app(world.gate)
    async with http(demo, ip="203.0.113.9") as client:
        for _ in range(3):
            await client.get(
                "/cloud/vec/databases", headers={"Authorization": f"Bearer {world.worker_token}"}
            )
        await client.delete(
            "/cloud/vec/databases/x", headers={"Authorization": f"Bearer {world.worker_token}"}
        )
        await sign_in(client, world.admin)
        page = await client.get(f"/console/keys/{world.worker}")
    assert page.status_code == 200
    assert re.search(r'id="hour-requests">4<', page.text)
    assert re.search(r'id="hour-errors">1<', page.text)
    assert re.search(r'id="hour-error-rate">25.0 %<', page.text)
    assert 'id="chart-hour"' in page.text and 'data-total="4"' in page.text
    assert "203.0.113.9" in page.text
    assert "Alert rules" in page.text


async def test_a_page_of_a_thousand_keys_reads_a_bounded_amount(world: World) -> None:
    """With 1,000 keys in the project the keys page shows 50 of them and a next page, from
    at most three listing reads and one last-use read per key shown."""
    for start in range(0, 1000, 50):
        for index in range(start, start + 50):
            await world.gate.manager.create(
                {"name": f"bulk {index:04}", "type": "dev", "project": "alpha"}
            )
    store = world.gate.store.store
    usage = world.gate.manager.usage_reader.store
    counts = {"list": 0, "last_use": 0}
    original_list, original_last = store.list_keys, usage.last_use

    async def list_keys(**kwargs: Any) -> Any:
        counts["list"] += 1
        return await original_list(**kwargs)

    async def last_use(key_id: str) -> Any:
        counts["last_use"] += 1
        return await original_last(key_id)

    store.list_keys = list_keys  # type: ignore[method-assign]
    usage.last_use = last_use  # type: ignore[method-assign]
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        counts.update(list=0, last_use=0)
        page = await client.get("/console/keys")
        assert page.status_code == 200
        assert page.text.count('<details class="menu">') == 50
        assert 'rel="next"' in page.text
        assert counts["list"] <= 3 and counts["last_use"] == 50
        found = await client.get("/console/keys", params={"q": "bulk 0999"})
        assert found.text.count('<details class="menu">') == 1


async def test_the_demo_mounts_the_console(world: World) -> None:
    """The demo app answers the console at /console, without an API key."""
    app = build_demo_app(world.gate)
    assert any(r.path == "/console/{path:path}" for r in DEMO_RULES) is False
    async with http(app) as client:
        signin = await client.get("/console/signin")
        assert signin.status_code == 200 and 'name="key"' in signin.text
        css = await client.get("/console/static/console.css")
        assert css.status_code == 200 and css.headers["content-type"].startswith("text/css")


async def test_the_readmes_console_example_serves_the_sign_in_page() -> None:
    """The README's mounting example, run as written, serves the console without a key and
    still guards the admin API."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    [block] = [
        b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "console_mount" in b
    ]
    namespace: dict[str, Any] = {}
    exec(block, namespace)
    async with http(namespace["app"]) as client:
        signin = await client.get("/console/signin")
        assert signin.status_code == 200 and 'name="key"' in signin.text
        assert (await client.get("/console/keys")).status_code == 303
        assert (await client.get("/cloud/keys/")).status_code == 401
    await namespace["gate"].aclose()


BAD_REQUESTS = [
    ("GET", "/console/audit?cursor=nonsense", None, None),
    ("GET", "/console/audit?outcome=maybe", None, None),
    ("GET", "/console/keys?q=" + "x" * 300, None, None),
    ("GET", "/console/keys/%00%ff", None, None),
    ("GET", "/console/static/..%2F..%2Fetc%2Fpasswd", None, None),
    ("PUT", "/console/keys", None, None),
    ("POST", "/console/keys/new", b"\xff\xfe=\xff", "application/x-www-form-urlencoded"),
    ("POST", "/console/keys/new", b'{"name": "x"}', "application/json"),
    ("POST", "/console/keys/new", b"a=" + b"b" * 70_000, "application/x-www-form-urlencoded"),
    ("POST", "/console/signin", b"key=\xc3\xa9\xff", "application/x-www-form-urlencoded"),
    ("POST", "/console/signin", "key=ключ".encode(), "application/x-www-form-urlencoded"),
    ("POST", "/console/signin", b"", "text/plain"),
]


@pytest.mark.parametrize(("method", "path", "body", "kind"), BAD_REQUESTS)
async def test_bad_input_gets_a_4xx_page_never_a_500(
    world: World, method: str, path: str, body: bytes | None, kind: str | None
) -> None:
    """Malformed filters, ids, bodies and methods get a 4xx page with the console's
    headers, never a server error."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        headers = {"content-type": kind} if kind else {}
        answer = await client.request(method, path, content=body, headers=headers)
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert "content-security-policy" in answer.headers


async def test_bad_fields_in_a_signed_form_get_422_beside_the_fields(world: World) -> None:
    """An over-long name, a malformed address and an impossible date are field errors."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data = {
            "csrf": await csrf(client),
            "name": "n" * 500,
            "type": "prod",
            "allowed_ips": "999.1.1.1",
            "expires_at": "2027-02-30",
        }
        answer = await client.post("/console/keys/new", data=data)
    assert answer.status_code == 422
    assert 'id="expires_at-error"' in answer.text
    data["expires_at"] = ""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data["csrf"] = await csrf(client)
        answer = await client.post("/console/keys/new", data=data)
    assert answer.status_code == 422
    assert 'id="name-error"' in answer.text and 'id="allowed_ips-error"' in answer.text
    data["type"] = "root"
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data["csrf"] = await csrf(client)
        answer = await client.post("/console/keys/new", data=data)
    assert answer.status_code == 422 and 'id="type-error"' in answer.text


async def test_signing_out_clears_the_cookie(world: World) -> None:
    """Sign out (a CSRF-checked form) clears the cookie; the console then asks to sign in."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        answer = await client.post("/console/signout", data={"csrf": await csrf(client)})
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/console/signin")
        assert 'keystile_console=""' in answer.headers["set-cookie"]
        assert (await client.get("/console/keys")).status_code == 303


async def test_the_keys_page_shows_alerts_raised_for_the_key(world: World) -> None:
    """An alert the gate raises for a key appears on that key's page, with the rules."""
    from datetime import UTC, datetime

    from keystile.alerts import Alert

    alert = Alert(
        rule="error_rate",
        key_id=world.worker,
        message="half the answers are errors",
        at=datetime.now(UTC),
    )
    for callback in world.gate.alerts.callbacks:
        callback(alert)
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        page = (await client.get(f"/console/keys/{world.worker}")).text
        other = (await client.get(f"/console/keys/{world.admin_id}")).text
    assert "half the answers are errors" in page and 'id="alert-rules"' in page
    assert "half the answers are errors" not in other


async def test_fastapi_mounts_the_console(world: World) -> None:
    """A FastAPI app mounts console_app at /console; the bare path leads to the keys."""
    from fastapi import FastAPI

    from keystile.console import console_app

    app = FastAPI()
    app.mount("/console", console_app(world.gate))
    app.add_middleware(KeystileMiddleware, gate=world.gate, rules=console_rules("/console"))
    async with http(app) as client:
        await sign_in(client, world.admin)
        keys = await client.get("/console/keys")
        assert keys.status_code == 200 and "alpha admin" in keys.text
        bare = await client.get("/console", follow_redirects=True)
        assert bare.status_code == 200 and str(bare.url).endswith("/console/keys")


async def test_the_demo_prints_the_consoles_address(world: World) -> None:
    """`keystile demo` tells where the console is and which key signs in."""
    import io

    from keystile.demo import seed_demo_keys
    from keystile.demo_server import print_keys

    out = io.StringIO()
    print_keys(out, "http://127.0.0.1:8000", await seed_demo_keys(world.gate), "memory")
    assert "open http://127.0.0.1:8000/console and sign in with the admin key" in out.getvalue()
