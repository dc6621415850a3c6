"""What only the Redis store must do: bounded pools, cluster-safe names, no secrets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from conftest import REDIS_URL, cleanup_namespace, fake_redis, new_namespace, require_redis
from keystile import KeyHasher, KeyManager, RedisStore, StoreError, StoreUnavailable
from keystile.stores import CachedStore


async def test_300_concurrent_lookups_wait_for_a_bounded_pool(
    redis_namespace: str, hasher: KeyHasher
) -> None:
    """300 simultaneous uncached lookups all succeed through a pool of 20 connections."""
    name = f"{redis_namespace}-pool"
    store = RedisStore.from_url(
        REDIS_URL, namespace=redis_namespace, pool_size=20, pool_timeout=5.0, client_name=name
    )
    try:
        manager = KeyManager(store, hasher)
        created = [await manager.create({"name": f"k{n}", "type": "dev"}) for n in range(300)]
        digests = [hasher.digest(c.secret.get_secret_value()) for c in created]
        results = await asyncio.gather(*(store.find(d) for d in digests))
        assert [r.id if r else None for r in results] == [c.key.id for c in created]
        pool = store.client.connection_pool
        assert len(pool._in_use_connections) + len(pool._available_connections) <= 20
        admin = redis.Redis.from_url(REDIS_URL)
        try:
            assert 1 <= sum(c["name"] == name for c in admin.client_list()) <= 20
        finally:
            admin.close()
    finally:
        await store.close()


def test_the_default_pool_waits_instead_of_failing() -> None:
    """from_url builds a BlockingConnectionPool (redis-py's default pool raises past its cap)."""
    from redis.asyncio import BlockingConnectionPool

    store = RedisStore.from_url("redis://127.0.0.1:1/0", pool_size=7, pool_timeout=0.3)
    pool = store.client.connection_pool
    assert isinstance(pool, BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout) == (7, 0.3)


async def test_names_are_hash_tagged_and_hold_no_secret(
    redis_namespace: str, hasher: KeyHasher
) -> None:
    """Every name is under the namespace, records are hash-tagged by key id, and no name or
    value contains the secret or any 8-character piece of it."""
    store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace)
    try:
        manager = KeyManager(CachedStore(store), hasher)
        created = await manager.create(
            {"name": "n", "type": "client", "allowed_origins": ["https://a.example"]}
        )
        await manager.revoke(created.key.id)
        secret = created.secret.get_secret_value()
        pieces = {secret[i : i + 8] for i in range(len(secret) - 7)}
        admin = redis.Redis.from_url(REDIS_URL)
        try:
            names = [n.decode() for n in admin.scan_iter(match=f"{redis_namespace}:*")]
            assert f"{redis_namespace}:key:{{{created.key.id}}}" in names
            for name in names:
                value = admin.dump(name) or b""
                for piece in pieces:
                    assert piece not in name
                    assert piece.encode() not in value
        finally:
            admin.close()
    finally:
        await store.close()


async def test_unreachable_redis_is_store_unavailable(unused_redis_url: str) -> None:
    """Every operation against a dead Redis raises StoreUnavailable, from redis's error."""
    store = RedisStore.from_url(unused_redis_url, timeout=0.2, pool_timeout=0.2)
    try:
        for call in (store.ping(), store.find("0" * 64), store.get("key_x"), store.list_keys()):
            with pytest.raises(StoreUnavailable) as caught:
                await call
            assert caught.value.__cause__ is not None
            assert "0" * 64 not in str(caught.value)
    finally:
        await store.close()


async def test_redis_command_errors_are_store_errors(redis_namespace: str) -> None:
    """A command Redis refuses (here: the record key holds the wrong type) is a StoreError."""
    store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace)
    admin = redis.Redis.from_url(REDIS_URL)
    try:
        admin.hset(f"{redis_namespace}:index", "x", "y")
        with pytest.raises(StoreError) as caught:
            await store.list_keys()
        assert isinstance(caught.value.__cause__, redis.ResponseError)
    finally:
        admin.close()
        await store.close()


@pytest.mark.parametrize("namespace", ["", "a:b", "a{b}", "a b"])
def test_namespace_must_be_plain(namespace: str) -> None:
    """A namespace that could break hash tags or key parsing is refused."""
    import fakeredis

    with pytest.raises(ValueError, match="namespace"):
        RedisStore(fakeredis.FakeAsyncRedis(), namespace=namespace)


# -- item 14: a crash inside add never leaves a key that authenticates unlisted --------------


class Crash:
    """Make the ``at``-th command or pipeline sent through redis-py fail with a
    ConnectionError: ``lost`` before it reaches Redis, ``unanswered`` after Redis ran it
    (the reply is what is lost)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int, mode: str) -> None:
        from redis.asyncio.client import Pipeline, Redis

        self.at, self.mode, self.calls, self.fired = at, mode, 0, False
        for owner, name in ((Redis, "execute_command"), (Pipeline, "execute")):
            monkeypatch.setattr(owner, name, self._wrap(getattr(owner, name)))

    def _wrap(self, original: Any) -> Any:
        async def wrapped(this: Any, *args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls != self.at:
                return await original(this, *args, **kwargs)
            self.fired = True
            if self.mode == "unanswered":
                await original(this, *args, **kwargs)
            raise redis.ConnectionError("the process died here")

        return wrapped


@pytest.fixture(params=["fakeredis", "redis"])
async def crash_store(request: pytest.FixtureRequest) -> AsyncIterator[RedisStore]:
    """A RedisStore on fakeredis and on the real server (under a fresh namespace)."""
    import fakeredis

    namespace = new_namespace()
    if request.param == "redis":
        require_redis()
        made = RedisStore.from_url(REDIS_URL, namespace=namespace)
    else:
        made = RedisStore(fakeredis.FakeAsyncRedis(), namespace=namespace)
    yield made
    await made.close()
    if request.param == "redis":
        cleanup_namespace(namespace)


@pytest.mark.parametrize("mode", ["lost", "unanswered"])
@pytest.mark.parametrize("at", [1, 2])
async def test_item14_a_crash_inside_add_never_leaves_an_unlisted_key_that_authenticates(
    crash_store: RedisStore, monkeypatch: pytest.MonkeyPatch, at: int, mode: str
) -> None:
    """Whichever of add's writes the process dies at (before Redis runs it, or after but
    before the reply), the key authenticates if and only if it is listed: the digest that
    makes it authenticate is written last, with the index entry. (The old add wrote the
    record and the digest first and indexed them in a second pipeline: a crash between
    the two left a working key no listing showed.)"""
    from test_stores import record

    key, digest = record(14), "e" * 64
    crash = Crash(monkeypatch, at, mode)
    with pytest.raises(StoreUnavailable):
        await crash_store.add(key, digest)
    assert crash.fired
    monkeypatch.undo()
    authenticates = await crash_store.find(digest) is not None
    listed = key.id in [k.id for k in await crash_store.list_keys()]
    assert authenticates == listed, "listing and authentication disagree"
    assert not authenticates or mode == "unanswered"
    if not authenticates:
        # Adding it again (as a retry would, under a new id) works and is consistent.
        again = record(15)
        await crash_store.add(again, digest)
        assert await crash_store.find(digest) == again
        assert again.id in [k.id for k in await crash_store.list_keys()]


async def test_a_retried_digest_write_is_not_a_conflict(crash_store: RedisStore) -> None:
    """redis-py retries a pipeline whose reply a timeout lost: the digest's SET NX then
    finds the digest taken — by this very key. That is the key's own write, not a
    conflict: the key is added, authenticates and keeps no TTL; another key's digest is
    still a conflict."""
    from keystile import KeyConflict
    from test_stores import record

    key, digest = record(15), "f" * 64
    await crash_store.client.set(crash_store.schema.digest(digest), key.id)  # the first try
    await crash_store.add(key, digest)
    assert await crash_store.find(digest) == key
    assert [k.id for k in await crash_store.list_keys()] == [key.id]
    assert await crash_store.client.ttl(crash_store.schema.record(key.id)) == -1
    assert await crash_store.client.ttl(crash_store.schema.digest(digest)) == -1
    with pytest.raises(KeyConflict):
        await crash_store.add(record(16), digest)


# -- the tests' fakeredis clients fail as a dropped Redis does, with redis-py's DEBUG log on -


async def test_a_dropped_fakeredis_server_is_unavailable_with_redis_pys_debug_log_on(
    caplog: pytest.LogCaptureFixture, hasher: KeyHasher
) -> None:
    """The fault tests drop the connections of a fakeredis server made by conftest.fake_redis
    (``server.connected = False``). redis-py 8.2 prints the connection into a DEBUG record of
    each failed write or read: that must still end in redis.ConnectionError (StoreUnavailable
    from the store), never in an error from printing the connection, whatever the log level."""
    import fakeredis

    caplog.set_level(logging.DEBUG, logger="redis.asyncio.connection")
    server = fakeredis.FakeServer()
    client = fake_redis(server)
    store = RedisStore(fake_redis(server), namespace=new_namespace())
    try:
        assert await client.set("k", "v")
        digest = hasher.digest("no-such-secret")
        assert await store.find(digest) is None
        server.connected = False
        with pytest.raises(redis.ConnectionError):
            await client.get("k")
        with pytest.raises(StoreUnavailable) as caught:
            await store.find(digest)
        assert isinstance(caught.value.__cause__, redis.ConnectionError)
    finally:
        await client.aclose()
        await store.close()
