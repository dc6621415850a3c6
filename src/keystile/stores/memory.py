"""The in-memory store: the embedded default, for the demo, tests and single processes."""

from __future__ import annotations

import bisect
from datetime import datetime

from keystile.exceptions import KeyChanged, KeyConflict, KeyNotFound
from keystile.models import ApiKey
from keystile.records import KeyStatus
from keystile.stores.listing import MemoryListing, matches, select
from keystile.stores.protocol import StoreListener

__all__ = ["MemoryStore"]


class MemoryStore:
    """Key records in a dict. Changes reach listeners synchronously."""

    def __init__(self) -> None:
        self._records: dict[str, ApiKey] = {}
        self._by_digest: dict[str, str] = {}
        self._order: list[str] = []  # ids sort in creation order (see keys.new_key_id)
        self.listing = MemoryListing()
        self._listeners: list[StoreListener] = []

    @property
    def listening(self) -> bool:
        return True  # nothing happens to this store that its listeners do not hear

    def add_listener(self, listener: StoreListener) -> None:
        self._listeners.append(listener)

    def _announce(self, key_id: str, digest: str | None) -> None:
        for listener in self._listeners:
            listener.key_changed(key_id, digest)

    async def add(self, key: ApiKey, digest: str) -> None:
        if key.id in self._records or digest in self._by_digest:
            raise KeyConflict(f"a key with id {key.id} or the same digest already exists")
        self._records[key.id] = key
        self._by_digest[digest] = key.id
        bisect.insort(self._order, key.id)
        self.listing.place(key)
        self._announce(key.id, digest)

    async def get(self, key_id: str) -> ApiKey | None:
        return self._records.get(key_id)

    async def find(self, digest: str) -> ApiKey | None:
        key_id = self._by_digest.get(digest)
        return None if key_id is None else self._records.get(key_id)

    async def replace(self, key: ApiKey, *, expected: ApiKey | None = None) -> None:
        current = self._records.get(key.id)
        if current is None:
            raise KeyNotFound(f"no key with id {key.id}")
        if expected is not None and current != expected:
            raise KeyChanged(f"key {key.id} changed meanwhile")
        self._records[key.id] = key
        self.listing.place(key)
        self._announce(key.id, None)

    async def list_keys(self, *, after: str | None = None, limit: int = 100) -> list[ApiKey]:
        start = 0 if after is None else bisect.bisect_right(self._order, after)
        return [self._records[i] for i in self._order[start : start + max(limit, 0)]]

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
        async def page(start: str | None, count: int) -> tuple[bool, list[str]]:
            settle = None if status in (None, KeyStatus.REVOKED) else now
            ids = self.listing.page(
                now=settle,
                project=project,
                key_type=key_type,
                status=status,
                after=start,
                count=count,
            )
            return False, ids

        async def read(ids: list[str]) -> list[ApiKey | None]:
            return [self._records.get(i) for i in ids]

        async def prune(ids: list[str]) -> None:
            return None  # records are never removed here

        def keep(record: ApiKey) -> bool:
            return matches(record, now=now, project=project, key_type=key_type, status=status)

        return await select(page, read, prune, keep, after=after, limit=limit)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryStore({len(self._records)} keys)"
