"""Redis deployments: ``redis+sentinel://`` URLs, against a sentinel of the test's own; a
plain URL that reaches a Redis Cluster node, refused at start-up.

A redis-server of the test's own is the master; a sentinel (``redis-server --sentinel``) on
another free loopback port watches it under the name ``ksmaster``. keystile reaches the
master through the sentinel: keys are created, authenticate, are rate-limited exactly and
revoked at once, as on a plain URL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from conftest import SECRET
from faults.redis_sentinel import SERVICE, Sentinel
from faults.redis_server import RedisServer, free_port, need_redis_server
from keystile import Keystile, KeystileSettings, StoreMisconfigured
from keystile.cli import main
from keystile.redis.connect import open_redis
from test_middleware import bearer, client, make_app


@pytest.fixture
def sentinel() -> Iterator[tuple[RedisServer, Sentinel]]:
    need_redis_server()
    master = RedisServer()
    master.start()
    watcher = Sentinel(master)
    yield master, watcher
    watcher.close()
    master.close()


async def test_a_gate_reaches_the_master_through_the_sentinel(
    sentinel: tuple[RedisServer, Sentinel],
) -> None:
    """Through ``redis+sentinel://host:port/service``: a created key authenticates, its
    record is on the master, its rate limit is exact, and its revocation is immediate."""
    master, watcher = sentinel
    url = f"redis+sentinel://127.0.0.1:{watcher.port}/{SERVICE}"
    gate = Keystile(store=url, secret=SECRET, settings=KeystileSettings(namespace="kstest-sen"))
    await gate.startup()
    try:
        created = await gate.manager.create(
            {"name": "s", "type": "dev", "scopes": ["vec:read"], "rate_limit": "3/minute"}
        )
        assert master.admin.exists(f"kstest-sen:key:{{{created.key.id}}}") == 1
        secret = created.secret.get_secret_value()
        app, _ = make_app(gate)
        async with client(app) as http:
            answers = [await http.get("/x", headers=bearer(secret)) for _ in range(5)]
            assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
            await gate.manager.revoke(created.key.id)
            revoked = await http.get("/x", headers=bearer(secret))
        assert revoked.status_code == 401
        assert gate.limiter.passes == 0  # type: ignore[attr-defined]
    finally:
        await gate.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+sentinel://127.0.0.1:26379",  # no service
        "redis+sentinel:///ksmaster",  # no sentinel
        "redis+sentinel://127.0.0.1:x/ksmaster",  # not a port
        "redis+sentinel://:hunter2@127.0.0.1:26379/ksmaster?db=two",
    ],
)
def test_a_malformed_sentinel_url_is_one_clear_error(url: str) -> None:
    with pytest.raises(
        ValueError, match="is not a Sentinel URL: use redis\\+sentinel://"
    ) as caught:
        open_redis(url)
    assert "hunter2" not in str(caught.value)


def test_the_command_line_takes_a_sentinel_url(
    sentinel: tuple[RedisServer, Sentinel],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``keystile keys create --redis redis+sentinel://...`` writes to the master."""
    master, watcher = sentinel
    monkeypatch.setenv("KEYSTILE_SECRET", SECRET)
    monkeypatch.setenv("KEYSTILE_NAMESPACE", "kstest-sencli")
    url = f"redis+sentinel://127.0.0.1:{watcher.port}/{SERVICE}"
    assert main(["keys", "create", "--name", "n", "--type", "dev", "--redis", url]) == 0
    out = capsys.readouterr().out
    key_id = next(w for w in out.split() if w.startswith("key_"))
    assert master.admin.exists(f"kstest-sencli:key:{{{key_id}}}") == 1


# -- a plain URL that reaches a Redis Cluster node -------------------------------------------


@pytest.fixture
def cluster_node() -> Iterator[RedisServer]:
    need_redis_server()
    # A cluster node also listens on its port + 10,000: the port must be 55,535 or less.
    port = next(p for p in iter(free_port, None) if p <= 55_535)
    node = RedisServer(port, args=("--cluster-enabled", "yes"))
    node.start()
    yield node
    node.close()


async def test_a_cluster_node_stops_start_up_with_what_to_use(cluster_node: RedisServer) -> None:
    """A node of a Redis Cluster would answer MOVED for most keys: start-up stops with one
    clear StoreMisconfigured, and nothing is written."""
    gate = Keystile(store=cluster_node.url, secret=SECRET)
    try:
        with pytest.raises(StoreMisconfigured, match=r"Redis Cluster.*redis\+cluster://"):
            await gate.startup()
    finally:
        await gate.aclose()
    assert cluster_node.admin.dbsize() == 0


def test_the_command_line_refuses_a_cluster_node_in_one_line(
    cluster_node: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("KEYSTILE_SECRET", SECRET)
    argv = ["keys", "create", "--name", "n", "--type", "dev", "--redis", cluster_node.url]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.splitlines()) == 1
    assert "Redis Cluster" in captured.err and "redis+cluster://" in captured.err
    assert cluster_node.admin.dbsize() == 0


async def test_a_standalone_redis_or_the_memory_store_passes_the_check(
    sentinel: tuple[RedisServer, Sentinel],
) -> None:
    master, watcher = sentinel
    for store in (master.url, f"redis+sentinel://127.0.0.1:{watcher.port}/{SERVICE}", None):
        gate = Keystile(store=store, secret=SECRET)
        try:
            await gate.backend.check()
        finally:
            await gate.aclose()


def failover(admin: redis.Redis) -> bool:
    """Ask the sentinel to fail over; False while it finds no replica fit to promote."""
    try:
        admin.execute_command("SENTINEL", "failover", SERVICE)
    except redis.ResponseError as exc:
        if "NOGOODSLAVE" not in str(exc):
            raise
        return False
    return True


@pytest.mark.slow
async def test_keys_keep_working_across_a_sentinel_failover(
    sentinel: tuple[RedisServer, Sentinel],
) -> None:
    """With a replica, SENTINEL FAILOVER makes it the master: keys made before still
    authenticate, new ones can be made and revoked, limits still decide — through the
    same URL, without a restart."""
    master, watcher = sentinel
    replica = RedisServer(args=("--replicaof", "127.0.0.1", str(master.port)))
    replica.start()
    admin = redis.Redis(port=watcher.port, socket_timeout=2)
    gate = None
    try:
        deadline = time.monotonic() + 30  # the sentinel learns of replicas every 10 s
        while not admin.execute_command("SENTINEL", "replicas", SERVICE):
            assert time.monotonic() < deadline, "the sentinel never saw the replica"
            await asyncio.sleep(0.1)
        url = f"redis+sentinel://127.0.0.1:{watcher.port}/{SERVICE}"
        gate = Keystile(store=url, secret=SECRET, settings=KeystileSettings(namespace="kstest-fo"))
        await gate.startup()
        before = await gate.manager.create({"name": "b", "type": "dev", "scopes": ["vec:read"]})
        while replica.admin.exists(f"kstest-fo:key:{{{before.key.id}}}") == 0:
            assert time.monotonic() < deadline, "the replica never caught up"
            await asyncio.sleep(0.05)
        while not failover(admin):  # until the sentinel finds the replica fit to promote
            assert time.monotonic() < deadline, "no replica was ever fit to promote"
            await asyncio.sleep(0.2)
        # Over once the sentinel names the replica and the old master follows it.
        replica_address = ["127.0.0.1", str(replica.port)]
        while [
            a.decode()
            for a in admin.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        ] != replica_address or master.admin.info("replication")["role"] != "slave":
            assert time.monotonic() < deadline + 30, "the failover never happened"
            await asyncio.sleep(0.1)
        app, _ = make_app(gate)
        async with client(app) as http:
            old = bearer(before.secret.get_secret_value())
            assert (await http.get("/x", headers=old)).status_code == 200
            after = await gate.manager.create(
                {"name": "a", "type": "dev", "scopes": ["vec:read"], "rate_limit": "2/minute"}
            )
            assert replica.admin.exists(f"kstest-fo:key:{{{after.key.id}}}") == 1
            new = bearer(after.secret.get_secret_value())
            codes = [(await http.get("/x", headers=new)).status_code for _ in range(3)]
            assert codes == [200, 200, 429]
            await gate.manager.revoke(before.key.id)
            assert (await http.get("/x", headers=old)).status_code == 401
    finally:
        if gate is not None:
            await gate.aclose()
        admin.close()
        replica.close()


@pytest.mark.slow
async def test_a_failover_under_load_loses_no_key_and_admits_no_stranger() -> None:
    """A master, a replica and three sentinels (quorum 2); requests with a valid key and
    without one keep coming while SENTINEL FAILOVER promotes the replica. No request without
    a valid key is ever admitted, every key made before the failover works after it, and
    valid requests are admitted again within seconds."""
    need_redis_server()
    master = RedisServer()
    master.start()
    replica = RedisServer(args=("--replicaof", "127.0.0.1", str(master.port)))
    replica.start()
    watchers = [Sentinel(master, quorum=2, number=n) for n in range(3)]
    admin = redis.Redis(port=watchers[0].port, socket_timeout=2)
    gate = None
    try:
        deadline = time.monotonic() + 40  # sentinels learn of replicas every 10 s
        while not admin.execute_command("SENTINEL", "replicas", SERVICE) or (
            len(admin.execute_command("SENTINEL", "sentinels", SERVICE)) < 2
        ):
            assert time.monotonic() < deadline, "the sentinels never saw the replica or each other"
            await asyncio.sleep(0.1)
        url = ",".join(f"127.0.0.1:{w.port}" for w in watchers)
        gate = Keystile(
            store=f"redis+sentinel://{url}/{SERVICE}",
            secret=SECRET,
            settings=KeystileSettings(namespace="kstest-load"),
        )
        await gate.startup()
        made = [
            await gate.manager.create({"name": f"k{n}", "type": "dev", "scopes": ["vec:read"]})
            for n in range(10)
        ]
        last = made[-1].key.id
        while replica.admin.exists(f"kstest-load:key:{{{last}}}") == 0:
            assert time.monotonic() < deadline, "the replica never caught up"
            await asyncio.sleep(0.05)
        app, _ = make_app(gate)
        valid = [bearer(c.secret.get_secret_value()) for c in made]
        strangers = [{}, bearer("dev_" + "A" * 27 + "AAAAAA"), {"Authorization": "Basic x"}]
        seen: list[tuple[bool, int]] = []
        stop = asyncio.Event()

        async def load() -> None:
            async with client(app) as http:
                n = 0
                while not stop.is_set() and n < 20_000:  # bounded
                    n += 1
                    good = n % 2 == 0
                    headers = valid[n % len(valid)] if good else strangers[n % len(strangers)]
                    answer = await http.get("/x", headers=headers)
                    seen.append((good, answer.status_code))
                    await asyncio.sleep(0.005)

        loader = asyncio.create_task(load())
        await asyncio.sleep(0.5)
        while not failover(admin):
            assert time.monotonic() < deadline, "no replica was ever fit to promote"
            await asyncio.sleep(0.2)
        replica_address = ["127.0.0.1", str(replica.port)]
        while [
            a.decode()
            for a in admin.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE)
        ] != replica_address:
            assert time.monotonic() < deadline + 30, "the failover never happened"
            await asyncio.sleep(0.1)
        promoted = len(seen)
        await asyncio.sleep(3)
        stop.set()
        await loader
        assert [s for good, s in seen if not good and s == 200] == []  # no stranger admitted
        assert {s for good, s in seen if not good} <= {400, 401, 503}
        after = [s for good, s in seen[promoted:] if good]
        assert after and after[-20:] == [200] * 20, after[-40:]
        async with client(app) as http:
            for headers in valid:  # every key made before the failover
                assert (await http.get("/x", headers=headers)).status_code == 200
        counts = {s: sum(1 for _, c in seen if c == s) for s in {c for _, c in seen}}
        print(f"\nsentinel failover under load: {len(seen)} requests, statuses {counts}")
    finally:
        if gate is not None:
            await gate.aclose()
        admin.close()
        for watcher in watchers:
            watcher.close()
        replica.close()
        master.close()


@pytest.mark.slow
async def test_four_processes_admit_exactly_the_limit_together_through_sentinel(
    redis_sentinel: Any, figures: Any
) -> None:
    """Four app processes reaching the master through the sentinel, 250 simultaneous
    requests each with one fresh client key per round: exactly 100 admitted between them,
    20 rounds running."""
    from conftest import new_namespace
    from test_ratelimit import four_processes

    namespace = new_namespace()
    settings = KeystileSettings(
        namespace=namespace, rate_limit_timeout=2.0, usage_flush_interval=3600.0
    )
    gate = Keystile(store=redis_sentinel.store_url, secret=SECRET, settings=settings)
    await gate.startup()
    try:
        await four_processes(gate, redis_sentinel.store_url, namespace, figures)
    finally:
        await gate.aclose()
        redis_sentinel.cleanup(namespace)
