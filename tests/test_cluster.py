"""Redis Cluster: ``redis+cluster://`` URLs, against the session's own 3-primary cluster
(tests/faults/redis_cluster.py; the shared server is never touched).

The store-contract suites run on the cluster too (the ``cluster`` backend of
tests/conftest.py); here is what only a cluster shows: keys spread over every primary,
announcements that reach another process, limits exact on every node, the usage flush and
the alert state of keys on different nodes, the command line, a plain client to one node
that must never let a request through, and a primary killed under load.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.exceptions import CrossSlotTransactionError, RedisClusterException

from conftest import SECRET, new_namespace, within
from faults.redis_cluster import RedisCluster
from keystile import (
    Keystile,
    KeystileSettings,
    RedisStore,
    StoreError,
    StoreUnavailable,
)
from keystile.redis.connect import open_redis
from keystile.stores import CachedStore
from test_middleware import bearer, client, make_app
from test_stores import Recorder, settle


@pytest.fixture
def cluster(redis_cluster: RedisCluster) -> Iterator[tuple[RedisCluster, str]]:
    """The session's cluster and a fresh namespace on it, removed afterwards."""
    namespace = new_namespace()
    yield redis_cluster, namespace
    redis_cluster.cleanup(namespace)


@pytest.fixture
async def gate(cluster: tuple[RedisCluster, str]) -> AsyncIterator[Keystile]:
    """A started gate on the cluster, through its redis+cluster:// URL."""
    nodes, namespace = cluster
    made = Keystile(
        store=nodes.url,
        secret=SECRET,
        settings=KeystileSettings(namespace=namespace, usage_flush_interval=60.0),
    )
    await made.startup()
    yield made
    await made.aclose()


def spread(nodes: RedisCluster, names: list[str]) -> Counter[int]:
    """How many of ``names`` each primary (by port) holds."""
    return Counter(nodes.owner(name).port for name in names if nodes.exists(name))


# -- configuration ----------------------------------------------------------------------------


async def test_a_cluster_url_builds_a_cluster_client(cluster: tuple[RedisCluster, str]) -> None:
    nodes, _ = cluster
    client = open_redis(nodes.url)
    try:
        assert isinstance(client, redis.asyncio.RedisCluster)
        assert await client.ping()
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://",  # no node
        "redis+cluster://:hunter2@127.0.0.1:x",  # not a port
        "redis+cluster://:hunter2@127.0.0.1:7000/0",  # a cluster has one database
        "redis+cluster://127.0.0.1:7000,:7001",  # a node without a host
    ],
)
def test_a_malformed_cluster_url_is_one_clear_error(url: str) -> None:
    with pytest.raises(
        ValueError, match="is not a Redis Cluster URL: use redis\\+cluster://"
    ) as caught:
        open_redis(url)
    assert "hunter2" not in str(caught.value)


async def test_a_cluster_client_object_is_accepted(cluster: tuple[RedisCluster, str]) -> None:
    """``RedisStore(RedisCluster(...))``: the same store as the URL makes."""
    nodes, namespace = cluster
    made = Keystile(
        store=RedisStore(
            redis.asyncio.RedisCluster.from_url(f"redis://127.0.0.1:{nodes.ports[0]}"),
            namespace=namespace,
        ),
        secret=SECRET,
    )
    await made.startup()
    try:
        created = await made.manager.create({"name": "object", "type": "dev"})
        app, _ = make_app(made)
        async with client(app) as http:
            answer = await http.get("/x", headers=bearer(created.secret.get_secret_value()))
        assert answer.status_code == 200
    finally:
        await made.aclose()


# -- the key store ----------------------------------------------------------------------------


async def test_thirty_keys_spread_over_the_nodes_all_authenticate(
    gate: Keystile, cluster: tuple[RedisCluster, str]
) -> None:
    """30 keys land on every primary (records and digests in many slots), each
    authenticates, and nothing is left with a TTL once created."""
    nodes, namespace = cluster
    made = [await gate.manager.create({"name": f"k{n}", "type": "dev"}) for n in range(30)]
    records = [f"{namespace}:key:{{{m.key.id}}}" for m in made]
    assert sum(spread(nodes, records).values()) == 30
    assert len(spread(nodes, records)) == 3  # every primary holds some
    assert all(nodes.owner(r).admin.ttl(r) == -1 for r in records)  # made permanent
    app, _ = make_app(gate)
    async with client(app) as http:
        answers = await asyncio.gather(
            *(http.get("/x", headers=bearer(m.secret.get_secret_value())) for m in made)
        )
        wrong = await http.get("/x", headers=bearer(made[0].secret.get_secret_value()[:-2] + "zz"))
    assert [a.status_code for a in answers] == [200] * 30
    assert wrong.status_code == 401


async def test_listing_pages_through_every_key_with_filters(gate: Keystile) -> None:
    """Pages of 7 with cursors list the 20 keys once each, in order; a filter too."""
    made = [
        await gate.manager.create({"name": f"k{n}", "type": "prod" if n % 2 else "dev"})
        for n in range(20)
    ]
    seen: list[str] = []
    cursor = None
    while True:
        page = await gate.manager.list(cursor=cursor, limit=7)
        seen += [k.id for k in page.keys]
        cursor = page.next
        if cursor is None:
            break
    assert seen == sorted(m.key.id for m in made)
    prod = await gate.manager.list(type="prod", limit=100)
    assert [k.id for k in prod.keys] == sorted(m.key.id for m in made[1::2])


async def test_update_rotate_and_revoke_on_the_cluster(gate: Keystile) -> None:
    made = await gate.manager.create({"name": "r", "type": "prod"})
    old = made.secret.get_secret_value()
    updated = await gate.manager.update(made.key.id, {"name": "renamed"})
    assert updated.name == "renamed"
    rotated = await gate.manager.rotate(made.key.id)
    new = rotated.secret.get_secret_value()
    app, _ = make_app(gate)
    async with client(app) as http:
        assert (await http.get("/x", headers=bearer(new))).status_code == 200
        await gate.manager.revoke(rotated.key.id)
        assert (await http.get("/x", headers=bearer(new))).status_code == 401
        assert (await gate.manager.get(made.key.id)).name == "renamed"
    assert old != new


async def test_a_crash_between_record_and_digest_leaves_nothing_that_works(
    cluster: tuple[RedisCluster, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stopped after the record and the index entry (the digest's SET fails), a creation
    leaves a record that expires by itself and that listings skip once it is gone."""
    nodes, namespace = cluster
    store = RedisStore.from_url(nodes.url, namespace=namespace)
    gate = Keystile(store=store, secret=SECRET)
    real_set = store.client.set

    async def set_but_not_digests(name: Any, *args: Any, **kwargs: Any) -> Any:
        if str(name).startswith(f"{namespace}:digest:"):
            raise redis.exceptions.ConnectionError("the process died here (test)")
        return await real_set(name, *args, **kwargs)

    try:
        monkeypatch.setattr(store.client, "set", set_but_not_digests)
        with pytest.raises(StoreUnavailable):
            await gate.manager.create({"name": "half", "type": "dev"})
        monkeypatch.undo()
        [half] = [n for p in nodes.primaries() for n in p.admin.scan_iter(f"{namespace}:key:*")]
        assert 0 < nodes.owner(half.decode()).admin.pttl(half) <= 60_000
        nodes.owner(half.decode()).admin.delete(half)  # as if its TTL had run out
        assert (await gate.manager.list()).keys == ()
        assert not [
            n for p in nodes.primaries() for n in p.admin.scan_iter(f"{namespace}:digest:*")
        ]
    finally:
        await gate.aclose()


async def test_revocation_reaches_another_process(
    gate: Keystile, cluster: tuple[RedisCluster, str]
) -> None:
    """A second process caching the key (tests/revocation_watcher.py) sees its revocation
    (plain PUBLISH on the cluster reaches its subscription, wherever it is)."""
    nodes, namespace = cluster
    watcher = subprocess.Popen(
        [
            sys.executable,
            str(Path(__file__).with_name("revocation_watcher.py")),
            nodes.url,
            namespace,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert watcher.stdin is not None and watcher.stdout is not None
    try:
        assert watcher.stdout.readline().strip() == "ready"
        created = await gate.manager.create({"name": "watched", "type": "prod"})
        digest = gate.hasher.digest(created.secret.get_secret_value())
        watcher.stdin.write(f"watch {digest}\n")
        watcher.stdin.flush()
        assert watcher.stdout.readline().strip() == "watching"
        await gate.manager.revoke(created.key.id)
        answer = watcher.stdout.readline().strip()
    finally:
        watcher.stdin.close()
        watcher.wait(timeout=10)
        watcher.stdout.close()
    assert answer.startswith("revoked ")


@pytest.mark.timing
async def test_revocation_reaches_another_store_within_100_ms(
    cluster: tuple[RedisCluster, str],
) -> None:
    nodes, namespace = cluster
    one = Keystile(store=nodes.url, secret=SECRET, settings=KeystileSettings(namespace=namespace))
    other = CachedStore(RedisStore.from_url(nodes.url, namespace=namespace), ttl=60.0)
    await one.startup()
    assert await other.start(timeout=5.0)
    try:
        for n in range(10):
            created = await one.manager.create({"name": f"w{n}", "type": "prod"})
            digest = one.hasher.digest(created.secret.get_secret_value())
            assert not (await other.find(digest)).revoked  # cached now

            async def revoked(digest: str = digest) -> bool:
                found = await other.find(digest)
                return found is not None and found.revoked

            await one.manager.revoke(created.key.id)
            await within(0.1, revoked)
    finally:
        await other.close()
        await one.aclose()


async def test_the_events_listener_survives_any_exception(
    cluster: tuple[RedisCluster, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A listener whose subscription fails with something that is no Redis error (here a
    KeyError, as a cluster client still finding its slots raised) reports the connection
    lost, retries, resubscribes and tells its listeners to resynchronise."""
    nodes, namespace = cluster
    store = RedisStore.from_url(nodes.url, namespace=namespace)
    real = store.client.pubsub
    failures = iter([KeyError("slot cache not initialised (test)"), RuntimeError("surprise")])

    def flaky_pubsub(**kwargs: Any) -> Any:
        for failure in failures:
            raise failure
        return real(**kwargs)

    monkeypatch.setattr(store.client, "pubsub", flaky_pubsub)
    recorder = Recorder()
    store.add_listener(recorder)
    try:
        await settle(store, lambda: store.listening, timeout=5.0)
        assert recorder.resyncs == 1
        await store.client.publish(store.channel, json.dumps({"id": "key_x", "digest": None}))
        await settle(store, lambda: ("key_x", None) in recorder.changes)
    finally:
        await store.close()


async def test_cluster_errors_surface_as_the_stores_own(
    cluster: tuple[RedisCluster, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's cluster exceptions (RedisClusterException is no RedisError) arrive as
    StoreError, raised from the original."""
    nodes, namespace = cluster
    store = RedisStore.from_url(nodes.url, namespace=namespace)

    async def cross_slot(*args: Any, **kwargs: Any) -> Any:
        raise CrossSlotTransactionError("keys in more than one slot (test)")

    try:
        monkeypatch.setattr(store.client, "execute_command", cross_slot)
        with pytest.raises(StoreError) as caught:
            await store.get("key_x")
        assert isinstance(caught.value.__cause__, RedisClusterException)
    finally:
        monkeypatch.undo()
        await store.close()
