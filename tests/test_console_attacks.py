"""The console under attack, over ASGI on the memory store and the real Redis: what an
attacker tries against its sessions, forms, pages and memory, and what they get."""

from __future__ import annotations

from starlette.applications import Starlette

import test_console
from keystile.console import console_mount
from keystile.console.session import COOKIE
from test_console import World, sign_in
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
        {"name": "proxied", "type": "prod", "scopes": ["*"], "allowed_ips": ["10.0.0.0/8"]}
    )
    token = made.secret.get_secret_value()
    app = Starlette(routes=[console_mount(world.gate, trusted_proxies=["192.0.2.1"])])
    forwarded = {"x-forwarded-for": "10.9.9.9"}
    async with http(app, ip="192.0.2.1") as client:
        answer = await client.post("/console/signin", data={"key": token}, headers=forwarded)
        assert answer.status_code == 303
    async with http(app, ip="198.51.100.7") as client:
        answer = await client.post("/console/signin", data={"key": token}, headers=forwarded)
        assert answer.status_code == 401
