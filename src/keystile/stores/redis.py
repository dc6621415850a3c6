"""The Redis store (redis.asyncio): many app processes and hosts share one Redis.

A key's record lives under its hash-tagged id, its digest maps to the id, an index lists
the ids, and changes are announced on a pub/sub channel: the names are
:class:`keystile.redis.schema.RedisSchema`'s (``python -m keystile.redis`` prints them).
No secret is stored: a digest is the HMAC-SHA256 of the key under the server secret.

The connection pool *waits* for a free connection (``BlockingConnectionPool``) instead of
failing with "Too many connections" under bursts, and every command has a timeout, so a
slow or dead Redis turns into :class:`~keystile.exceptions.StoreUnavailable` quickly.

On a Redis Cluster (a :class:`redis.asyncio.RedisCluster` client, as ``redis+cluster://``
URLs make) every command and transaction touches one slot: announcements are plain
``PUBLISH`` commands of their own (which reach every node), never inside a pipeline or
``MULTI``; a listing reads records one name each, pipelined per node, never with a
cross-slot ``MGET``; a new key's names are written one after another; and a lookup reads
the digests, then the records (two round trips; one for a key whose id the cache still
knows), where a standalone Redis or Sentinel reads both in one script call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, WatchError

from keystile.exceptions import (
    KeyChanged,
    KeyConflict,
    KeyNotFound,
)
from keystile.fallback import failure_cause, redis_address
from keystile.logs import fields
from keystile.models import ApiKey
from keystile.records import KeyStatus
from keystile.redis.connect import RedisClient, close_redis, is_cluster, open_redis
from keystile.redis.errors import REDIS_FAILURES, redis_errors
from keystile.redis.schema import RedisSchema
from keystile.redis.scripts import lua
from keystile.stores.protocol import StoreListener
from keystile.stores.redis_listing import RedisListing

__all__ = ["RedisStore"]

logger = logging.getLogger("keystile.store")

# How long a new key's record and digest live until both are written and made permanent:
# what a crash in between leaves expires by itself.
PENDING_MS = 60_000

# Lookups by digest on a standalone Redis: digest, then record, in one script call.
_FIND = lua("key_find")
_FIND_SHA = hashlib.sha1(_FIND.encode(), usedforsecurity=False).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _cancelling() -> bool:
    """Whether the running task is being cancelled. Cancelled while redis-py reads, a task
    may instead see the read fail, on uvloop (the socket is closed as the cancel lands):
    a loop that retried then would never end, and nor would the event loop's shutdown."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class RedisStore:
    """Key records in Redis, with change announcements over pub/sub."""

    def __init__(
        self,
        client: RedisClient,
        *,
        namespace: str = "keystile",
        heartbeat: float = 5.0,
    ) -> None:
        if not namespace or any(c in namespace for c in "{}: \n"):
            raise ValueError(f"invalid Redis namespace {namespace!r}")
        self.client = client
        self.cluster = is_cluster(client)
        self.namespace = namespace
        self.schema = RedisSchema(namespace)
        self.channel = self.schema.events
        self._index = self.schema.index
        self._heartbeat = heartbeat
        self._listeners: list[StoreListener] = []
        self._listening = False
        self._listen_task: asyncio.Task[None] | None = None
        self._closed = False
        self._down_since = 0.0  # monotonic time the events channel was lost; 0: up
        self._down_logged = 0.0  # monotonic time that loss was last logged
        # Marks this store's own announcements on a cluster (not a secret: it only tells
        # this store its echo apart).
        self._origin = secrets.token_hex(8)
        self._find_sha = False  # key_find.lua known to be in Redis' script cache
        self.listing = RedisListing(client, self.schema, cluster=self.cluster, read=self._read)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        namespace: str = "keystile",
        pool_size: int = 50,
        pool_timeout: float = 1.0,
        timeout: float = 0.5,
        client_name: str | None = None,
        heartbeat: float = 5.0,
    ) -> RedisStore:
        """A store on a fresh connection pool that waits (up to ``pool_timeout``) for a free
        connection, with ``timeout`` seconds per command and connection attempt."""
        client = open_redis(
            url,
            pool_size=pool_size,
            pool_timeout=pool_timeout,
            timeout=timeout,
            client_name=client_name,
        )
        return cls(client, namespace=namespace, heartbeat=heartbeat)

    # -- change announcements -------------------------------------------------------------

    @property
    def listening(self) -> bool:
        return self._listening

    def add_listener(self, listener: StoreListener) -> None:
        self._listeners.append(listener)
        if self._listen_task is None and not self._closed:
            self._listen_task = asyncio.get_running_loop().create_task(
                self._listen(), name=f"keystile-listen-{self.namespace}"
            )

    def _publish(self, pipe: Any, key_id: str, digest: str | None) -> None:
        """Queue the announcement of a change on ``pipe`` (a standalone Redis only: a
        cluster's pipelines and transactions cannot carry PUBLISH; see :meth:`_announce`)."""
        pipe.publish(self.channel, json.dumps({"id": key_id, "digest": digest}))

    async def _announce(self, key_id: str, digest: str | None) -> None:
        """Announce a change with a PUBLISH of its own, on a cluster: it reaches every node.
        It is sent to the node owning the channel name's slot, where every store's
        listener subscribes. This store's own listeners are told at once, before the
        write returns (its echo, marked with this store's origin, is skipped): over a
        cluster it could come after the caller's next lookup had begun, and the lookup's
        answer would not be kept."""
        for listener in self._listeners:
            listener.key_changed(key_id, digest)
        message = json.dumps({"id": key_id, "digest": digest, "origin": self._origin})
        node = self.client.get_node_from_key(self.channel)  # type: ignore[union-attr]
        await self.client.publish(self.channel, message, target_nodes=node)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "subscribe":
            # (Re)subscribed, perhaps after redis-py reconnected by itself: anything
            # published in between is lost, so everything cached is suspect.
            self._listening = True
            for listener in self._listeners:
                listener.resync()
        elif kind == "message":
            try:
                event = json.loads(message["data"])
                key_id, digest = str(event["id"]), event.get("digest")
                origin = event.get("origin")
            except (ValueError, KeyError, TypeError, AttributeError):
                logger.warning(
                    "ignoring a malformed message on %s",
                    self.channel,
                    extra=fields("store.malformed_event"),
                )
                return
            if origin is not None and origin == self._origin:
                return  # this store's own, told to its listeners already (_announce)
            for listener in self._listeners:
                listener.key_changed(key_id, None if digest is None else str(digest))

    def _lost(self) -> None:
        if self._listening:
            self._listening = False
            for listener in self._listeners:
                listener.connection_lost()

    async def _listen(self) -> None:
        """Follow the events channel for as long as the store is open, reconnecting with
        backoff, and probing the connection so a silent drop is noticed."""
        delay = 0.05
        while not self._closed:
            pubsub: Any = None
            try:
                if self.cluster:  # the slot map first: it picks the node to subscribe on
                    await self.client.initialize()
                    if delay > 0.05:  # after a failure: the node may be gone, ask again
                        await self.client.nodes_manager.initialize()  # type: ignore[union-attr]
                pubsub = self.client.pubsub()
                await pubsub.subscribe(self.channel)
                quiet = 0.0
                pinged = False  # a ping is out: if the channel stays quiet, it is dead
                while not self._closed:
                    message = await pubsub.get_message(timeout=min(1.0, self._heartbeat))
                    if message is None:
                        quiet += min(1.0, self._heartbeat)
                        if quiet >= self._heartbeat:
                            if pinged:  # no pong: a silent drop (caches trust it no more)
                                raise RedisConnectionError("the events channel went silent")
                            await asyncio.wait_for(pubsub.ping(), self._heartbeat)
                            quiet, pinged = 0.0, True
                        continue
                    quiet, pinged = 0.0, False
                    self._dispatch(message)
                    delay = 0.05
                    self._channel_back()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # Not only Redis' errors: a cluster client still finding its nodes, or any
                # other surprise, must not end the listening for good. Whatever was missed
                # meanwhile is made up for: every listener is told the connection was lost
                # (and resynchronises when the subscription is back).
                if _cancelling():  # redis-py let a cancel through as a lost connection
                    raise asyncio.CancelledError from exc
                self._lost()
                self._channel_down(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        await pubsub.aclose()
        self._lost()

    def _channel_down(self, exc: BaseException) -> None:
        """Log a lost events channel once, naming the host and the cause, then at most
        once a minute while it stays lost (it is retried far more often)."""
        now = time.monotonic()
        first = not self._down_since
        if first:
            self._down_since = now
        elif now - self._down_logged < 60.0:
            return
        self._down_logged = now
        where = redis_address(self.client)
        logger.warning(
            "%s the Redis events channel%s (%s)%s; retrying, cached keys expire after their "
            "TTL meanwhile",
            "lost" if first else "still no",
            f" at {where}" if where else "",
            failure_cause(exc),
            "" if first else f" for {now - self._down_since:.0f} s",
            extra=fields("store.events_lost", store=where or None),
        )

    def _channel_back(self) -> None:
        if self._down_since:
            logger.info(
                "the Redis events channel is back after %.1f s",
                time.monotonic() - self._down_since,
                extra=fields("store.events_back"),
            )
            self._down_since = 0.0

    # -- records ----------------------------------------------------------------------------

    async def add(self, key: ApiKey, digest: str) -> None:
        """Write the record, then index it, then the digest that makes the key
        authenticate (they live in different cluster slots: no one transaction can hold
        them all). The record and the digest are written with a TTL (:data:`PENDING_MS`)
        and made permanent — record first — only once both are there; the announcement
        comes last. Wherever a crash or an error stops the writes, nothing that
        authenticates is left unlisted: what was written expires on its own, or (stopped
        between the two PERSISTs) a listed record remains whose digest expires — a key
        nobody holds, since the caller never got its secret. An index entry whose record
        expired is skipped by listings.

        On a standalone Redis all of it after the first SET goes in one pipeline, executed
        in order; on a cluster, whose pipelines write to the nodes concurrently, one
        command after another."""
        record = key.model_dump_json()
        name = self.schema.record(key.id)
        digest_name = self.schema.digest(digest)
        await self.listing.ensure(reindex=False)  # a new namespace's index is complete
        with redis_errors("adding a key"):
            if not await self.client.set(name, record, nx=True, px=PENDING_MS):
                raise KeyConflict(f"a key with id {key.id} or the same digest already exists")
            if self.cluster:
                await self.client.zadd(self._index, {key.id: 0})
                await self.listing.place(key)
                created_digest = await self.client.set(digest_name, key.id, nx=True, px=PENDING_MS)
                created_digest = created_digest or await self._holds(digest_name, key.id)
                if created_digest:
                    await self.client.persist(name)
                    await self.client.persist(digest_name)
                    await self._announce(key.id, digest)
            else:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.zadd(self._index, {key.id: 0})
                    await self.listing.place(key, pipe=pipe)
                    pipe.set(digest_name, key.id, nx=True, px=PENDING_MS)
                    pipe.persist(name)
                    pipe.persist(digest_name)  # another key's, if taken: it has no TTL
                    self._publish(pipe, key.id, digest)
                    _, _, created_digest, *_ = await pipe.execute()
                created_digest = created_digest or await self._holds(digest_name, key.id)
            if not created_digest:
                await self.listing.place(key, state="none")
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.zrem(self._index, key.id)
                    pipe.delete(name)
                    await pipe.execute()
                raise KeyConflict(f"a key with id {key.id} or the same digest already exists")

    async def _holds(self, name: str, value: str) -> bool:
        """Whether ``name`` holds ``value`` already: a digest's SET NX that found it taken
        may have been redis-py retrying our own write (its reply lost to a timeout), not a
        conflict (another key's digest names another id; the same id could not have got
        past the record's SET NX)."""
        held = await self.client.get(name)
        return held is not None and _text(held) == value

    async def get(self, key_id: str) -> ApiKey | None:
        with redis_errors("reading a key"):
            raw = await self.client.get(self.schema.record(key_id))
        return None if raw is None else ApiKey.model_validate_json(raw)

    async def find(self, digest: str) -> ApiKey | None:
        raw: bytes | str | None
        with redis_errors("looking a key up"):
            if not self.cluster:
                raw = (await self._find_records([digest]))[0]
            else:
                key_id = await self.client.get(self.schema.digest(digest))
                if key_id is None:
                    return None
                raw = await self.client.get(self.schema.record(_text(key_id)))
        return None if raw is None else ApiKey.model_validate_json(raw)

    async def find_many(self, wanted: Sequence[tuple[str, str | None]]) -> list[ApiKey | None]:
        """:meth:`find` for many digests in one round trip. On a standalone Redis (or
        Sentinel's master) one script call (key_find.lua) reads every digest and its
        record. On a cluster, where a digest and its record lie in different slots, one
        pipeline reads the digests, and with them the record of the key id a digest named
        before (``hint``; kept only if the digest still names that id); the others'
        records take a second, shared one."""
        if not wanted:
            return []
        schema = self.schema
        with redis_errors("looking keys up"):
            if not self.cluster:
                found = await self._find_records([digest for digest, _ in wanted])
                return [None if raw is None else ApiKey.model_validate_json(raw) for raw in found]
            async with self.client.pipeline(transaction=False) as pipe:
                for digest, hint in wanted:
                    pipe.get(schema.digest(digest))
                    if hint is not None:
                        pipe.get(schema.record(hint))
                replies = iter(await pipe.execute())
            raws: list[bytes | None] = []
            later: list[tuple[int, str]] = []  # (position, key id) still to read
            for position, (_, hint) in enumerate(wanted):
                key_id = next(replies)
                raw = next(replies) if hint is not None else None
                if key_id is not None and _text(key_id) != hint:
                    later.append((position, _text(key_id)))
                raws.append(raw if key_id is not None else None)
            if later:
                async with self.client.pipeline(transaction=False) as pipe:
                    for _, key_id in later:
                        pipe.get(schema.record(key_id))
                    for (position, _), raw in zip(later, await pipe.execute(), strict=True):
                        raws[position] = raw
        return [None if raw is None else ApiKey.model_validate_json(raw) for raw in raws]

    async def _find_records(self, digests: Sequence[str]) -> list[bytes | None]:
        """The records the digests name, in one script call (standalone Redis only). The
        script is sent whole (EVAL, which also caches it in Redis) until it has run once
        here, then by its sha; a NOSCRIPT (a SCRIPT FLUSH, a restarted server, a failover
        to a replica that never ran it) sends it whole again: one round trip more, once."""
        names = [self.schema.digest(digest) for digest in digests]
        if self._find_sha:
            try:
                return list(
                    await self.client.evalsha(_FIND_SHA, len(names), *names, self.namespace)
                )
            except NoScriptError:
                self._find_sha = False
        raws = await self.client.eval(_FIND, len(names), *names, self.namespace)
        self._find_sha = True
        return list(raws)

    async def replace(self, key: ApiKey, *, expected: ApiKey | None = None) -> None:
        record = key.model_dump_json()
        name = self.schema.record(key.id)
        if expected is not None:
            await self._compare_and_set(key, name, record, expected)
            return
        with redis_errors("updating a key"):
            if self.cluster:
                updated = await self.client.set(name, record, xx=True)
                if updated:
                    await self.listing.place(key)
                    await self._announce(key.id, None)
            else:
                async with self.client.pipeline(transaction=False) as pipe:
                    await self.listing.write(pipe, key, name, record)
                    self._publish(pipe, key.id, None)
                    updated, _ = await pipe.execute()
        if not updated:
            raise KeyNotFound(f"no key with id {key.id}")

    async def _compare_and_set(
        self, key: ApiKey, name: str, record: str, expected: ApiKey
    ) -> None:
        """Optimistic locking (WATCH, compare, MULTI/EXEC): the write happens only if
        nobody wrote the record since it was compared. The transaction holds the record's
        name and, on a standalone Redis, its listing index; on a cluster the index (in the
        project's slot) and the announcement follow the EXEC."""
        key_id = key.id
        with redis_errors("updating a key"):
            async with self.client.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(name)
                    raw = await pipe.get(name)
                    if raw is None:
                        raise KeyNotFound(f"no key with id {key_id}")
                    if ApiKey.model_validate_json(raw) != expected:
                        raise KeyChanged(f"key {key_id} changed meanwhile")
                    pipe.multi()  # type: ignore[no-untyped-call]
                    if self.cluster:
                        pipe.set(name, record, xx=True)
                    else:
                        await self.listing.write(pipe, key, name, record)
                        self._publish(pipe, key_id, None)
                    await pipe.execute()
                except WatchError:
                    raise KeyChanged(f"key {key_id} changed meanwhile") from None
            if self.cluster:
                await self.listing.place(key)
                await self._announce(key_id, None)

    async def list_keys(self, *, after: str | None = None, limit: int = 100) -> list[ApiKey]:
        if limit <= 0:
            return []
        start = b"-" if after is None else b"(" + after.encode()
        with redis_errors("listing keys"):
            ids = await self.client.zrangebylex(self._index, start, b"+", start=0, num=limit)
        return [r for r in await self._read([_text(i) for i in ids]) if r is not None]

    async def _read(self, ids: Sequence[str]) -> list[ApiKey | None]:
        """The records of ``ids``, in order (``None`` for one that is gone)."""
        if not ids:
            return []
        names = [self.schema.record(i) for i in ids]
        with redis_errors("listing keys"):
            if self.cluster:  # one GET per record, pipelined per node: no cross-slot MGET
                async with self.client.pipeline(transaction=False) as pipe:
                    for record_name in names:
                        pipe.get(record_name)
                    raws = await pipe.execute()
            else:
                raws = await self.client.mget(names)
        return [None if raw is None else ApiKey.model_validate_json(raw) for raw in raws]

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
        return await self.listing.list_matching(
            now=now, project=project, key_type=key_type, status=status, after=after, limit=limit
        )

    async def reindex(self) -> int:
        """Place every stored key in the listing index (see :meth:`RedisListing.reindex`);
        the number of keys indexed."""
        return await self.listing.reindex()

    async def ping(self) -> None:
        with redis_errors("pinging"):
            await self.client.ping()

    async def close(self) -> None:
        self._closed = True
        task, self._listen_task = self._listen_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._listening = False
        with contextlib.suppress(*REDIS_FAILURES):
            await close_redis(self.client)

    def __repr__(self) -> str:
        return f"RedisStore(namespace={self.namespace!r})"
