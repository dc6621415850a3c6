"""Cache misses of one event-loop iteration, sent to the store together.

The requests a server reads in one go arrive in one iteration of the event loop: their
cache misses — different keys too — are queued, and once the iteration's callbacks have
run, sent to the store in one call of its ``find_many`` (one round trip for a Redis
store — one script call on a standalone Redis or Sentinel —, at most :data:`MAX_BATCH`
lookups each). A store without ``find_many`` is asked once per miss, at once. Each miss
may bring the key id its digest named before (a *hint*): on a Redis Cluster, where a
digest and its record lie in different slots, the store then reads both in the same
round trip (a miss without one takes a second, shared).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from keystile.models import ApiKey
from keystile.stores.protocol import KeyStore

__all__ = ["MAX_BATCH", "MissBatch"]

MAX_BATCH = 256  # lookups per store call at most: a bigger queue goes in several calls

FindMany = Callable[[Sequence[tuple[str, str | None]]], Awaitable[list[ApiKey | None]]]
_Waiting = tuple[str, str | None, "asyncio.Future[ApiKey | None]"]


class MissBatch:
    """The queue of misses waiting for the end of the event-loop iteration."""

    def __init__(self, store: KeyStore) -> None:
        self._store = store
        # Looked up on the store's class: a wrapper forwarding attributes (a test's
        # gate, say) keeps its own find().
        method = getattr(type(store), "find_many", None)
        self._find_many: FindMany | None = None if method is None else store.find_many  # type: ignore[attr-defined]
        self._queue: list[_Waiting] = []
        self._running: set[asyncio.Task[None]] = set()
        self.calls = 0  # store calls made for batches (each one round trip; two on a cluster)

    async def find(self, digest: str, hint: str | None = None) -> ApiKey | None:
        """The store's record for a digest (``None`` if unknown); store errors propagate."""
        if self._find_many is None:
            return await self._store.find(digest)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[ApiKey | None] = loop.create_future()
        if not self._queue:
            loop.call_soon(self._send)
        self._queue.append((digest, hint, future))
        return await future

    def _send(self) -> None:
        queue, self._queue = self._queue, []
        loop = asyncio.get_running_loop()
        for start in range(0, len(queue), MAX_BATCH):
            task = loop.create_task(self._run(queue[start : start + MAX_BATCH]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, batch: list[_Waiting]) -> None:
        find_many = self._find_many
        if find_many is None:  # never: only find() queues, and only when it is set
            raise RuntimeError("no find_many to send a batch with")
        waiting = [item for item in batch if not item[2].done()]  # its caller gave up
        if not waiting:
            return
        self.calls += 1
        try:
            records = await find_many([(digest, hint) for digest, hint, _ in waiting])
        except asyncio.CancelledError:  # the cache is closing
            for _, _, future in waiting:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller, raised there
            for _, _, future in waiting:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), record in zip(waiting, records, strict=True):
            if not future.done():
                future.set_result(record)

    async def close(self) -> None:
        """Cancel the batches still running (their callers see the cancellation)."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)
