"""The Redis store (redis.asyncio): many app processes and hosts share one Redis.

A key's record lives under its hash-tagged id, its digest maps to the id, an index lists
the ids, and changes are announced on a pub/sub channel: the names are
:class:`keystile.redis.schema.RedisSchema`'s (``python -m keystile.redis`` prints them).
No secret is stored: a digest is the HMAC-SHA256 of the key under the server secret.

The connection pool *waits* for a free connection (``BlockingConnectionPool``) instead of
failing with "Too many connections" under bursts, and every command has a timeout, so a
slow or dead Redis turns into :class:`~keystile.exceptions.StoreUnavailable` quickly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import WatchError

from keystile.exceptions import (
    KeyChanged,
    KeyConflict,
    KeyNotFound,
)
from keystile.models import ApiKey
from keystile.redis.connect import close_redis, open_redis
from keystile.redis.errors import REDIS_FAILURES, redis_errors
from keystile.redis.schema import RedisSchema
from keystile.stores.protocol import StoreListener

__all__ = ["RedisStore"]

logger = logging.getLogger("keystile.store")


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
        client: aioredis.Redis,
        *,
        namespace: str = "keystile",
        heartbeat: float = 5.0,
    ) -> None:
        if not namespace or any(c in namespace for c in "{}: \n"):
            raise ValueError(f"invalid Redis namespace {namespace!r}")
        self.client = client
        self.namespace = namespace
        self.schema = RedisSchema(namespace)
        self.channel = self.schema.events
        self._index = self.schema.index
        self._heartbeat = heartbeat
        self._listeners: list[StoreListener] = []
        self._listening = False
        self._listen_task: asyncio.Task[None] | None = None
        self._closed = False

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

    async def _publish(self, pipe: Any, key_id: str, digest: str | None) -> None:
        pipe.publish(self.channel, json.dumps({"id": key_id, "digest": digest}))

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
            except (ValueError, KeyError, TypeError):
                logger.warning("ignoring a malformed message on %s", self.channel)
                return
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
            pubsub = self.client.pubsub()
            try:
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
            except asyncio.CancelledError:
                raise
            except REDIS_FAILURES as exc:
                if _cancelling():  # redis-py let a cancel through as a lost connection
                    raise asyncio.CancelledError from exc
                self._lost()
                logger.warning("lost the Redis events channel (%s); retrying", type(exc).__name__)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
            finally:
                with contextlib.suppress(*REDIS_FAILURES):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
        self._lost()

    # -- records ----------------------------------------------------------------------------

    async def add(self, key: ApiKey, digest: str) -> None:
        """Write the record, then index it and — last — the digest that makes the key
        authenticate (they live in different cluster slots: no one transaction can hold
        them all). Wherever a crash stops the writes, a key that authenticates is listed:
        stopped before the digest, it leaves a record that nothing presents and no listing
        shows (``get`` by id still finds it), never a working key missing from the index."""
        record = key.model_dump_json()
        name = self.schema.record(key.id)
        with redis_errors("adding a key"):
            if not await self.client.set(name, record, nx=True):
                raise KeyConflict(f"a key with id {key.id} or the same digest already exists")
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zadd(self._index, {key.id: 0})
                pipe.set(self.schema.digest(digest), key.id, nx=True)
                await self._publish(pipe, key.id, digest)
                _, created_digest, _ = await pipe.execute()
            if not created_digest:
                async with self.client.pipeline(transaction=False) as pipe:
                    pipe.zrem(self._index, key.id)
                    pipe.delete(name)
                    await pipe.execute()
                raise KeyConflict(f"a key with id {key.id} or the same digest already exists")

    async def get(self, key_id: str) -> ApiKey | None:
        with redis_errors("reading a key"):
            raw = await self.client.get(self.schema.record(key_id))
        return None if raw is None else ApiKey.model_validate_json(raw)

    async def find(self, digest: str) -> ApiKey | None:
        with redis_errors("looking a key up"):
            key_id = await self.client.get(self.schema.digest(digest))
            if key_id is None:
                return None
            raw = await self.client.get(self.schema.record(_text(key_id)))
        return None if raw is None else ApiKey.model_validate_json(raw)

    async def find_many(self, wanted: Sequence[tuple[str, str | None]]) -> list[ApiKey | None]:
        """:meth:`find` for many digests in one pipeline. With the key id a digest named
        before (``hint``), its record is read in the same round trip (and kept only if the
        digest still names that id); the others' records take a second, shared one."""
        schema = self.schema
        with redis_errors("looking keys up"):
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

    async def replace(self, key: ApiKey, *, expected: ApiKey | None = None) -> None:
        record = key.model_dump_json()
        name = self.schema.record(key.id)
        if expected is not None:
            await self._compare_and_set(name, key.id, record, expected)
            return
        with redis_errors("updating a key"):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.set(name, record, xx=True)
                await self._publish(pipe, key.id, None)
                updated, _ = await pipe.execute()
        if not updated:
            raise KeyNotFound(f"no key with id {key.id}")

    async def _compare_and_set(
        self, name: str, key_id: str, record: str, expected: ApiKey
    ) -> None:
        """Optimistic locking (WATCH, compare, MULTI/EXEC): the write happens only if
        nobody wrote the record since it was compared."""
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
                    pipe.set(name, record, xx=True)
                    await self._publish(pipe, key_id, None)
                    await pipe.execute()
                except WatchError:
                    raise KeyChanged(f"key {key_id} changed meanwhile") from None

    async def list_keys(self, *, after: str | None = None, limit: int = 100) -> list[ApiKey]:
        if limit <= 0:
            return []
        start = b"-" if after is None else b"(" + after.encode()
        with redis_errors("listing keys"):
            ids = await self.client.zrangebylex(self._index, start, b"+", start=0, num=limit)
            if not ids:
                return []
            raws = await self.client.mget([self.schema.record(_text(i)) for i in ids])
        return [ApiKey.model_validate_json(raw) for raw in raws if raw is not None]

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
