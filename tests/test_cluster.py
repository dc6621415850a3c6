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

from conftest import REDIS_URL, SECRET, new_namespace, within
from faults.redis_cluster import RedisCluster
from keystile import (
    Keystile,
    KeystileSettings,
    RedisStore,
    StoreError,
    StoreMisconfigured,
    StoreUnavailable,
)
from keystile.cli import main
from keystile.ratelimit import RedisLimiter
from keystile.rates import limit_set
from keystile.redis.connect import open_redis
from keystile.stores import CachedStore
from test_middleware import bearer, client, make_app
from test_ratelimit import four_processes
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


async def test_a_cluster_url_to_a_standalone_redis_stops_start_up(redis_namespace: str) -> None:
    """redis+cluster:// to a Redis that is no cluster node: one StoreMisconfigured saying
    what to use, before anything is written."""
    url = "redis+cluster://" + REDIS_URL.removeprefix("redis://").partition("/")[0]
    gate = Keystile(store=url, secret=SECRET, settings=KeystileSettings(namespace=redis_namespace))
    try:
        with pytest.raises(
            StoreMisconfigured, match="not a node of a Redis Cluster: use redis://"
        ):
            await gate.startup()
    finally:
        await gate.aclose()


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


# -- rate limits, quotas, usage, alerts ---------------------------------------------------------

ORIGIN = "https://app.example"


async def keys_on_every_node(
    gate: Keystile, nodes: RedisCluster, namespace: str, **fields: Any
) -> list[tuple[str, str]]:
    """One key (id, secret) whose data lives on each primary."""
    found: dict[int, tuple[str, str]] = {}
    for n in range(200):
        made = await gate.manager.create({"name": f"k{n}", "scopes": ["vec:read"], **fields})
        port = nodes.owner(f"{namespace}:key:{{{made.key.id}}}").port
        found.setdefault(port, (made.key.id, made.secret.get_secret_value()))
        if len(found) == 3:
            return list(found.values())
    raise AssertionError("200 keys and still a primary without one")


@pytest.fixture
async def limited(cluster: tuple[RedisCluster, str]) -> AsyncIterator[Keystile]:
    """A gate on the cluster whose limiter may wait up to 2 s (never passes undecided on a
    busy machine)."""
    nodes, namespace = cluster
    settings = KeystileSettings(
        namespace=namespace, rate_limit_timeout=2.0, usage_flush_interval=3600.0
    )
    made = Keystile(store=nodes.url, secret=SECRET, settings=settings)
    await made.startup()
    yield made
    await made.aclose()


async def test_150_concurrent_requests_admit_exactly_100_on_every_node(
    limited: Keystile, cluster: tuple[RedisCluster, str], figures: Any
) -> None:
    """Three client keys, one on each primary, 150 simultaneous requests each (interleaved):
    exactly 100 of each are admitted, the rest refused with 429; nothing passes undecided;
    the decisions go over lean connections, one per primary, coalesced (far fewer round
    trips than decisions)."""
    nodes, namespace = cluster
    keys = await keys_on_every_node(
        limited,
        nodes,
        namespace,
        type="client",
        allowed_origins=[ORIGIN],
        rate_limit="100/minute",
        address_rate_limit="100/minute",
    )
    app, seen = make_app(limited)
    headers = [{**bearer(secret), "Origin": ORIGIN} for _, secret in keys]
    async with client(app) as http:
        for h in headers:  # cached first: the subject is the limiter
            assert (await http.get("/x", headers=h)).status_code == 200
        limiter = limited.limiter
        assert isinstance(limiter, RedisLimiter) and limiter.lean
        trips = limiter.round_trips
        order = [n for _ in range(150) for n in range(3)]
        answers = await asyncio.gather(*(http.get("/x", headers=headers[n]) for n in order))
    admitted = Counter(n for n, a in zip(order, answers, strict=True) if a.status_code == 200)
    refused = Counter(n for n, a in zip(order, answers, strict=True) if a.status_code == 429)
    assert admitted == {0: 99, 1: 99, 2: 99}  # and one each before: 100
    assert refused == {0: 51, 1: 51, 2: 51}
    assert limiter.passes == 0
    assert len(seen) == 300
    trips = limiter.round_trips - trips
    assert trips < 450  # decisions of one node that arrive together share a write
    figures.add(
        f"cluster: 3 keys on 3 primaries x 150 simultaneous requests: 100 admitted each, "
        f"{trips} limiter round trips for 450 decisions (the rest refused locally or coalesced)"
    )


@pytest.mark.slow
async def test_four_processes_admit_exactly_the_limit_together_on_a_cluster(
    limited: Keystile, cluster: tuple[RedisCluster, str], figures: Any
) -> None:
    """Four app processes on the cluster, 250 simultaneous requests each with one fresh
    client key per round: exactly 100 admitted between them, 20 rounds running."""
    nodes, namespace = cluster
    await four_processes(limited, nodes.url, namespace, figures)


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "redis-py"])
async def test_a_node_answering_moved_never_lets_a_request_through(
    cluster: tuple[RedisCluster, str], lean: bool
) -> None:
    """A limiter on a plain connection to one node (as RedisLimiter(Redis(...)) would make,
    with failure="allow"): a key whose slot is elsewhere gets MOVED, which is no outage —
    the decision is refused (StoreUnavailable: the middleware's 503), never admitted
    undecided."""
    nodes, namespace = cluster
    node = nodes.primaries()[0]
    plain = redis.asyncio.Redis(port=node.port)
    limiter = RedisLimiter(plain, namespace=namespace, failure="allow", lean=lean)
    limits = limit_set("5/minute", "key")
    try:
        assert limiter.lean is lean
        await limiter.start()
        elsewhere = next(
            f"key_{n}"
            for n in range(1000)
            if nodes.owner(limiter.window_key(f"key_{n}", limits, 0)).port != node.port
        )
        for _ in range(3):
            with pytest.raises(StoreUnavailable):
                await limiter.hit(elsewhere, limits)
        assert limiter.passes == 0
    finally:
        await limiter.close()
        await plain.aclose()


async def test_token_quotas_hold_on_every_node(
    gate: Keystile, cluster: tuple[RedisCluster, str]
) -> None:
    """A 100-token budget on keys of every primary: three spends of 30 fit, the fourth
    does not, and 10 are left."""
    nodes, namespace = cluster
    keys = await keys_on_every_node(gate, nodes, namespace, type="dev", token_quota=100)
    for key_id, _ in keys:
        key = await gate.manager.get(key_id)
        states = [await gate.quotas.spend(key, 30, "reserve") for _ in range(4)]
        assert [s.allowed for s in states if s is not None] == [True, True, True, False]
        assert states[-1] is not None and states[-1].remaining == 10
        assert not any(s.degraded for s in states if s is not None)


async def test_usage_of_keys_on_every_node_is_flushed_and_reported(
    gate: Keystile, cluster: tuple[RedisCluster, str]
) -> None:
    """Requests with keys on the three primaries, one flush (one script call per key, on
    its node): each key's report counts its own requests."""
    nodes, namespace = cluster
    keys = await keys_on_every_node(gate, nodes, namespace, type="dev")
    app, _ = make_app(gate)
    async with client(app) as http:
        for n, (_, secret) in enumerate(keys):
            for _ in range(n + 2):
                assert (await http.get("/x", headers=bearer(secret))).status_code == 200
    assert await gate.usage.flush()
    for n, (key_id, _) in enumerate(keys):
        report = await gate.usage.report(key_id)
        assert report.all_time.requests == n + 2
    assert await gate.usage.flush()  # nothing new: still counted once
    assert [(await gate.usage.report(k)).all_time.requests for k, _ in keys] == [2, 3, 4]


async def test_new_addresses_are_noted_per_key_on_every_node(
    gate: Keystile, cluster: tuple[RedisCluster, str]
) -> None:
    """The new-IP alert's state (one script per key, in one cluster pipeline): the first
    batch of a key is its baseline, a later address is new, an address seen is not."""
    nodes, namespace = cluster
    keys = [k for k, _ in await keys_on_every_node(gate, nodes, namespace, type="prod")]
    state = gate.backend.alert_state(gate.clock)
    assert await state.new_addresses({k: {"192.0.2.1"} for k in keys}) == {}
    again = await state.new_addresses({k: {"192.0.2.1", "192.0.2.9"} for k in keys})
    assert again == {k: ["192.0.2.9"] for k in keys}
    claimed = await state.claim_many([f"{k}|new_ip" for k in keys], 60.0)
    assert claimed == [True, True, True]
    assert await state.claim_many([f"{k}|new_ip" for k in keys], 60.0) == [False] * 3


# -- the command line -----------------------------------------------------------------------------


def test_the_command_line_takes_a_cluster_url(
    cluster: tuple[RedisCluster, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``keystile keys create/list/revoke --redis redis+cluster://...``."""
    nodes, namespace = cluster
    monkeypatch.setenv("KEYSTILE_SECRET", SECRET)
    monkeypatch.setenv("KEYSTILE_NAMESPACE", namespace)
    assert main(["keys", "create", "--name", "n", "--type", "dev", "--redis", nodes.url]) == 0
    out = capsys.readouterr().out
    key_id = next(w for w in out.split() if w.startswith("key_"))
    assert nodes.exists(f"{namespace}:key:{{{key_id}}}")
    assert main(["keys", "list", "--redis", nodes.url]) == 0
    assert key_id in capsys.readouterr().out
    assert main(["keys", "revoke", key_id, "--redis", nodes.url]) == 0
    capsys.readouterr()
    record = json.loads(
        nodes.owner(f"{namespace}:key:{{{key_id}}}").admin.get(f"{namespace}:key:{{{key_id}}}")
    )
    assert record["revoked_at"] is not None


# -- a primary killed under load ----------------------------------------------------------------


@pytest.fixture
def replicated() -> Iterator[RedisCluster]:
    """A cluster of the test's own: three primaries with one replica each."""
    made = RedisCluster(primaries=3, replicas=1)
    try:
        made.start()
        yield made
    finally:
        made.close()


def replicas_caught_up(nodes: RedisCluster) -> bool:
    """Whether every replica holds as many names as its primary."""
    for node in nodes.nodes:
        info = node.admin.info("replication")
        if info.get("role") == "slave":
            primary = next(n for n in nodes.nodes if n.port == int(info["master_port"]))
            if node.admin.dbsize() != primary.admin.dbsize():
                return False
    return True


@pytest.mark.slow
async def test_killing_a_primary_loses_no_key_and_admits_no_stranger(
    replicated: RedisCluster, figures: Any
) -> None:
    """30 keys over three primaries with replicas; requests with valid, unknown and
    malformed keys keep coming while one primary is SIGKILLed and its replica takes over.
    No request without a valid key is ever admitted; afterwards every key authenticates
    on a fresh gate (nothing cached), and new keys are made, limited and revoked."""
    nodes = replicated
    settings = KeystileSettings(namespace="kstest-failover", cache_ttl=0.5)
    gate = Keystile(store=nodes.url, secret=SECRET, settings=settings)
    await gate.startup()
    fresh: Keystile | None = None
    try:
        made = [await gate.manager.create({"name": f"k{n}", "type": "dev"}) for n in range(30)]
        secrets_ = [m.secret.get_secret_value() for m in made]
        deadline = asyncio.get_running_loop().time() + 10
        while not replicas_caught_up(nodes):
            assert asyncio.get_running_loop().time() < deadline, "replicas never caught up"
            await asyncio.sleep(0.05)
        # The primary of the events channel's slot, where every listener subscribes (and
        # of some of the keys, whose data its replica must still have).
        victim = nodes.owner("kstest-failover:events")
        strangers = [secrets_[0][:-6] + "AAAAAA", "dev_" + "A" * 40, "not a key"]
        app, _ = make_app(gate)
        tally: Counter[tuple[str, int]] = Counter()
        async with client(app) as http:

            async def round_of_requests() -> list[int]:
                answers = await asyncio.gather(
                    *(http.get("/x", headers=bearer(s)) for s in [*secrets_[:10], *strangers])
                )
                for s, a in zip([*secrets_[:10], *strangers], answers, strict=True):
                    tally[("valid" if s in secrets_ else "stranger", a.status_code)] += 1
                    if s not in secrets_:
                        assert a.status_code != 200, a.text
                return [a.status_code for a in answers[:10]]

            await round_of_requests()
            heirs = [
                n
                for n in nodes.nodes
                if int(n.admin.info("replication").get("master_port", 0)) == victim.port
            ]
            victim.kill()
            killed = asyncio.get_running_loop().time()
            recovered_in = None
            while asyncio.get_running_loop().time() - killed < 30:
                if set(await round_of_requests()) == {200} and _failed_over(nodes, heirs):
                    recovered_in = asyncio.get_running_loop().time() - killed
                    break
                await asyncio.sleep(0.05)
            assert recovered_in is not None, f"no failover within 30 s: {tally}"
            # The events listener found the channel's node again (it may have been the
            # victim's slot): announcements reach this gate once more.
            await settle(gate.store, lambda: gate.store.listening, timeout=15.0)
            changed = await gate.manager.update(made[1].key.id, {"name": "after the kill"})
            listener = Recorder()  # hears only what comes over the channel from now on
            gate.store.add_listener(listener)
            same = KeystileSettings(namespace="kstest-failover")
            other = Keystile(store=nodes.url, secret=SECRET, settings=same)
            try:
                await other.manager.update(changed.id, {"name": "from another gate"})
                await settle(
                    gate.store, lambda: any(i == changed.id for i, _ in listener.changes), 5.0
                )
            finally:
                await other.aclose()
        assert not [k for k in tally if k[0] == "stranger" and k[1] == 200]

        # Everything made before the kill is still there, read without any cache.
        fresh = Keystile(
            store=nodes.url,
            secret=SECRET,
            settings=KeystileSettings(namespace="kstest-failover"),
        )
        await fresh.startup()
        app, _ = make_app(fresh)
        async with client(app) as http:
            answers = await asyncio.gather(*(http.get("/x", headers=bearer(s)) for s in secrets_))
            assert [a.status_code for a in answers] == [200] * 30
            new = await fresh.manager.create(
                {"name": "after", "type": "dev", "rate_limit": "3/minute"}
            )
            after = [
                (await http.get("/x", headers=bearer(new.secret.get_secret_value()))).status_code
                for _ in range(4)
            ]
            assert after == [200, 200, 200, 429]
            await fresh.manager.revoke(new.key.id)
            revoked = await http.get("/x", headers=bearer(new.secret.get_secret_value()))
            assert revoked.status_code == 401
        figures.add(
            f"cluster failover (SIGKILL of a primary, replica promoted): requests answered "
            f"again {recovered_in:.1f} s after the kill; {dict(tally)}; 0 strangers admitted; "
            "30/30 keys authenticate afterwards"
        )
    finally:
        await gate.aclose()
        if fresh is not None:
            await fresh.aclose()


def _failed_over(nodes: RedisCluster, heirs: list[Any]) -> bool:
    """Whether a replica of the killed primary (one of ``heirs``) is a primary now and
    every node still running says the cluster is ok again."""
    if not any(h.admin.info("replication").get("role") == "master" for h in heirs):
        return False
    for node in nodes.nodes:
        if not node.running:
            continue
        try:
            if node.admin.cluster("info").get("cluster_state") != "ok":
                return False
        except redis.RedisError:
            return False
    return True


async def test_a_stale_route_follows_moved_and_decides_exactly(
    cluster: tuple[RedisCluster, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lean route to the wrong primary (a slot map gone stale) gets MOVED: the decision
    is made over redis-py instead, which follows the redirect — exact, never undecided —
    and a SCRIPT FLUSH on every node is answered by loading the script again."""
    nodes, namespace = cluster
    client = open_redis(nodes.url)
    limiter = RedisLimiter(client, namespace=namespace, failure="allow")
    limits = limit_set("5/minute", "key")
    try:
        await limiter.start()
        routes = limiter._routes
        assert routes is not None
        key = "key_stale"
        right = routes.for_key(limiter.window_key(key, limits, 0))
        wrong = next(
            lean
            for n in range(1000)
            if (lean := routes.for_key(limiter.window_key(f"key_{n}", limits, 0))) is not right
        )
        monkeypatch.setattr(routes, "for_key", lambda name: wrong)
        decisions = [await limiter.hit(key, limits) for _ in range(7)]
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
        assert not any(d.degraded for d in decisions)
        monkeypatch.undo()
        for node in nodes.primaries():
            node.admin.script_flush()
        later = await limiter.hit("key_other", limits)
        assert later.allowed and not later.degraded
        assert limiter.passes == 0
    finally:
        await limiter.close()
        await client.aclose()
