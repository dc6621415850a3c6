"""The one contract every key store keeps.

A store holds key records (:class:`~keystile.models.ApiKey`) and an index from the
HMAC digest of each key to its record. It never sees a plaintext key.

Stores announce changes to listeners, so caches in front of them — in this process or,
through Redis pub/sub, in every process sharing the store — drop stale entries at once.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from keystile.models import ApiKey
from keystile.records import KeyStatus

__all__ = ["KeyStore", "StoreListener"]


class StoreListener(Protocol):
    """Receives a store's change announcements."""

    def key_changed(self, key_id: str, digest: str | None) -> None:
        """A record changed (updated, revoked, rotated) or was added (``digest`` given)."""

    def resync(self) -> None:
        """Announcements may have been missed: treat everything cached as stale."""

    def connection_lost(self) -> None:
        """Announcements stopped arriving until the next :meth:`resync`."""


@runtime_checkable
class KeyStore(Protocol):
    """Where key records live. Methods raise :class:`~keystile.exceptions.StoreError`
    (usually :class:`~keystile.exceptions.StoreUnavailable`) when the backend fails."""

    @property
    def listening(self) -> bool:
        """Whether change announcements from other processes are arriving right now."""

    def add_listener(self, listener: StoreListener) -> None:
        """Deliver change announcements to ``listener`` from now on."""

    async def add(self, key: ApiKey, digest: str) -> None:
        """Store a new record; :class:`~keystile.exceptions.KeyConflict` if its id or
        digest is taken."""

    async def get(self, key_id: str) -> ApiKey | None:
        """The record with this public id, if any."""

    async def find(self, digest: str) -> ApiKey | None:
        """The record whose key has this digest, if any (revoked and expired included)."""

    async def replace(self, key: ApiKey, *, expected: ApiKey | None = None) -> None:
        """Overwrite an existing record; :class:`~keystile.exceptions.KeyNotFound` if none.
        With ``expected``, atomically and only if the record still equals it (compare and
        set): :class:`~keystile.exceptions.KeyChanged` otherwise, nothing written."""

    async def list_keys(self, *, after: str | None = None, limit: int = 100) -> list[ApiKey]:
        """Up to ``limit`` records in creation order, starting after the id ``after``."""

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
        """Up to ``limit`` records in creation order after the id ``after`` that are in
        ``project``, of ``key_type`` and have ``status`` at ``now`` (``None``: any), read
        from the store's listing index: about ``limit`` records are read, however many
        the store holds."""

    async def ping(self) -> None:
        """Raise :class:`~keystile.exceptions.StoreUnavailable` unless the store answers."""

    async def close(self) -> None:
        """Release connections and background tasks. Idempotent."""
