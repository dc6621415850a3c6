"""An in-process cache in front of a key store, that still revokes at once.

- Bounded: at most ``max_size`` records (least recently used go first) and
  ``negative_size`` unknown digests.
- Fresh: an entry fetched while the store's change announcements flow lives
  ``announced_ttl`` seconds (minutes: an unchanged key stays cached), because the
  announcements drop it as soon as its key changes — synchronously for changes made in
  this process, through Redis pub/sub for changes made elsewhere — so a revoked key is
  refused on the next request here and within milliseconds everywhere else. Otherwise an
  entry lives ``ttl`` seconds (seconds). When announcements stop (connection dropped or
  silent), every entry older than ``ttl`` is re-validated before it is trusted again, so
  staleness is bounded by ``ttl`` as before, and the cache is cleared when they resume.
- Cheap to miss: misses of the same event-loop iteration (different keys too) go to the
  store together, one round trip for all (a store with ``find_many``: on a standalone Redis
  or Sentinel one script call, keys never seen included); on a Redis Cluster a key whose
  id is still known (its entry expired, was evicted or was dropped) is re-read in one
  round trip, one never seen in two.
- Honest about unknowns: an unknown digest is remembered ``negative_ttl`` seconds, only
  while announcements are arriving, and forgotten as soon as a key with that digest is
  added anywhere — so it never hides a key created afterwards.
- A lookup that raced with a change is not cached: a fetch started before an
  announcement may have read the old record.
- Small in bytes, whatever clients send: the credential map (see :meth:`CachedStore.remember`)
  holds at most ``max_size`` credentials of at most :data:`MAX_CREDENTIAL` bytes each.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from datetime import datetime

from keystile.clock import Clock
from keystile.models import ApiKey
from keystile.principal import Principal
from keystile.records import KeyStatus
from keystile.stores.batch import MissBatch
from keystile.stores.protocol import KeyStore, StoreListener

__all__ = ["MAX_CREDENTIAL", "CacheEntry", "CachedStore"]

# The longest credential remembered, in bytes. ``Bearer `` and the longest key (a 32-byte
# prefix, 33 more) take 72: anything longer is padding, and padding is never remembered.
MAX_CREDENTIAL = 256


class CacheEntry:
    """One cached record, and room for the :class:`~keystile.principal.Principal` the
    middleware derives from it (see :func:`keystile.principal.principal_of`).

    ``alive`` turns false the moment the entry leaves the cache (invalidated, evicted,
    cleared), so a reference kept elsewhere (see :meth:`CachedStore.remember`) is never
    trusted past that moment.
    """

    __slots__ = ("alive", "credential", "digest", "fetched", "fresh_until", "principal", "record")

    def __init__(self, record: ApiKey, digest: str, fetched: float, fresh_until: float) -> None:
        self.record = record
        self.digest = digest
        self.fetched = fetched
        self.fresh_until = fresh_until
        self.principal: Principal | None = None
        self.credential: bytes | None = None  # the one remembered for it, if any
        self.alive = True


class CachedStore:
    """A :class:`~keystile.stores.protocol.KeyStore` with a bounded cache in front.

    Its reads, by what they are given and whether they may wait on the store:

    ==================  ===========  ===========  =========================================
    method              given        may do I/O   answers
    ==================  ===========  ===========  =========================================
    :meth:`recall`      credential   no           the entry an admitted ``Bearer`` value
                                                  resolved to (the middleware's fast path)
    :meth:`peek`        digest       no           the fresh entry, else ``None``
    :meth:`lookup`      digest       yes          the entry (cached, or fetched and cached)
    :meth:`find`        digest       yes          :meth:`lookup`'s record
    :meth:`cached`      key id       no           the fresh entry's record, else ``None``
    :meth:`get`         key id       yes          the store's record, never the cache's:
                                                  what is read to be written back must be
                                                  current
    ==================  ===========  ===========  =========================================
    """

    def __init__(
        self,
        store: KeyStore,
        *,
        max_size: int = 10_000,
        ttl: float = 10.0,
        negative_size: int = 10_000,
        negative_ttl: float = 2.0,
        clock: Clock = time.monotonic,
        announced_ttl: float | None = None,
    ) -> None:
        if max_size < 1 or negative_size < 0 or ttl <= 0 or negative_ttl < 0:
            raise ValueError("cache sizes must be positive and TTLs non-negative")
        self.store = store
        self.max_size = max_size
        self.ttl = ttl
        # While announcements flow (never shorter than ttl; None: ttl, as before).
        self.announced_ttl = ttl if announced_ttl is None else max(ttl, announced_ttl)
        self.negative_size = negative_size
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._ids: dict[str, str] = {}  # key id -> digest of its cached entry
        self._unknown: OrderedDict[str, float] = OrderedDict()  # digest -> fresh until
        self._inflight: dict[str, asyncio.Future[CacheEntry | None]] = {}
        # Digest -> key id of entries that left the cache: a digest names one id for good,
        # so its record is re-read in one round trip (bounded like the cache).
        self._hints: OrderedDict[str, str] = OrderedDict()
        self._batch = MissBatch(store)
        self._background: set[asyncio.Task[CacheEntry | None]] = set()
        # Credential bytes -> entry, for entries alive in the cache (see remember()).
        self._remembered: dict[bytes, CacheEntry] = {}
        self._epoch = 0  # bumped by every invalidation; see _fetch
        self._heard = False  # something cached was fetched while announcements flowed
        self._resyncs = 0
        self._listener = _Invalidator(self)
        self._subscribed = False
        self.hits = 0
        self.misses = 0

    def _subscribe(self) -> None:
        # Deferred to the first lookup: a Redis store starts its listener task there,
        # which needs a running event loop.
        if not self._subscribed:
            self._subscribed = True
            self.store.add_listener(self._listener)

    async def start(self, timeout: float = 1.0) -> bool:
        """Subscribe to the store's announcements and wait, at most ``timeout`` seconds, until
        they flow; whether they do. Lookups work either way (see the module docstring)."""
        self._subscribe()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self.store.listening and loop.time() < deadline:
            await asyncio.sleep(0.01)
        return self.store.listening

    # -- lookups ----------------------------------------------------------------------------

    def recall(self, credential: bytes) -> CacheEntry | None:
        """The live, fresh entry remembered for these exact credential bytes, if any; one
        found dead or stale is forgotten."""
        entry = self._remembered.get(credential)
        if entry is not None:
            if entry.alive and entry.fresh_until > self._clock():
                self.hits += 1
                return entry
            del self._remembered[credential]
            entry.credential = None
        return None

    def remember(self, credential: bytes, entry: CacheEntry) -> None:
        """Remember which entry these credential bytes resolved to, so a repeat request
        skips the checksum and the HMAC. An entry is trusted only while it is alive and
        fresh, so revocation and TTL apply unchanged.

        Bounded in count like the cache (``max_size``) and so in bytes: a credential longer
        than :data:`MAX_CREDENTIAL` is not remembered, so the map's keys never hold more
        than ``max_size * MAX_CREDENTIAL`` bytes (2.5 MB at the default size). Callers
        remember only credentials that were admitted, in their canonical spelling.
        """
        if not entry.alive or len(credential) > MAX_CREDENTIAL:
            return
        # One credential per live entry, forgotten with it (see _kill): the map never
        # holds more than the cache, and keeping it so costs O(1) per change.
        if entry.credential is not None and entry.credential != credential:
            self._remembered.pop(entry.credential, None)
        previous = self._remembered.get(credential)
        if previous is not None and previous is not entry:
            previous.credential = None
        entry.credential = credential
        self._remembered[credential] = entry

    def forget(self, credential: bytes) -> None:
        """Stop remembering these credential bytes (their key is no longer admitted)."""
        entry = self._remembered.pop(credential, None)
        if entry is not None and entry.credential == credential:
            entry.credential = None

    def _kill(self, entry: CacheEntry) -> None:
        """The entry left the cache: never trusted again, its credential forgotten, and its
        id kept as a hint for the next miss of its digest."""
        entry.alive = False
        if entry.credential is not None:
            if self._remembered.get(entry.credential) is entry:
                del self._remembered[entry.credential]
            entry.credential = None
        hints = self._hints
        hints[entry.digest] = entry.record.id
        hints.move_to_end(entry.digest)
        if len(hints) > self.max_size:
            hints.popitem(last=False)

    def lookup_task(self, digest: str) -> asyncio.Task[CacheEntry | None]:
        """:meth:`lookup` as a task, for a caller that may stop waiting for it: a late
        answer still fills the cache, its outcome is always collected, and :meth:`close`
        cancels what is still running."""
        task = asyncio.get_running_loop().create_task(self.lookup(digest))
        self._background.add(task)
        task.add_done_callback(self._collect)
        return task

    def _collect(self, task: asyncio.Task[CacheEntry | None]) -> None:
        self._background.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved"

    def peek(self, digest: str) -> CacheEntry | None:
        """The fresh cached entry for a digest, without awaiting anything; ``None`` when the
        caller must :meth:`lookup` (not cached, stale, or known to be unknown)."""
        entry = self._entries.get(digest)
        if entry is not None and entry.fresh_until > self._clock():
            self._entries.move_to_end(digest)
            self.hits += 1
            return entry
        return None

    async def lookup(self, digest: str) -> CacheEntry | None:
        """The cache entry for a key digest, fetching from the store on a miss.

        ``None`` means the store has no such key. Store errors propagate.
        """
        entry = self._entries.get(digest)
        now = self._clock()
        if entry is not None:
            if entry.fresh_until > now:
                self._entries.move_to_end(digest)
                self.hits += 1
                return entry
            self._drop(digest)
        until = self._unknown.get(digest)
        if until is not None:
            if until > now and self.store.listening:
                self.hits += 1
                return None
            del self._unknown[digest]
        self.misses += 1
        pending = self._inflight.get(digest)
        if pending is not None:
            # Concurrent misses for one key share one store lookup.
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if pending.done() and pending.cancelled() and task and not task.cancelling():
                    return await self._fetch(digest)  # the leader was cancelled, not us
                raise
        future: asyncio.Future[CacheEntry | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            result = await self._fetch(digest)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: the waiters, if any, get it raised
            raise
        else:
            future.set_result(result)
            return result
        finally:
            del self._inflight[digest]

    async def find(self, digest: str) -> ApiKey | None:
        entry = await self.lookup(digest)
        return None if entry is None else entry.record

    async def _fetch(self, digest: str) -> CacheEntry | None:
        self._subscribe()
        epoch, resyncs = self._epoch, self._resyncs
        listening = self.store.listening
        record = await self._batch.find(digest, self._hints.pop(digest, None))
        now = self._clock()
        if record is None:
            entry = None
            if epoch == self._epoch and self.negative_size and self.store.listening:
                self._unknown[digest] = now + self.negative_ttl
                while len(self._unknown) > self.negative_size:
                    self._unknown.popitem(last=False)
            return None
        # Trusted for long only if announcements flowed all along the read (a lost
        # connection bumps the epoch, and a resumed one clears the cache).
        heard = listening and resyncs == self._resyncs and self.store.listening
        ttl = self.announced_ttl if heard else self.ttl
        entry = CacheEntry(record, digest, now, now + ttl)
        if epoch != self._epoch:
            # A change was announced while we read: answer this once, keep nothing.
            entry.alive = False
        else:
            replaced = self._entries.get(digest)
            if replaced is not None:
                self._kill(replaced)
            self._entries[digest] = entry
            self._ids[record.id] = digest
            self._heard = self._heard or heard
            while len(self._entries) > self.max_size:  # one at a time: O(1) per miss
                _, evicted = self._entries.popitem(last=False)
                self._ids.pop(evicted.record.id, None)
                self._kill(evicted)
        return entry

    # -- invalidation -----------------------------------------------------------------------

    def _drop(self, digest: str) -> None:
        entry = self._entries.pop(digest, None)
        if entry is not None:
            self._ids.pop(entry.record.id, None)
            self._kill(entry)

    def invalidate(self, key_id: str, digest: str | None = None) -> None:
        """Forget what is cached for a key id (and a digest, e.g. of a key just added)."""
        self._epoch += 1
        cached = self._ids.pop(key_id, None)
        if cached is not None:
            self._drop(cached)
        if digest is not None:
            self._unknown.pop(digest, None)
            self._drop(digest)

    def distrust(self) -> None:
        """Announcements stopped: nothing fetched from now on is known to be current, and
        what was cached for long on their word is trusted only ``ttl`` seconds from its
        fetch (once per lost connection: O(size))."""
        self._epoch += 1
        ttl = self.ttl
        for entry in self._entries.values():
            if entry.fresh_until > entry.fetched + ttl:
                entry.fresh_until = entry.fetched + ttl

    def resync(self) -> None:
        """Announcements (re)started, some perhaps missed: forget everything fetched while
        they were believed to flow. Entries fetched while they did not (all of them, on the
        first subscription) live ``ttl`` at most anyway, and stay."""
        self._resyncs += 1  # a fetch across it is trusted for ttl only (see _fetch)
        if self._heard:
            self.clear()

    def clear(self) -> None:
        """Forget everything."""
        self._heard = False
        self._epoch += 1
        entries = list(self._entries.values())
        self._entries.clear()
        self._ids.clear()
        self._unknown.clear()
        self._remembered.clear()
        for entry in entries:
            self._kill(entry)  # ids stay as hints: a hint is checked when it is used

    def __len__(self) -> int:
        return len(self._entries)

    # -- the rest of the store protocol, invalidating as it goes -----------------------------

    @property
    def listening(self) -> bool:
        return self.store.listening

    def add_listener(self, listener: StoreListener) -> None:
        self.store.add_listener(listener)

    async def add(self, key: ApiKey, digest: str) -> None:
        try:
            await self.store.add(key, digest)
        finally:
            self.invalidate(key.id, digest)

    async def get(self, key_id: str) -> ApiKey | None:
        """The record by id, from the store (what the management API reads and writes back
        must be current)."""
        return await self.store.get(key_id)

    def cached(self, key_id: str) -> ApiKey | None:
        """The record by id if its cache entry is fresh, else ``None`` — no I/O (for
        readers that tolerate the cache's bounded staleness, like alert rules)."""
        digest = self._ids.get(key_id)
        if digest is not None:
            entry = self._entries.get(digest)
            if entry is not None and entry.alive and entry.fresh_until > self._clock():
                return entry.record
        return None

    async def replace(self, key: ApiKey, *, expected: ApiKey | None = None) -> None:
        try:
            await self.store.replace(key, expected=expected)
        finally:
            self.invalidate(key.id)

    async def list_keys(self, *, after: str | None = None, limit: int = 100) -> list[ApiKey]:
        return await self.store.list_keys(after=after, limit=limit)

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
        return await self.store.list_matching(
            now=now, project=project, key_type=key_type, status=status, after=after, limit=limit
        )

    async def ping(self) -> None:
        await self.store.ping()

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        await self._batch.close()
        self.clear()
        await self.store.close()

    def __repr__(self) -> str:
        return f"CachedStore({self.store!r}, {len(self._entries)}/{self.max_size} cached)"


class _Invalidator:
    """The cache's ear on the store's announcements."""

    __slots__ = ("_cache",)

    def __init__(self, cache: CachedStore) -> None:
        self._cache = cache

    def key_changed(self, key_id: str, digest: str | None) -> None:
        self._cache.invalidate(key_id, digest)

    def resync(self) -> None:
        self._cache.resync()

    def connection_lost(self) -> None:
        # Positive entries stay, bounded by their TTL; negative ones are no longer trusted
        # (lookup checks store.listening before using one).
        self._cache.distrust()
