"""The console under attack, over ASGI on the memory store and the real Redis: what an
attacker tries against its sessions, forms, pages and memory, and what they get."""

from __future__ import annotations

import logging
import secrets
import time
from unittest import mock

import pytest
import redis
from starlette.applications import Starlette
from starlette.routing import Mount

import test_console
from conftest import REDIS_URL
from keystile import Keystile
from keystile.console import Console, console_mount
from keystile.console.session import COOKIE
from keystile.console.slots import SLOTS
from test_console import MISSING, World, csrf, secret_on, sign_in
from usage_app import http

world = test_console.world  # the fixture: a gate on memory and on Redis, two projects


async def test_an_admin_key_with_an_ip_allowlist_signs_in_only_from_its_addresses(
    world: World,
) -> None:
    """An admin key limited to some addresses is refused by the console from any other, as
    the API refuses it; a session opened from an allowed address ends when used from
    elsewhere."""
    made = await world.gate.manager.create(
        {
            "name": "office admin",
            "type": "prod",
            "scopes": ["*"],
            "project": "alpha",
            "allowed_ips": ["10.0.0.0/8"],
        }
    )
    token = made.secret.get_secret_value()
    async with http(world.app, ip="198.51.100.7") as client:
        api = await client.get("/cloud/keys/", headers={"Authorization": f"Bearer {token}"})
        assert api.status_code == 403
        answer = await sign_in(client, token)
        assert answer.status_code == 401 and "set-cookie" not in answer.headers
        assert "not allowed from this address" in answer.text
    async with http(world.app, ip="10.1.2.3") as client:
        assert (await sign_in(client, token)).status_code == 303
        assert (await client.get("/console/keys")).status_code == 200
        cookie = client.cookies[COOKIE]
    async with http(world.app, ip="198.51.100.7") as client:
        client.cookies.set(COOKIE, cookie)
        away = await client.get("/console/keys")
        assert away.status_code == 303 and away.headers["location"].startswith("/console/signin")
        posted = await client.post("/console/signout", data={"csrf": "x"})
        assert posted.status_code == 403


async def test_behind_a_trusted_proxy_the_allowlist_reads_the_forwarded_address(
    world: World,
) -> None:
    """With the middleware's trusted proxies given to the console, the address the
    allowlist checks is the one the proxy forwarded, and only from that proxy."""
    made = await world.gate.manager.create(
        {
            "name": "proxied",
            "type": "prod",
            "scopes": ["*"],
            "project": "alpha",
            "allowed_ips": ["10.0.0.0/8"],
        }
    )
    token = made.secret.get_secret_value()
    app = Starlette(routes=[console_mount(world.gate, trusted_proxies=["192.0.2.1"])])
    forwarded = {"x-forwarded-for": "10.9.9.9"}
    async with http(app, ip="192.0.2.1") as client:
        client.headers.update(forwarded)
        answer = await client.post("/console/signin", data={"key": token})
        assert answer.status_code == 303
        revoke = await client.post(
            f"/console/keys/{world.worker}/revoke", data={"csrf": await csrf(client)}
        )
        assert revoke.status_code == 303
    [event] = (await world.gate.manager.history(key_id=world.worker, action="revoke")).events
    assert event.actor.address == "10.9.9.9"  # the client's, not the proxy's
    async with http(app, ip="198.51.100.7") as client:
        answer = await client.post("/console/signin", data={"key": token}, headers=forwarded)
        assert answer.status_code == 401


HOSTILE = "\"'><script>alert(1)</script><svg onload=alert(2)>"


async def test_hostile_text_is_escaped_on_every_page_that_shows_it(world: World) -> None:
    """A key name, a search, a filter, an alert and a refused sign-in carrying markup come
    back as text: no element, no attribute breaks out, on any page that shows them."""
    from datetime import UTC, datetime

    from keystile.alerts import Alert

    made = await world.gate.manager.create(
        {"name": HOSTILE, "type": "dev", "scopes": ["vec:read"], "project": "alpha"}
    )
    alert = Alert(rule=HOSTILE, key_id=made.key.id, message=HOSTILE, at=datetime.now(UTC))
    for callback in world.gate.alerts.callbacks:
        callback(alert)
    async with http(world.app) as client:
        refused = await sign_in(client, HOSTILE)
        await sign_in(client, world.admin)
        token = await csrf(client)
        edit = await client.post(
            f"/console/keys/{made.key.id}/edit",
            data={"csrf": token, "name": HOSTILE, "expires_at": HOSTILE, "scopes": HOSTILE},
        )
        pages = [
            refused,
            edit,
            await client.get("/console/keys"),
            await client.get("/console/keys", params={"q": HOSTILE[:40]}),
            await client.get("/console/audit", params={"key_id": HOSTILE}),
            await client.get(f"/console/keys/{made.key.id}"),
            await client.get(f"/console/keys/{made.key.id}/edit"),
            await client.get(f"/console/keys/{made.key.id}/rotate"),
            await client.get(f"/console/keys/{made.key.id}/revoke"),
            await client.get(f"/console/keys/{HOSTILE}"),
        ]
    for page in pages:
        assert "<script>alert" not in page.text and "<svg onload" not in page.text, page.url
        assert "'><" not in page.text and '"><script' not in page.text
    assert "&lt;script&gt;alert(1)" in pages[2].text  # shown, as text


async def test_the_audit_filter_on_another_projects_key_shows_what_a_missing_id_shows(
    world: World,
) -> None:
    """Filtering the audit trail by another project's key id (whose creation is in its own
    project's trail) shows the very page a missing id shows: no event, no hint."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        theirs = await client.get("/console/audit", params={"key_id": world.theirs})
        nobodys = await client.get("/console/audit", params={"key_id": MISSING})
    assert theirs.status_code == nobodys.status_code == 200
    assert theirs.text.replace(world.theirs, MISSING) == nobodys.text
    assert "No events match." in theirs.text


async def test_a_cookie_is_worth_nothing_on_a_gate_with_another_secret(world: World) -> None:
    """A session signed by one gate does not open another gate's console (another server
    secret), even when that gate holds the very key the session names."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        cookie = client.cookies[COOKIE]
    other = Keystile(store=world.gate.store, secret="another-server-secret-0123456789ab")
    app = Starlette(routes=[console_mount(other)])
    async with http(app) as client:
        client.cookies.set(COOKIE, cookie)
        answer = await client.get("/console/keys")
    await other.shutdown()  # the store is the world's: closed with it
    assert answer.status_code == 303 and answer.headers["location"].startswith("/console/signin")


async def test_a_session_ends_twelve_hours_after_sign_in_however_busy(world: World) -> None:
    """Used every 20 minutes, a session is renewed, but never past 12 hours from signing
    in; a cookie re-signed with a later expiry does not exist without the secret."""
    now = [1_900_000_000.0]
    world.gate.clock = lambda: now[0]
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        opened = 0
        for _ in range(40):  # 40 x 20 minutes = 13 h 20
            now[0] += 20 * 60
            if (await client.get("/console/keys")).status_code != 200:
                break
            opened += 1
    assert opened == 35  # 35 x 20 min = 11 h 40; the next click is past 12 h


async def test_forms_from_a_null_or_foreign_origin_are_refused(world: World) -> None:
    """``Origin: null`` (a sandboxed frame, a data: URL) and another site's origin are
    refused on the sign-in form and on every write, even with a good token."""
    async with http(world.app) as client:
        for origin in ("null", "https://evil.example", "http://api.test.evil.example"):
            answer = await client.post(
                "/console/signin", data={"key": world.admin}, headers={"origin": origin}
            )
            assert answer.status_code == 403 and "set-cookie" not in answer.headers
        await sign_in(client, world.admin)
        token = await csrf(client)
        for origin in ("null", "https://evil.example", "http://api.test:81"):
            answer = await client.post(
                f"/console/keys/{world.worker}/revoke",
                data={"csrf": token},
                headers={"origin": origin},
            )
            assert answer.status_code == 403
    assert not (await world.gate.manager.get(world.worker)).revoked


async def test_a_head_request_does_not_use_up_the_secret_shown_once(world: World) -> None:
    """The page showing a new key's secret is used up by the GET that shows it, not by a
    HEAD (a link checker, a prefetcher): the secret is still there for the GET, then gone."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        data = {"csrf": await csrf(client), "name": "headed", "type": "dev"}
        made = await client.post("/console/keys/new", data=data)
        where = made.headers["location"]
        head = await client.head(where)
        assert head.status_code == 200 and head.headers["cache-control"] == "no-store"
        shown = await client.get(where)
        assert shown.status_code == 200 and secret_on(shown.text) is not None
        assert (await client.get(where)).status_code == 410


async def test_a_session_follows_its_key_through_a_rotation_and_its_grace(world: World) -> None:
    """A session names the key it signed in with, never the successor: rotating that key
    with a grace period leaves the session open as long as the old key works, and not a
    second longer; rotating it "at once" ends the session at the next click."""
    now = [time.time()]
    world.gate.clock = world.gate.manager.clock = lambda: now[0]
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        token = await csrf(client)
        rotated = await client.post(
            f"/console/keys/{world.admin_id}/rotate", data={"csrf": token, "grace": "3600"}
        )
        assert rotated.status_code == 303
        for _ in range(2):
            now[0] += 1700
            assert (await client.get("/console/keys")).status_code == 200
        now[0] += 250  # the old key's grace is over
        answer = await client.get("/console/keys")
        assert answer.status_code == 303 and answer.headers["location"].startswith("/console/")
    successor = (await world.gate.manager.get(world.admin_id)).replaced_by
    assert successor is not None
    record = await world.gate.manager.get(successor)
    async with http(world.app) as client:
        made = await world.gate.manager.rotate(record.id, grace=3600)
        await sign_in(client, made.secret.get_secret_value())
        assert (await client.get("/console/keys")).status_code == 200
        again = await client.post(
            f"/console/keys/{made.key.id}/rotate",
            data={"csrf": await csrf(client), "grace": "0"},
        )
        assert again.status_code == 303
        assert (await client.get("/console/keys")).status_code == 303


async def test_a_flood_of_bad_sign_ins_writes_a_bounded_number_of_log_lines(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """Refused sign-ins are logged, but an attacker trying keys writes at most one line
    every 10 seconds (with how many were refused since), as the API's failed
    authentications write none: the log cannot be flooded, and the count is kept."""
    caplog.set_level(logging.INFO, logger="keystile.console")
    async with http(world.app) as client:
        for index in range(60):
            answer = await sign_in(client, f"dev_{index:040}" if index % 2 else world.viewer)
            assert answer.status_code == 401
    refused = [r for r in caplog.records if "sign-in refused" in r.getMessage()]
    assert len(refused) == 1 and world.viewer not in refused[0].getMessage()
    caplog.clear()
    monotonic = time.monotonic() + 11
    with mock.patch("keystile.console.access.monotonic", return_value=monotonic):
        async with http(world.app) as client:
            assert (await sign_in(client, world.viewer)).status_code == 401
            assert (await sign_in(client, world.admin)).status_code == 303
    [line, signed_in] = [r.getMessage() for r in caplog.records if r.name == "keystile.console"]
    assert "59 more refused since the last report" in line and world.viewer not in line
    assert "signed in" in signed_in


def _redis_dump(namespace: str) -> bytes:
    """Every name and value under ``namespace`` on the test Redis, as bytes."""
    client = redis.Redis.from_url(REDIS_URL)
    out = bytearray()
    try:
        for name in client.scan_iter(match=f"{namespace}:*", count=1000):
            out += name
            kind = client.type(name)
            if kind == b"string":
                out += client.get(name) or b""
            elif kind == b"hash":
                for field, value in client.hgetall(name).items():
                    out += field + value
            elif kind == b"list":
                out += b"".join(client.lrange(name, 0, -1))
            elif kind == b"set":
                out += b"".join(client.smembers(name))
            elif kind == b"zset":
                out += b"".join(client.zrange(name, 0, -1))
            elif kind == b"stream":
                for _, entry in client.xrange(name):
                    for field, value in entry.items():
                        out += field + value
    finally:
        client.close()
    return bytes(out)


async def test_secrets_stay_out_of_urls_cookies_the_audit_trail_and_the_store(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    """A created and a rotated key's secret, and the admin key that signed in, appear on
    the one page that shows a secret and nowhere else: not in a redirect, a cookie, the
    audit trail, the log, nor (on Redis) any name or value kept."""
    caplog.set_level(logging.DEBUG)
    seen: list[str] = []
    async with http(world.app) as client:
        signed = await sign_in(client, world.admin)
        seen += [signed.headers["location"], signed.headers["set-cookie"]]
        token = await csrf(client)
        made = await client.post(
            "/console/keys/new", data={"csrf": token, "name": "fresh", "type": "dev"}
        )
        rotated = await client.post(
            f"/console/keys/{world.worker}/rotate", data={"csrf": token, "grace": "0"}
        )
        secrets = []
        for answer in (made, rotated):
            seen += [answer.headers["location"], answer.headers["set-cookie"]]
            page = await client.get(answer.headers["location"])
            assert page.headers["cache-control"] == "no-store"
            secret = secret_on(page.text)
            assert secret is not None
            secrets.append(secret)
            seen.append(page.headers["set-cookie"])
        for path in ("/console/keys", "/console/audit", f"/console/keys/{world.worker}"):
            seen.append((await client.get(path)).text)
    trail = await world.gate.manager.history(limit=1000)
    seen += [event.model_dump_json() for event in trail.events]
    seen += [record.getMessage() + str(record.__dict__) for record in caplog.records]
    namespace = world.gate.settings.namespace
    stored = _redis_dump(namespace).decode("latin-1") if world.gate.backend.shared else ""
    assert namespace in stored or not world.gate.backend.shared  # the dump read something
    for secret in [*secrets, world.admin]:
        for piece in (secret, secret[-16:]):
            assert all(piece not in text for text in seen)
            assert piece not in stored


ODD_VALUES = [
    "\x00",
    "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
    "9" * 400,
    "1e999",
    "٣",
    "a\u202eb",
    "\r\nX-Injected: yes",
    "99999-01-01",
    "0001-01-01",
    ",,,\n\n",
]
FORM_FIELDS = ["name", "type", "scopes", "expires_at", "allowed_origins", "allowed_ips", "grace"]
ODD_QUERIES = [
    "/console/keys?cursor=%00",
    "/console/keys?cursor=" + "A" * 3000,
    "/console/keys?q=%00&type=%ff",
    "/console/keys?status=%ff&status=active",
    "/console/audit?key_id=%00",
    "/console/audit?key_id=" + "a" * 20000,
    "/console/audit?cursor=W10&action=%ff",
    "/console/audit?cursor=" + "A" * 10000,
    "/console/keys/%00",
    "/console/keys/" + "a" * 3000,
    "/console/keys/%2e%2e/edit",
    "/console/created/%00",
    "/console/created/" + "a" * 3000,
    "/console/signin?why=%ff",
]


async def test_odd_values_in_every_field_and_parameter_never_make_a_server_error(
    world: World,
) -> None:
    """NULs, lone surrogates, huge numbers, other digits, bidi controls, CR/LF, impossible
    dates in each field of the create, edit and rotate forms (of every key type), and odd
    filters, ids and cursors in the query: each answer is a page below 500, with no header
    made from the input."""
    async with http(world.app) as client:
        await sign_in(client, world.admin)
        token = await csrf(client)
        targets = [
            "/console/keys/new",
            f"/console/keys/{world.worker}/edit",
            f"/console/keys/{world.worker}/rotate",
        ]
        answers = []
        for target in targets:
            for name in FORM_FIELDS:
                for value in ODD_VALUES:
                    for kind in ("dev", "client", "prod"):
                        data = {"csrf": token, "name": "odd", "type": kind, name: value}
                        answers.append(await client.post(target, data=data))
        for query in ODD_QUERIES:
            answers.append(await client.get(query))
    for answer in answers:
        assert answer.status_code < 500, (answer.request.url, answer.text[:300])
        assert "x-injected" not in answer.headers
    assert (await world.gate.manager.get(world.worker)).replaced_by is None


async def test_one_project_making_keys_cannot_push_out_anothers_secret_waiting_to_be_shown(
    world: World,
) -> None:
    """The secrets waiting for their page are bounded in all and per project: an admin of
    another project creating keys in a loop (each in a new session) uses up only its own
    project's share, and a secret waiting for this project's admin is still shown."""
    console = Console(world.gate)
    app = Starlette(routes=[Mount("/console", app=console.app())])
    async with http(app) as victim:
        await sign_in(victim, world.admin)
        data = {"csrf": await csrf(victim), "name": "mine", "type": "dev"}
        made = await victim.post("/console/keys/new", data=data)
        beta = await world.gate.manager.create(
            {"name": "beta admin", "type": "prod", "scopes": ["*"], "project": "beta"}
        )
        for _ in range(SLOTS + 10):  # what 266 sign-ins and creations would leave
            console.slots.keep(secrets.token_urlsafe(16), beta.key, "beta-secret")
        assert len(console.slots) <= SLOTS
        shown = await victim.get(made.headers["location"])
        assert shown.status_code == 200 and secret_on(shown.text) is not None


async def test_another_sessions_secret_page_answers_as_a_missing_one_and_stays(
    world: World,
) -> None:
    """The page of a secret waiting for another session (another project's admin) answers
    exactly as a page that never existed, and does not use the secret up."""
    beta = await world.gate.manager.create(
        {"name": "beta admin", "type": "prod", "scopes": ["*"], "project": "beta"}
    )
    async with http(world.app) as owner, http(world.app) as other:
        await sign_in(owner, beta.secret.get_secret_value())
        data = {"csrf": await csrf(owner), "name": "beta's new key", "type": "dev"}
        where = (await owner.post("/console/keys/new", data=data)).headers["location"]
        await sign_in(other, world.admin)
        theirs = await other.get(where)
        nobodys = await other.get("/console/created/AAAAAAAAAAAAAAAAAAAAAA")
        assert theirs.status_code == nobodys.status_code == 410
        assert theirs.text == nobodys.text and "beta" not in theirs.text
        shown = await owner.get(where)
        assert shown.status_code == 200 and secret_on(shown.text) is not None


async def test_a_form_of_too_many_fields_is_refused_whole(world: World) -> None:
    """A form of more than 2,000 fields (under the size limit) is a 400 that makes
    nothing, on the sign-in form and on a write."""
    async with http(world.app) as client:
        many = "&".join(f"f{i}=1" for i in range(2500))
        kind = {"content-type": "application/x-www-form-urlencoded"}
        signin = await client.post("/console/signin", content=f"key=x&{many}", headers=kind)
        assert signin.status_code == 400 and "set-cookie" not in signin.headers
        await sign_in(client, world.admin)
        body = f"csrf={await csrf(client)}&name=many&type=dev&{many}"
        made = await client.post("/console/keys/new", content=body, headers=kind)
        assert made.status_code == 400
    names = [k.name for k in (await world.gate.manager.list(project="alpha")).keys]
    assert "many" not in names


async def test_a_second_session_cookie_tossed_in_by_a_sibling_site_opens_no_session(
    world: World,
) -> None:
    """A site on a sibling subdomain can set a cookie of the same name for the whole
    domain (cookie tossing): the browser then sends both, the attacker's last. The console
    then opens neither session, rather than silently working in the attacker's project."""
    beta = await world.gate.manager.create(
        {"name": "beta admin", "type": "prod", "scopes": ["*"], "project": "beta"}
    )
    async with http(world.app) as attacker:
        await sign_in(attacker, beta.secret.get_secret_value())
        tossed = attacker.cookies[COOKIE]
    async with http(world.app) as victim:
        await sign_in(victim, world.admin)
        own = victim.cookies[COOKIE]
        victim.cookies.clear()
        both = {"cookie": f"{COOKIE}={own}; other=1; {COOKIE}={tossed}"}
        page = await victim.get("/console/keys", headers=both)
        assert page.status_code == 303 and "beta key" not in page.text
        assert page.headers["location"] == "/console/signin?why=cookies"
        told = await victim.get(page.headers["location"])
        assert "Two console cookies" in told.text
        write = await victim.post(
            "/console/keys/new", data={"csrf": "x", "name": "n"}, headers=both
        )
        assert write.status_code == 403
        same = {"cookie": f"{COOKIE}={own}; {COOKIE}={own}"}
        assert (await victim.get("/console/keys", headers=same)).status_code == 200
