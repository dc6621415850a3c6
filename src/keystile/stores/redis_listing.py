"""The listing index in Redis (:mod:`keystile.stores.listing` says what it holds): its
sets are hash-tagged by project, so each placement and each page is one script in one slot.

On a standalone Redis a record's write and its placement are one script
(``key_place.lua``): both or neither. On a Redis Cluster the record (tagged by key id) and
the index (tagged by project) live in different slots, so the placement follows the
record's write, one script per group; a crash in between leaves the key under its former
status until its next write or a :meth:`RedisListing.reindex` — listings check each record
they read, so it is never listed under a status it does not have.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

from keystile.models import ApiKey, KeyType
from keystile.records import KeyStatus
from keystile.redis.connect import RedisClient
from keystile.redis.errors import redis_errors
from keystile.redis.schema import RedisSchema
from keystile.redis.scripts import lua
from keystile.stores.listing import (
    PARTS,
    SETTLE_BOUND,
    matches,
    micros,
    positions,
    select,
    stored_state,
)

__all__ = ["LISTING_VERSION", "RedisListing"]

# The listing index's version (RedisSchema.listing_version): a store finding another (or
# none) indexes every stored key once, then sets it.
LISTING_VERSION = "1"
_REINDEX_CHUNK = 500


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisListing:
    """One namespace's listing index."""

    def __init__(
        self,
        client: RedisClient,
        schema: RedisSchema,
        *,
        cluster: bool,
        read: Callable[[Sequence[str]], Awaitable[list[ApiKey | None]]],
    ) -> None:
        self.client = client
        self.schema = schema
        self.cluster = cluster
        self._read = read  # records by id, in order (None: gone)
        self._place_script = client.register_script(lua("key_place"))
        self._select = client.register_script(lua("key_select"))
        self.indexed = False  # the index known to hold every key (its version is set)
        self._registered: set[str] = set()  # type names this process added to the types set
        self.asked = False  # its version read once

    def sets(self, project: str | None, key_type: str) -> list[str]:
        """The listing index's sets of ``key_type`` in ``project`` (``None``: over all)."""
        return [self.schema.listing(project, str(key_type), part) for part in PARTS]

    async def register(self, key_type: str) -> None:
        """Note ``key_type`` in the set of the types keys were indexed with (before any key
        of it is placed: a listing over every type reads that set), once per process."""
        if key_type not in self._registered:
            with redis_errors("indexing a key"):
                await self.client.sadd(self.schema.listing_types, str(key_type))
            self._registered.add(key_type)

    async def types(self) -> list[str]:
        """Every type keys were indexed with (the built-in ones at least)."""
        with redis_errors("listing keys"):
            held = await self.client.smembers(self.schema.listing_types)
        return sorted({*(t.value for t in KeyType), *(_text(t) for t in held)})

    def groups(self, key: ApiKey) -> list[list[str]]:
        """The two groups of sets a key is listed in: its project's, and every project's."""
        return [self.sets(key.project, key.type), self.sets(None, key.type)]

    @staticmethod
    def _placement(key: ApiKey, state: str | None = None) -> list[str]:
        """key_place.lua's arguments after the record: id, state, expiry."""
        ends = "" if key.expires_at is None or key.revoked else str(micros(key.expires_at))
        return [key.id, state or stored_state(key), ends]

    async def place(self, key: ApiKey, *, pipe: Any = None, state: str | None = None) -> None:
        """Place ``key`` in the listing index as its record stands (``state="none"``: take
        it out). On a standalone Redis one script for both groups (queued on ``pipe`` if
        given); on a cluster, whose groups live in two slots, one script each."""
        args = ["", *self._placement(key, state)]
        await self.register(key.type)
        groups = self.groups(key)
        if self.cluster:
            for names in groups:
                await self._place_script(keys=names, args=args)
        else:
            await self._place_script(keys=[n for g in groups for n in g], args=args, client=pipe)

    async def write(self, pipe: Any, key: ApiKey, name: str, record: str) -> None:
        """Queue, on a standalone Redis, the record's SET XX and its listing index in one
        script (key_place.lua): both or neither, whatever crashes."""
        await self.register(key.type)
        names = [n for group in self.groups(key) for n in group]
        await self._place_script(
            keys=[name, *names], args=[record, *self._placement(key)], client=pipe
        )

    async def list_matching(
        self,
        *,
        now: datetime,
        project: str | None = None,
        key_type: str | None = None,
        status: KeyStatus | None = None,
        after: str | None = None,
        limit: int = 100,
    ) -> list[ApiKey]:
        """See :class:`~keystile.stores.KeyStore`: one script call (key_select.lua, in the
        project's slot) per page of ids, then one read of their records."""
        if limit <= 0:
            return []
        await self.ensure()
        types = await self.types() if key_type is None else [key_type]
        names = [n for t in types for n in self.sets(project, t)]
        settle = "" if status in (None, KeyStatus.REVOKED) else str(micros(now))
        sets = [str(p) for p in positions(status)]

        async def page(start: str | None, count: int) -> tuple[bool, list[str]]:
            with redis_errors("listing keys"):
                reply = await self._select(
                    keys=names, args=[settle, start or "", count, SETTLE_BOUND, *sets]
                )
            return int(reply[0]) == 1, [_text(i) for i in reply[1:]]

        async def prune(ids: list[str]) -> None:
            """Take ids whose record is gone (expired before its add completed) out."""
            every = [n for t in await self.types() for n in self.sets(project, t)]
            with redis_errors("listing keys"):
                for key_id in ids:
                    await self._place_script(keys=every, args=["", key_id, "none", ""])
                    await self.client.zrem(self.schema.index, key_id)

        def keep(record: ApiKey) -> bool:
            return matches(record, now=now, project=project, key_type=key_type, status=status)

        return await select(page, self._read, prune, keep, after=after, limit=limit)

    async def ensure(self, *, reindex: bool = True) -> None:
        """Know (once per store) that the listing index holds every key: its version is
        set, or no key is stored yet (a new namespace: set it); else, with ``reindex``,
        index them all now (without: leave that to the first listing, asking once)."""
        if self.indexed or (self.asked and not reindex):
            return
        self.asked = True
        with redis_errors("listing keys"):
            version = await self.client.get(self.schema.listing_version)
            if version is None and not await self.client.zcard(self.schema.index):
                await self.client.set(self.schema.listing_version, LISTING_VERSION, nx=True)
                version = LISTING_VERSION.encode()
        if version is not None and _text(version) == LISTING_VERSION:
            self.indexed = True
        elif reindex:
            await self.reindex()

    async def reindex(self) -> int:
        """Place every stored key in the listing index, as its record stands, then mark the
        index complete (its version). Run once, by the first listing, on a store written
        by a keystile without the index; safe to run again, and beside writers (a key's
        state never moves back: see key_place.lua). The number of keys indexed."""
        indexed, after = 0, b"-"
        while True:
            with redis_errors("indexing keys"):
                ids = await self.client.zrangebylex(
                    self.schema.index, after, b"+", start=0, num=_REINDEX_CHUNK
                )
            records = [r for r in await self._read([_text(i) for i in ids]) if r is not None]
            with redis_errors("indexing keys"):
                if self.cluster:
                    for record in records:
                        await self.place(record)
                else:
                    async with self.client.pipeline(transaction=False) as pipe:
                        for record in records:
                            await self.place(record, pipe=pipe)
                        await pipe.execute()
            indexed += len(records)
            if len(ids) < _REINDEX_CHUNK:
                break
            after = b"(" + _text(ids[-1]).encode()
        with redis_errors("indexing keys"):
            await self.client.set(self.schema.listing_version, LISTING_VERSION)
        self.indexed = True
        return indexed
