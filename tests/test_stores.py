"""The store contract, run against memory, fakeredis and the real Redis server."""

from __future__ import annotations

import asyncio
from typing import Any

import fakeredis
import pytest

from keystile import ApiKey, KeyChanged, KeyConflict, KeyNotFound
from keystile.clock import to_datetime
from keystile.keys import new_key_id
from keystile.stores import KeyStore, MemoryStore, RedisStore

T0 = 1_800_000_000.0


def record(n: int = 0, **fields: Any) -> ApiKey:
    data: dict[str, Any] = {
        "id": new_key_id(T0 + n),
        "name": f"key {n}",
        "type": "prod",
        "hint": "prod_...abcd",
        "scopes": ["vec:read"],
        "created_at": to_datetime(T0 + n),
    }
    data.update(fields)
    return ApiKey.model_validate(data)


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, str | None]] = []
        self.resyncs = 0
        self.lost = 0

    def key_changed(self, key_id: str, digest: str | None) -> None:
        self.changes.append((key_id, digest))

    def resync(self) -> None:
        self.resyncs += 1

    def connection_lost(self) -> None:
        self.lost += 1


async def settle(store: KeyStore, condition: Any, timeout: float = 2.0) -> None:
    """Wait (bounded) until a pub/sub announcement has arrived."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "announcement never arrived"
        await asyncio.sleep(0.005)


def test_stores_keep_the_protocol() -> None:
    """Both stores satisfy the KeyStore protocol."""
    assert isinstance(MemoryStore(), KeyStore)
    assert isinstance(RedisStore(fakeredis.FakeAsyncRedis()), KeyStore)


async def test_add_then_find_and_get(store: KeyStore) -> None:
    """A record added under a digest comes back by digest and by id, unchanged."""
    key = record(metadata={"project": "search"}, allowed_ips=["10.0.0.0/8"])
    await store.add(key, "d" * 64)
    assert await store.find("d" * 64) == key
    assert await store.get(key.id) == key


async def test_unknown_lookups_return_none(store: KeyStore) -> None:
    """Unknown digests and ids are None, not errors."""
    assert await store.find("0" * 64) is None
    assert await store.get("key_doesnotexist") is None


async def test_add_refuses_a_taken_id_or_digest(store: KeyStore) -> None:
    """Adding a second record with a taken id or digest is a conflict and changes nothing."""
    key = record()
    await store.add(key, "a" * 64)
    with pytest.raises(KeyConflict):
        await store.add(key, "b" * 64)
    with pytest.raises(KeyConflict):
        await store.add(record(1), "a" * 64)
    assert await store.find("b" * 64) is None
    assert await store.find("a" * 64) == key
    assert [k.id for k in await store.list_keys()] == [key.id]


async def test_replace_overwrites_and_requires_an_existing_record(store: KeyStore) -> None:
    """replace() updates a record in place; replacing an unknown id is KeyNotFound."""
    key = record()
    await store.add(key, "c" * 64)
    revoked = key.model_copy(update={"revoked_at": to_datetime(T0 + 5)})
    await store.replace(revoked)
    assert await store.find("c" * 64) == revoked
    with pytest.raises(KeyNotFound):
        await store.replace(record(9))
    assert await store.get(record(9).id) is None


async def test_replace_with_expected_is_compare_and_set(store: KeyStore) -> None:
    """replace(expected=...) writes only over the record it expects: over anything else
    (another writer got there first) it is KeyChanged and the stored record stays."""
    key = record()
    await store.add(key, "d" * 64)
    renamed = key.model_copy(update={"name": "renamed"})
    await store.replace(renamed, expected=key)
    assert await store.get(key.id) == renamed
    stale = key.model_copy(update={"name": "stale write"})
    with pytest.raises(KeyChanged):
        await store.replace(stale, expected=key)  # it expects the record before the rename
    assert await store.get(key.id) == renamed
    with pytest.raises(KeyNotFound):
        await store.replace(record(9), expected=record(9))


async def test_list_pages_in_creation_order(store: KeyStore) -> None:
    """list_keys walks records in creation order, a page at a time."""
    keys = [record(n) for n in range(7)]
    for n, key in enumerate(reversed(keys)):
        await store.add(key, f"{n:064x}")
    first = await store.list_keys(limit=3)
    second = await store.list_keys(after=first[-1].id, limit=3)
    third = await store.list_keys(after=second[-1].id, limit=3)
    assert [k.id for k in first + second + third] == [k.id for k in keys]
    assert await store.list_keys(after=keys[-1].id) == []
    assert await store.list_keys(limit=0) == []


async def test_changes_are_announced(store: KeyStore) -> None:
    """add and replace announce the key id (and, for add, the digest) to listeners."""
    recorder = Recorder()
    store.add_listener(recorder)
    if isinstance(store, RedisStore):
        await settle(store, lambda: store.listening)
    key = record()
    await store.add(key, "e" * 64)
    await store.replace(key.model_copy(update={"name": "renamed"}))
    await settle(store, lambda: len(recorder.changes) >= 2)
    assert recorder.changes == [(key.id, "e" * 64), (key.id, None)]


async def test_ping(store: KeyStore) -> None:
    """ping() succeeds on a reachable store."""
    await store.ping()
