"""The in-process cache: bounded, fresh, and revoking at once (memory, fakeredis, Redis)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis

from conftest import REDIS_URL, _make_store, issue, within
from keystile import KeyHasher, KeyManager, ManualClock, MemoryStore, RedisStore, StoreUnavailable
from keystile.stores import CachedStore, KeyStore
from test_stores import Recorder, settle


async def twin(store: KeyStore, backend: tuple[str, str]) -> KeyStore:
    """A second handle on the same data, as another process would have."""
    kind, namespace = backend
    if kind == "memory":
        return store
    if kind == "fakeredis":
        assert isinstance(store, RedisStore)
        server = store.client.connection_pool.connection_kwargs["server"]
        return await _make_store(kind, namespace, server=server)
    return await _make_store(kind, namespace)


@pytest.fixture
async def other(store: KeyStore, backend: tuple[str, str]) -> AsyncIterator[KeyStore]:
    handle = await twin(store, backend)
    yield handle
    if handle is not store:
        await handle.close()


async def listening(cache: CachedStore) -> None:
    """Make the cache subscribe, and wait until the store's announcements flow."""
    assert await cache.start(timeout=2.0)


async def heard(store: KeyStore, manager: KeyManager, fields: dict[str, Any]) -> tuple[Any, str]:
    """:func:`issue`, then wait until the store's listeners have heard the new key's
    announcement (on a cluster it may come a moment after the write returns), so that a
    lookup made next does not race it."""
    recorder = Recorder()
    store.add_listener(recorder)
    made, digest = await issue(manager, fields)
    await settle(store, lambda: any(i == made.key.id for i, _ in recorder.changes))
    return made, digest


async def test_hits_do_not_reach_the_store(manager: KeyManager, cached: CachedStore) -> None:
    """A looked-up key is served from the cache until its TTL passes."""
    await listening(cached)  # else the subscription's resync may land mid-lookup
    created, digest = await heard(cached.store, manager, {"name": "n", "type": "prod"})
    first = await cached.lookup(digest)
    second = await cached.lookup(digest)
    assert first is second and first is not None
    assert first.record == created.key
    assert (cached.hits, cached.misses) == (1, 1)


async def test_revocation_in_this_process_is_immediate(
    manager: KeyManager, cached: CachedStore
) -> None:
    """The revoking process sees the revocation on its very next lookup."""
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    assert (await cached.find(digest)) == created.key
    await manager.revoke(created.key.id)
    found = await cached.find(digest)
    assert found is not None and found.revoked


@pytest.mark.timing
async def test_revocation_elsewhere_reaches_the_cache(
    manager: KeyManager, cached: CachedStore, other: KeyStore, clock: ManualClock
) -> None:
    """A key revoked through another handle on the store is refused here within 100 ms."""
    await listening(cached)
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    assert await cached.find(digest) == created.key
    await KeyManager(other, manager.hasher, clock=clock).revoke(created.key.id)

    async def refused() -> bool:
        found = await cached.find(digest)
        return found is not None and found.revoked

    await within(0.1, refused)


async def test_ttl_bounds_staleness_when_announcements_are_lost(
    backend: tuple[str, str], store: KeyStore, hasher: KeyHasher
) -> None:
    """A change nobody announced is seen once the entry's TTL has passed."""
    clock = ManualClock(0.0)
    silent = _Deaf(store)
    cache = CachedStore(silent, ttl=10.0, clock=clock)
    manager = KeyManager(store, hasher)  # bypasses the cache: no local invalidation
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    assert await cache.find(digest) == created.key
    await manager.revoke(created.key.id)
    clock.advance(9.9)
    stale = await cache.find(digest)
    assert stale is not None and not stale.revoked
    clock.advance(0.2)
    fresh = await cache.find(digest)
    assert fresh is not None and fresh.revoked


async def test_negative_cache_never_hides_a_new_key(
    manager: KeyManager, cached: CachedStore, other: KeyStore, clock: ManualClock
) -> None:
    """An unknown digest is remembered, but forgotten as soon as that key is created."""
    await listening(cached)
    assert await cached.find("1" * 64) is None
    misses = cached.misses
    assert await cached.find("1" * 64) is None
    assert cached.misses == misses  # served by the negative cache
    # A key created elsewhere is announced; an unknown digest never shadows it.
    created = await KeyManager(other, manager.hasher, clock=clock).create(
        {"name": "later", "type": "dev"}
    )
    digest = manager.hasher.digest(created.secret.get_secret_value())
    assert await cached.find(digest) == created.key


@pytest.mark.timing
async def test_negative_entries_are_dropped_by_the_creation_announcement(
    cached: CachedStore, other: KeyStore, backend: tuple[str, str]
) -> None:
    """A cached 'unknown' for a digest disappears when a key with it is added elsewhere."""
    from test_stores import record

    await listening(cached)
    assert await cached.find("2" * 64) is None
    key = record(3)
    await other.add(key, "2" * 64)

    async def found() -> bool:
        return await cached.find("2" * 64) == key

    await within(0.1, found)


async def test_no_negative_caching_while_deaf(store: KeyStore) -> None:
    """While announcements are not arriving, unknown digests are always asked again."""
    cache = CachedStore(_Deaf(store), clock=ManualClock(0.0))
    assert await cache.find("3" * 64) is None
    assert await cache.find("3" * 64) is None
    assert cache.misses == 2


async def test_size_is_bounded(manager: KeyManager, hasher: KeyHasher, store: KeyStore) -> None:
    """The cache holds at most max_size records, evicting the least recently used."""
    cache = CachedStore(store, max_size=3, negative_size=2, clock=ManualClock(0.0))
    await listening(cache)
    digests = []
    for n in range(5):
        created = await manager.create({"name": f"k{n}", "type": "dev"})
        digests.append(hasher.digest(created.secret.get_secret_value()))
    for digest in digests[:3]:
        await cache.lookup(digest)
    await cache.lookup(digests[0])  # most recently used now
    for digest in digests[3:]:
        await cache.lookup(digest)
    assert len(cache) == 3
    hits = cache.hits
    await cache.lookup(digests[0])
    assert cache.hits == hits + 1
    for n in range(10):
        await cache.lookup(f"{n:064x}")
    assert len(cache._unknown) <= 2


async def test_a_lookup_racing_a_change_is_not_cached(
    manager: KeyManager, hasher: KeyHasher, store: KeyStore
) -> None:
    """A record read before a change was announced is returned but never cached."""
    gate = _Gated(store)
    cache = CachedStore(gate, clock=ManualClock(0.0))
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    lookup = asyncio.create_task(cache.lookup(digest))
    await gate.entered.wait()
    cache.invalidate(created.key.id)  # the announcement of a revocation, say
    gate.release.set()
    assert (await lookup) is not None
    assert len(cache) == 0


async def test_concurrent_misses_share_one_store_lookup(
    manager: KeyManager, hasher: KeyHasher, store: KeyStore
) -> None:
    """Fifty simultaneous lookups of one uncached key cost one store lookup."""
    counting = _Gated(store, gated=False)
    cache = CachedStore(counting, clock=ManualClock(0.0))
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    results = await asyncio.gather(*(cache.find(digest) for _ in range(50)))
    assert results == [created.key] * 50
    assert counting.calls == 1


async def test_store_errors_propagate_and_are_not_cached(unused_redis_url: str) -> None:
    """An unreachable Redis raises StoreUnavailable (from the redis error); nothing is cached."""
    store = RedisStore.from_url(unused_redis_url, timeout=0.2, pool_timeout=0.2)
    cache = CachedStore(store, clock=ManualClock(0.0))
    try:
        for _ in range(2):
            with pytest.raises(StoreUnavailable) as caught:
                await cache.find("4" * 64)
            assert isinstance(caught.value.__cause__, (redis.RedisError, OSError))
        assert len(cache) == 0 and not cache._unknown
    finally:
        await cache.close()


async def test_cache_resynchronises_after_the_connection_returns(
    redis_namespace: str, hasher: KeyHasher
) -> None:
    """When the events connection is dropped and returns, the cache is cleared."""
    name = f"{redis_namespace}-c"
    store = RedisStore.from_url(REDIS_URL, namespace=redis_namespace, client_name=name)
    cache = CachedStore(store)
    recorder = Recorder()
    store.add_listener(recorder)
    try:
        manager = KeyManager(cache, hasher)
        _created, digest = await issue(manager, {"name": "n", "type": "prod"})
        assert await cache.start(timeout=2.0)
        await cache.lookup(digest)
        assert len(cache) == 1
        admin = redis.Redis.from_url(REDIS_URL)
        try:
            clients = admin.client_list()
            ids = [c["id"] for c in clients if c["name"] == name and "P" in c["flags"]]
            assert ids, "the events connection was not found"
            for client_id in ids:
                admin.client_kill_filter(_id=client_id)
        finally:
            admin.close()
        before = recorder.resyncs
        await settle(store, lambda: recorder.resyncs > before, timeout=5.0)
        assert len(cache) == 0
    finally:
        await cache.close()


class _Deaf:
    """A store wrapper whose announcements never arrive (a dropped connection)."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        self.listening = False

    def add_listener(self, listener: Any) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class _Gated(_Deaf):
    """A store wrapper that counts lookups and can hold them until released."""

    def __init__(self, store: KeyStore, *, gated: bool = True) -> None:
        super().__init__(store)
        self.listening = True
        self.calls = 0
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        if not gated:
            self.release.set()

    async def find(self, digest: str) -> Any:
        self.calls += 1
        self.entered.set()
        await self.release.wait()
        return await self._store.find(digest)


def test_memory_store_shares_one_instance() -> None:
    """Two caches over one MemoryStore both hear its announcements."""
    assert MemoryStore().listening


@pytest.mark.timing
async def test_remembered_credentials_follow_the_entry(
    manager: KeyManager, cached: CachedStore, other: KeyStore, clock: ManualClock
) -> None:
    """A remembered credential is recalled only while its entry is alive and fresh: a
    revocation elsewhere, the TTL and a resync each end it."""
    await listening(cached)
    created, digest = await issue(manager, {"name": "n", "type": "prod"})
    credential = b"Bearer " + created.secret.get_secret_value().encode()
    entry = await cached.lookup(digest)
    assert entry is not None
    cached.remember(credential, entry)
    assert cached.recall(credential) is entry
    assert cached.recall(credential + b"x") is None
    await KeyManager(other, manager.hasher, clock=clock).revoke(created.key.id)

    async def forgotten() -> bool:
        return cached.recall(credential) is None

    await within(0.1, forgotten)
    fresh = await cached.lookup(digest)
    assert fresh is not None
    assert fresh.record.revoked
    cached.remember(credential, fresh)
    assert cached.recall(credential) is fresh
    cached.clear()
    assert cached.recall(credential) is None


async def test_remembered_credentials_expire_with_the_ttl(
    store: KeyStore, hasher: KeyHasher
) -> None:
    """A remembered credential is not recalled once its entry's TTL has passed."""
    clock = ManualClock(0.0)
    cache = CachedStore(store, ttl=5.0, clock=clock)
    await listening(cache)  # else the subscription's resync may land mid-lookup
    _created, digest = await heard(store, KeyManager(store, hasher), {"name": "n", "type": "dev"})
    entry = await cache.lookup(digest)
    assert entry is not None
    cache.remember(b"credential", entry)
    clock.advance(4.9)
    assert cache.recall(b"credential") is entry
    clock.advance(0.2)
    assert cache.recall(b"credential") is None


async def test_remembered_credentials_are_bounded(store: KeyStore, hasher: KeyHasher) -> None:
    """No more credentials are remembered than the cache holds entries; dead entries go first,
    and an entry not kept by the cache (a lookup that raced a change) is never remembered."""
    cache = CachedStore(store, max_size=3, clock=ManualClock(0.0))
    await listening(cache)  # else the subscription's resync may land mid-lookup
    manager = KeyManager(store, hasher)
    entries = []
    for n in range(5):
        _, digest = await heard(store, manager, {"name": f"k{n}", "type": "dev"})
        entry = await cache.lookup(digest)
        assert entry is not None
        entries.append(entry)
    for n, entry in enumerate(entries):
        cache.remember(f"c{n}".encode(), entry)
    assert len(cache._remembered) <= 3
    assert [cache.recall(f"c{n}".encode()) is not None for n in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]
    entries[2].alive = False
    cache.remember(b"dead", entries[2])
    assert cache.recall(b"dead") is None
