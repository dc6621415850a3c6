"""The Redis key schema (keystile.redis.schema) against what keystile really writes.

A workload that touches every part — keys created, rotated and revoked, requests limited
per key and per address, AI tokens spent, usage flushed, alerts fired, addresses watched —
runs against a redis-server of this test's own; then every name in it is SCANned and
matched to the schema: no name the schema does not list, no row the run did not produce.
"""

from __future__ import annotations

import re
import subprocess
import sys

import redis

from conftest import SECRET
from faults.redis_server import RedisServer
from keystile import KeystileSettings, RedisStore
from keystile.alerts import AlertRules
from keystile.gate import Keystile
from keystile.redis import NAMES, RedisSchema
from test_middleware import bearer, client, make_app

NAMESPACE = "kstest-schema"


def pattern(row: str) -> re.Pattern[str]:
    """A schema row's pattern as a regular expression over real names."""
    out = ""
    for part in re.split(r"(<[^>]+>|\{|\})", row):
        if part == "<ns>":
            out += re.escape(NAMESPACE)
        elif part == "<key id>":
            out += r"key_[0-9A-Za-z]+"
        elif part == "<address>":
            out += r"[0-9A-Fa-f.:]+(?:/64)?"  # an IPv6 /64 holds colons
        elif part == "<rule>":
            out += r".+"  # a rule may name its threshold ("quota:0.8")
        elif part.startswith("<"):
            out += r"[^:{}]+"
        else:
            out += re.escape(part)
    return re.compile(out)


async def workload(url: str) -> None:
    store = RedisStore.from_url(url, namespace=NAMESPACE)
    gate = Keystile(
        store=store,
        secret=SECRET,
        settings=KeystileSettings(usage_flush_interval=3600.0, rate_limit_timeout=5.0),
        alert_rules=AlertRules(requests_per_minute=1),
    )
    await gate.startup()
    try:
        manager = gate.manager
        browser = await manager.create(
            {
                "name": "browser",
                "type": "client",
                "scopes": ["ai:inference"],
                "allowed_origins": ["https://app.example.com"],
            }
        )
        server = await manager.create({"name": "server", "type": "prod", "scopes": ["*"]})
        old = await manager.create({"name": "old", "type": "dev", "rate_limit": "5/second"})
        await manager.update_project("default", name="Default project")
        await manager.set_alert_rules(error_rate=0.2)
        await manager.set_key_alert_rules(old.key.id, requests_per_minute=3)
        await manager.rotate(old.key.id)
        await manager.revoke(server.key.id)
        server = await manager.create({"name": "server", "type": "prod", "scopes": ["*"]})
        app, _ = make_app(gate)
        origin = {"Origin": "https://app.example.com"}
        for address in ("192.0.2.1", "2001:db8:1:2::7"):
            async with client(app, address) as http:
                secret = browser.secret.get_secret_value()
                assert (await http.get("/x", headers={**bearer(secret), **origin})).is_success
                secret = server.secret.get_secret_value()
                assert (await http.get("/x", headers=bearer(secret))).is_success
        await gate.quotas.spend(browser.key, 10, "record")
        await gate.usage.flush()
    finally:
        await gate.aclose()


async def test_the_schema_names_every_name_a_run_creates(own_redis: RedisServer) -> None:
    await workload(own_redis.url)
    client_ = redis.Redis(port=own_redis.port)
    try:
        names = sorted(name.decode() for name in client_.scan_iter(count=1000))
    finally:
        client_.close()
    rows = {row.pattern: pattern(row.pattern) for row in NAMES}
    unmatched = [n for n in names if not any(p.fullmatch(n) for p in rows.values())]
    assert unmatched == [], f"names the schema does not list: {unmatched}"
    seen = {row for row, p in rows.items() if any(p.fullmatch(n) for n in names)}
    channels = {row.pattern for row in NAMES if row.kind == "channel"}
    # The hour hashes of the earlier usage layout are read (and moved), not written.
    earlier = {"<ns>:usage:{<key id>}:h:<hour>"}
    assert set(rows) - channels - earlier - seen == set(), "rows no name matched"
    client_ = redis.Redis(port=own_redis.port)
    try:
        for row in NAMES:  # each name's type and tag are what the schema says
            for name in names:
                if rows[row.pattern].fullmatch(name):
                    assert client_.type(name).decode() == row.kind, (row.pattern, name)
                    assert ("{" in name) == (row.tag != "-"), (row.pattern, name)
    finally:
        client_.close()


def test_every_row_is_built_by_the_schema() -> None:
    """The rows and the name builders agree."""
    schema = RedisSchema(NAMESPACE)
    built = [
        schema.record("key_abc"),
        schema.digest("f" * 64),
        schema.index,
        schema.listing("default", "prod", "ends-active"),
        schema.listing_types,
        schema.listing_version,
        schema.events,
        schema.window("key_abc", 100, 60),
        schema.window("key_abc", 20, 60, "2001:db8:1:2::/64"),
        schema.quota("key_abc"),
        schema.usage("key_abc", "total"),
        schema.usage("key_abc", "m:493000"),
        schema.usage("key_abc", "h:493000"),
        schema.usage("key_abc", "d:20500"),
        schema.usage("key_abc", "ips"),
        schema.usage("key_abc", "origins"),
        schema.seen_addresses("key_abc"),
        schema.usage_index,
        schema.audit,
        schema.project("shop"),
        schema.project_rules("shop"),
        schema.projects,
        schema.alert("key_abc", "error_rate"),
    ]
    for name, row in zip(built, NAMES, strict=True):
        assert pattern(row.pattern).fullmatch(name), (row.pattern, name)


def test_python_m_keystile_redis_prints_the_schema() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "keystile.redis", "myapp"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0].split() == ["name", "type", "hash", "tag", "ttl", "holds"]
    assert len(lines) == 1 + len(NAMES)
    assert lines[1].startswith("myapp:key:{<key id>}")
    assert all(line.startswith("myapp:") for line in lines[1:])
