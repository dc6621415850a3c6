"""Listing at scale: project, type and status filters answer from the store's listing index,
exactly, a page at a time, reading about a page of records however many are stored."""

from __future__ import annotations

import itertools
from typing import Any

import fakeredis
import pytest

from conftest import BACKENDS, SECRET, _make_store, cleanup_namespace, new_namespace, require_redis
from keystile import (
    ApiKey,
    KeyHasher,
    KeyManager,
    KeyNotFound,
    ManualClock,
    MemoryStore,
    RedisStore,
)
from keystile.clock import to_datetime
from keystile.keys import new_key_id
from keystile.manager import KeyStatus, key_status
from keystile.stores import KeyStore
from keystile.stores.cache import CachedStore
from keystile.stores.listing import PARTS

TYPES = ("dev", "prod", "client")
PROJECTS = ("default", "search")
STATUSES = (None, "active", "rotated", "revoked", "expired")


def inner(store: KeyStore) -> KeyStore:
    return store.store if isinstance(store, CachedStore) else store


async def everything(manager: KeyManager) -> list[ApiKey]:
    """Every stored record, by walking the plain id index."""
    found: list[ApiKey] = []
    after = None
    while page := await manager.store.list_keys(after=after, limit=500):
        found += page
        after = page[-1].id
    return found


async def walk(manager: KeyManager, limit: int = 2, **filters: Any) -> list[str]:
    """The ids a listing gives, page after page."""
    seen: list[str] = []
    cursor = None
    while True:
        page = await manager.list(limit=limit, cursor=cursor, **filters)
        assert len(page.keys) <= limit
        seen += [k.id for k in page.keys]
        if page.next is None:
            return seen
        assert len(page.keys) == limit  # no short pages without metadata filters
        cursor = page.next


async def index_of(store: KeyStore) -> dict[str, dict[str, int]]:
    """The listing index's sets (``project:type:part`` -> id -> score), as stored."""
    store = inner(store)
    if isinstance(store, MemoryStore):
        out: dict[str, dict[str, int]] = {}
        for (project, key_type), block in store.listing._sets.items():
            for name, part in zip(PARTS, block, strict=True):
                out[f"{project or '*'}:{key_type}:{name}"] = dict(part.scores)
        return out
    assert isinstance(store, RedisStore)
    out = {}
    for project, key_type, part in itertools.product((*PROJECTS, None), TYPES, PARTS):
        name = store.schema.listing(project, key_type, part)
        members = await store.client.zrange(name, 0, -1, withscores=True)
        out[f"{project or '*'}:{key_type}:{part}"] = {
            (m.decode() if isinstance(m, bytes) else m): int(s) for m, s in members
        }
    return out


async def assert_index_holds(manager: KeyManager, *, settled: bool) -> None:
    """Each stored key is in exactly one status set of its project and of every project,
    the right one once settled, and held by its expiry iff it has one and is not revoked;
    nothing else is in the index."""
    index = await index_of(manager.store)
    records = await everything(manager)
    now = manager.now()
    for group in ("project", "*"):
        expected: dict[str, dict[str, int]] = {}
        for key in records:
            where = key.project if group == "project" else "*"
            status = key_status(key, now).value if settled else None
            statuses = [p for p in PARTS[:4] if key.id in index[f"{where}:{key.type}:{p}"]]
            assert len(statuses) == 1, (key.id, statuses)
            if settled:
                assert statuses == [status], key.id
            for part in PARTS[4:]:
                expected.setdefault(f"{where}:{key.type}:{part}", {})
            if key.expires_at is not None and not key.revoked:
                state = "rotated" if key.replaced_by else "active"
                held = [p for p in PARTS[4:] if key.id in index[f"{where}:{key.type}:{p}"]]
                assert len(held) == 1 and held[0].endswith(state), (key.id, held)
        total = sum(
            len(ids)
            for name, ids in index.items()
            if name.split(":")[-1] in PARTS[:4] and (name.startswith("*:") == (group == "*"))
        )
        assert total == len(records), "the index holds ids no record has"


async def populate(manager: KeyManager, clock: ManualClock) -> None:
    """Keys of every type in two projects, some rotated, revoked, expiring or expired."""
    for n, (project, key_type) in enumerate(itertools.product(PROJECTS, TYPES)):
        for m in range(4):
            fields: dict[str, Any] = {"name": f"k{n}.{m}", "type": key_type}
            if key_type == "client":
                fields["allowed_origins"] = ["https://app.example"]
            if m == 1:
                fields["expires_at"] = to_datetime(clock.now + 100 + n)
            created = await manager.create(fields, project=project)
            clock.advance(1)
            if m == 2:
                await manager.revoke(created.key.id)
            if m == 3:
                await manager.rotate(created.key.id, grace=50 + 10 * n)
            if m == 0 and n % 2:
                await manager.update(created.key.id, name="renamed")


async def test_filters_list_exactly_the_matching_records_page_by_page(
    manager: KeyManager, clock: ManualClock
) -> None:
    """Every combination of project, type and status lists exactly the records that match,
    in creation order, across pages of 2, as the clock passes expiries and comes back."""
    await populate(manager, clock)
    for advance in (0, 80, 40, -70):  # expiries pass, then the clock goes back
        clock.advance(advance)
        records = await everything(manager)
        now = manager.now()
        for project, key_type, status in itertools.product(
            (None, *PROJECTS), (None, *TYPES), STATUSES
        ):
            expected = [
                k.id
                for k in records
                if (project is None or k.project == project)
                and (key_type is None or k.type == key_type)
                and (status is None or key_status(k, now) == status)
            ]
            got = await walk(manager, project=project, type=key_type, status=status)
            assert got == expected, (advance, project, key_type, status)
        await assert_index_holds(manager, settled=True)


async def test_the_index_follows_every_change(manager: KeyManager, clock: ManualClock) -> None:
    """After creates, updates (expiry set, moved, cleared), rotations, revocations and
    expiries, each key is in exactly its status's set, and the index holds nothing else."""
    await populate(manager, clock)
    await assert_index_holds(manager, settled=False)
    [first, *_] = await everything(manager)
    await manager.update(first.id, expires_at=to_datetime(clock.now + 5))
    clock.advance(10)
    assert first.id in await walk(manager, status="expired")
    await manager.update(first.id, expires_at=to_datetime(clock.now + 500))
    assert first.id in await walk(manager, status="active")
    await manager.update(first.id, expires_at=None)
    await assert_index_holds(manager, settled=False)
    assert first.id in await walk(manager, status="active")
    await manager.revoke(first.id)
    assert first.id in await walk(manager, status="revoked", project="default")
    clock.advance(1000)
    for project in (None, *PROJECTS):  # each project's sets are settled by its listings
        assert await walk(manager, status="active", project=project) == [
            k.id
            for k in await everything(manager)
            if key_status(k, manager.now()) == "active" and project in (None, k.project)
        ]
    await assert_index_holds(manager, settled=True)


async def test_a_key_whose_digest_is_taken_leaves_no_index_entry(store: KeyStore) -> None:
    """An add refused for a taken digest leaves nothing in the listing index."""
    manager = KeyManager(store, KeyHasher(SECRET), clock=ManualClock())
    created = await manager.create({"name": "a", "type": "dev"})
    other = ApiKey.model_validate(
        {**created.key.model_dump(), "id": new_key_id(manager.clock() + 1), "name": "b"}
    )
    digest = manager.hasher.digest(created.secret.get_secret_value())
    with pytest.raises(Exception, match="already exists"):
        await store.add(other, digest)
    assert await walk(manager) == [created.key.id]
    await assert_index_holds(manager, settled=True)


async def test_a_listing_reads_about_a_page_of_records(
    store: KeyStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Listing 5 revoked keys among 400 reads no more than a page (and the one that
    tells another page follows) of records — not the 400."""
    clock = ManualClock()
    manager = KeyManager(store, KeyHasher(SECRET), clock=clock)
    revoked = []
    for n in range(400):
        created = await manager.create({"name": f"k{n}", "type": "prod"})
        clock.advance(1)  # ids in creation order
        if n % 80 == 7:
            await manager.revoke(created.key.id)
            revoked.append(created.key.id)
    reads = count_reads(store, monkeypatch)
    page = await manager.list(status="revoked", limit=3)
    assert [k.id for k in page.keys] == revoked[:3] and page.next is not None
    assert reads[0] <= 4
    reads[0] = 0
    page = await manager.list(status="revoked", limit=3, cursor=page.next)
    assert [k.id for k in page.keys] == revoked[3:] and page.next is None
    assert reads[0] <= 3
    reads[0] = 0
    page = await manager.list(type="dev")
    assert page.keys == () and reads[0] == 0


def count_reads(store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A counter of the records the store reads from now on."""
    reads = [0]
    if isinstance(store, MemoryStore):

        class Counting(dict[str, ApiKey]):
            def get(self, key: str, default: Any = None) -> Any:
                reads[0] += 1
                return super().get(key, default)

            def __getitem__(self, key: str) -> ApiKey:
                reads[0] += 1
                return super().__getitem__(key)

        monkeypatch.setattr(store, "_records", Counting(store._records))
    else:
        parse = ApiKey.model_validate_json

        def counted(raw: Any, **kwargs: Any) -> ApiKey:
            reads[0] += 1
            return parse(raw, **kwargs)

        monkeypatch.setattr(ApiKey, "model_validate_json", counted)
    return reads


async def write_the_old_way(store: RedisStore, key: ApiKey, digest: str) -> None:
    """What a keystile without the listing index stored for a key."""
    await store.client.set(store.schema.record(key.id), key.model_dump_json())
    await store.client.set(store.schema.digest(digest), key.id)
    await store.client.zadd(store.schema.index, {key.id: 0})


@pytest.mark.parametrize("kind", ["fakeredis", "redis", "cluster"])
async def test_keys_stored_before_the_index_are_indexed_on_first_listing(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """A store written by a keystile without the index is indexed, once, by its first
    listing, which then lists exactly; the index's version is set."""
    namespace = new_namespace()
    if kind == "redis":
        require_redis()
    cluster = request.getfixturevalue("redis_cluster") if kind == "cluster" else None
    store = await _make_store(kind, namespace)
    assert isinstance(store, RedisStore)
    try:
        clock = ManualClock()
        keys = []
        for n in range(30):
            key = ApiKey.model_validate(
                {
                    "id": new_key_id(clock.now + n),
                    "name": f"old {n}",
                    "type": TYPES[n % 3],
                    "hint": "dev_...abcd",
                    "project": PROJECTS[n % 2],
                    "created_at": to_datetime(clock.now + n),
                    "revoked_at": to_datetime(clock.now + n) if n % 5 == 0 else None,
                    "expires_at": to_datetime(clock.now + 10) if n % 7 == 1 else None,
                }
            )
            await write_the_old_way(store, key, f"{n:064x}")
            keys.append(key)
        assert await store.client.get(store.schema.listing_version) is None
        clock.advance(100)
        manager = KeyManager(store, KeyHasher(SECRET), clock=clock)
        now = manager.now()
        for status in STATUSES:
            expected = [k.id for k in keys if status is None or key_status(k, now) == status]
            assert await walk(manager, limit=4, status=status) == expected, status
        assert await walk(manager, project="search", type="prod") == [
            k.id for k in keys if k.project == "search" and k.type == "prod"
        ]
        assert await store.client.get(store.schema.listing_version) == b"1"
        await assert_index_holds(manager, settled=False)
        # A store that starts afresh on the namespace finds the version: no reindex.
        store.listing.indexed = False
        calls: list[int] = []

        async def reindex() -> int:
            calls.append(1)
            return 0

        store.listing.reindex = reindex  # type: ignore[method-assign]
        await store.list_matching(now=now, status=KeyStatus.REVOKED)
        assert calls == []
    finally:
        await store.close()
        if kind == "redis":
            cleanup_namespace(namespace)
        if cluster is not None:
            cluster.cleanup(namespace)


async def test_a_new_namespace_needs_no_reindex() -> None:
    """A namespace whose first key is written by this keystile is marked complete then."""
    store = RedisStore(fakeredis.FakeAsyncRedis(), namespace="fresh")
    manager = KeyManager(store, KeyHasher(SECRET), clock=ManualClock())
    await manager.create({"name": "a", "type": "dev"})
    assert await store.client.get(store.schema.listing_version) == b"1"
    await store.close()


@pytest.mark.parametrize("backend", [kind for kind in BACKENDS if kind != "memory"], indirect=True)
async def test_an_entry_whose_record_is_gone_leaves_the_index(manager: KeyManager) -> None:
    """An id whose record is gone (a crashed add's record expires) is skipped by a listing
    and taken out of the index."""
    store = inner(manager.store)
    kept = await manager.create({"name": "kept", "type": "dev"})
    gone = await manager.create({"name": "gone", "type": "dev"})
    assert isinstance(store, RedisStore)  # the memory store's records never go
    await store.client.delete(store.schema.record(gone.key.id))
    assert await walk(manager, status="active") == [kept.key.id]
    assert await walk(manager, project="default") == [kept.key.id]
    index = await index_of(store)
    assert not any(gone.key.id in ids for ids in index.values())


async def test_a_write_that_finds_no_record_indexes_nothing(store: KeyStore) -> None:
    """Replacing a record that is not stored is KeyNotFound, and the index gains nothing
    (on a standalone Redis the record's SET XX and its placement are one script)."""
    manager = KeyManager(store, KeyHasher(SECRET), clock=ManualClock())
    stray = ApiKey.model_validate(
        {
            "id": new_key_id(manager.clock()),
            "name": "stray",
            "type": "dev",
            "hint": "dev_...abcd",
            "created_at": manager.now(),
        }
    )
    with pytest.raises(KeyNotFound):
        await store.replace(stray)
    index = await index_of(store)
    assert not any(stray.id in ids for ids in index.values())
    assert await walk(manager) == []


@pytest.mark.parametrize("kind", ["fakeredis", "redis"])
async def test_a_late_placement_never_moves_a_key_back(
    kind: str,
) -> None:
    """A placement from a record read before a revocation (a reindex running beside a
    writer, a late writer on a cluster) leaves the key revoked in the index."""
    if kind == "redis":
        require_redis()
    namespace = new_namespace()
    store = await _make_store(kind, namespace)
    assert isinstance(store, RedisStore)
    try:
        manager = KeyManager(store, KeyHasher(SECRET), clock=ManualClock())
        created = await manager.create({"name": "a", "type": "dev"})
        await manager.revoke(created.key.id)
        await store.listing.place(created.key)  # the record as it was before
        assert await walk(manager, status="revoked") == [created.key.id]
        assert await walk(manager, status="active") == []
        await assert_index_holds(manager, settled=True)
    finally:
        await store.close()
        if kind == "redis":
            cleanup_namespace(namespace)


async def test_a_type_the_app_declares_is_listed_with_the_others(
    cached: CachedStore, hasher: KeyHasher, clock: ManualClock
) -> None:
    """Keys of an app's own type are in the listings over every type, by their type, and
    (on Redis) in a second process's listings, which learns the type from the store."""
    from keystile.models import DEFAULT_TYPE_POLICIES, KeyPolicy, KeyTypePolicy

    policy = KeyPolicy({**DEFAULT_TYPE_POLICIES, "partner": KeyTypePolicy(prefix="partner_")})
    manager = KeyManager(cached, hasher, clock=clock, policy=policy)
    dev = (await manager.create({"name": "d", "type": "dev"})).key.id
    partners = [(await manager.create({"name": "p", "type": "partner"})).key.id for _ in "ab"]
    assert sorted(await walk(manager)) == sorted([dev, *partners])
    assert await walk(manager, type="partner") == sorted(partners)
    assert await walk(manager, type="partner", status="active", project="default") == sorted(
        partners
    )
    store = inner(cached)
    if isinstance(store, RedisStore):  # another process: nothing of this one's memory
        other = RedisStore(store.client, namespace=store.namespace)
        elsewhere = KeyManager(other, hasher, clock=clock, policy=policy)
        assert sorted(await walk(elsewhere)) == sorted([dev, *partners])
