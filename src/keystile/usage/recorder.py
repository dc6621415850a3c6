"""In-process usage recording: what each key does, aggregated in a bounded buffer and
flushed to a :class:`~keystile.usage.stores.UsageStore` in batches.

Recording costs no I/O: :meth:`UsageRecorder.record` adds to an in-process buffer, and a
background task flushes it every ``interval`` seconds in one pipeline. The buffer is
bounded; what it must drop is counted in :attr:`UsageRecorder.dropped`, never silently.
A flush that fails keeps its counts for the next one (bounded the same way). The
middleware flushes on lifespan shutdown; :meth:`UsageRecorder.close` flushes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import secrets
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

from keystile.clock import Clock, system_clock
from keystile.exceptions import StoreError
from keystile.logs import fields
from keystile.usage.models import (
    AT,
    BY_CLIENT,
    BYTES_IN,
    ERRORS_4XX,
    ERRORS_5XX,
    INACTIVE,
    INACTIVE_AT,
    IP,
    MAX_COUNT,
    MAX_SEEN,
    MINUTE,
    ORIGIN,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    REQUESTS,
    TOKENS,
    WATCH_IPS,
    Granularity,
    Table,
    UsageOverview,
    UsageReport,
    check_tokens,
    counters,
    tracked,
)
from keystile.usage.reports import UsageReader

if TYPE_CHECKING:
    from keystile.usage.stores import UsageStore

__all__ = ["UsageBatch", "UsageRecorder"]

_SLICE = 64  # requests recorded, at most, before they are added up in the buffer

logger = logging.getLogger("keystile.usage")


class UsageBatch:
    """Counts gathered since the last flush: per minute, per key, one row each."""

    __slots__ = ("inactive", "ips", "minutes", "origins", "process", "rows", "seen", "seq")

    def __init__(self) -> None:
        # What makes a retried write idempotent: the writing process and a sequence number
        # that only grows within it (the recorder stamps a batch when it takes it to flush).
        self.process = secrets.token_hex(8)
        self.seq = 0
        self.minutes: dict[int, Table] = {}
        self.rows = 0  # key-minutes held (the buffer's bound counts these)
        # key id -> address (origin) -> requests: client keys'; plain dicts (a Counter costs
        # a Python-level call to make).
        self.ips: dict[str, dict[str, int]] = {}
        self.origins: dict[str, dict[str, int]] = {}
        # key id -> the addresses a watched (production) key used: one as a str, several
        # (MAX_SEEN at most) as a set — a str is one object less for the collector to track.
        self.seen: dict[str, str | set[str]] = {}
        self.inactive: dict[str, int] = {}  # key id -> attempts while revoked or expired

    def __bool__(self) -> bool:
        return self.rows > 0

    @property
    def id(self) -> str:
        """The batch's identity: its process and sequence number."""
        return f"{self.process}:{self.seq}"

    @property
    def buckets(self) -> dict[tuple[str, int], list[int]]:
        """(key id, minute) -> counters."""
        return {
            (key_id, minute): list(counters(row))
            for minute, table in self.minutes.items()
            for key_id, row in table.items()
        }

    @property
    def last(self) -> dict[str, list[Any]]:
        """key id -> [last used at, ip, origin, last inactive attempt at] (latest wins)."""
        out: dict[str, list[Any]] = {}
        for minute in sorted(self.minutes):
            for key_id, row in self.minutes[minute].items():
                mine = out.setdefault(key_id, [None, None, None, None])
                if row[AT] is not None:
                    mine[0:3] = row[AT], row[IP], row[ORIGIN]
                if row[INACTIVE_AT] is not None:
                    mine[3] = row[INACTIVE_AT]
        return out

    async def watched_addresses(self, every: int = 1000) -> dict[str, set[str]]:
        """key id -> the addresses a watched key used since the last flush (new sets),
        gathered with a yield to the event loop every ``every`` keys (a flush of many keys
        lets requests run meanwhile)."""
        out: dict[str, set[str]] = {}
        seen = list(self.seen.items())
        for start in range(0, len(seen), every):
            if start:
                await asyncio.sleep(0)
            out.update(
                (key_id, {ips} if isinstance(ips, str) else set(ips))
                for key_id, ips in seen[start : start + every]
            )
        return out

    def requests(self) -> int:
        return sum(c[REQUESTS] + c[INACTIVE] for c in self.buckets.values())


# Called after each flush with the batch written and the (key id, minute) counters it
# touched; may be a coroutine function (the alerter's is).
FlushCallback = Callable[[UsageBatch, Mapping[tuple[str, int], Sequence[int]]], Any]


class UsageRecorder:
    """Aggregates usage in process and flushes it to a :class:`UsageStore` in batches.

    ``max_buckets`` bounds the buffer (distinct key-minutes waiting to be flushed); counts
    that do not fit are dropped and counted in :attr:`dropped` (requests). ``top_n`` bounds
    the per-IP and per-origin tables of each client key. ``on_flush`` callbacks receive
    each flushed batch and the new per-minute totals (alert rules hang there).
    :meth:`report` and :meth:`overview` read what is flushed; :meth:`reader` makes a
    :class:`~keystile.usage.reports.UsageReader` that flushes first.
    """

    def __init__(
        self,
        store: UsageStore,
        *,
        clock: Clock = system_clock,
        interval: float = 1.0,
        max_buckets: int = 50_000,
        top_n: int = 100,
        on_flush: Iterable[FlushCallback] = (),
    ) -> None:
        self.store = store
        self._clock = clock
        self.interval = interval
        self.max_buckets = max_buckets
        self.top_n = top_n
        # Exact per-IP/origin counts for up to this many members per key per flush; the
        # store keeps counting as many, and reports the busiest top_n.
        self.table_cap = tracked(top_n)
        # Requests not counted because the buffer was full: up to date as of the last time
        # the pending requests were added up (a slice, or a flush, ago at most). A plain
        # int: a metrics scrape in another thread reads it without touching the buffer.
        self.dropped = 0
        self.flushes = 0
        self.flushed_rows = 0  # key-minutes written (keystile.metrics)
        self.flush_seconds = 0.0  # time spent writing them
        self.failed_flushes = 0
        self.on_flush: list[FlushCallback] = list(on_flush)
        self._batch = UsageBatch()
        # Requests recorded since they were last added up into the buffer (record's
        # arguments, in order), and how many of them make :meth:`settle` due: _SLICE while
        # the flush task runs, else 0 (the first request starts it). The middleware appends
        # to ``pending`` itself (a call less on every request) and settles when it is due.
        self.pending: list[tuple[Any, ...]] = []
        self.due = 0
        self._retry: list[UsageBatch] = []  # a batch whose write failed, kept whole
        self._minute: float = math.inf  # whose table _index() last used (none: inf)
        self._span = (0.0, 0.0)  # [start, end) of that minute, in seconds
        self._table = Table()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._flush_lock = asyncio.Lock()
        self._last_warning = -math.inf
        self._last_rejection = -math.inf
        self._process = (os.getpid(), secrets.token_hex(8))  # made anew in a forked child
        self._seq = 0

    # -- recording (no I/O) ----------------------------------------------------------------

    def _index(self, key_id: str, now: float) -> int | None:
        """The row of ``key_id`` for the minute of ``now`` (made if new) in ``self._table``,
        that minute's table; None when the buffer is full."""
        minute = int(now // MINUTE)
        if minute != self._minute:
            found = self._batch.minutes.get(minute)
            if found is None:
                if self._batch.rows >= self.max_buckets:  # full: not even an empty table
                    return None
                found = self._batch.minutes[minute] = Table()
            self._minute, self._table = minute, found
            # Floats: `now` is one, and a float compares slowly with an int past 2**30.
            self._span = (float(minute * MINUTE), float((minute + 1) * MINUTE))
        table = self._table
        at = table.index.get(key_id)
        if at is None:
            if self._batch.rows >= self.max_buckets:
                return None
            at = table.add(key_id)
            self._batch.rows += 1
            if self._task is None:
                self._ensure_task()
        return at

    def record(
        self,
        key_id: str,
        status: int,
        bytes_in: int,
        bytes_out: int,
        ip: str | None = None,
        origin: str | None = None,
        ip_mode: int = 0,
        now: float | None = None,
        rate_limited: bool = False,
    ) -> None:
        """Count one request a key made. ``ip_mode``: :data:`BY_CLIENT` also counts it by
        IP and origin (client keys); :data:`WATCH_IPS` notes the addresses seen (for the
        new-IP alert on production keys). ``rate_limited``: refused by the rate limit.

        It costs an append: requests are added up in the buffer a slice at a time, in one
        tight loop (at thousands of keys a key's row is far from the CPU's caches; touched
        there, a request would wait for memory once per row it touches)."""
        if type(bytes_in) is int is type(bytes_out) and not (
            0 <= bytes_in <= MAX_COUNT and 0 <= bytes_out <= MAX_COUNT
        ):  # (a value of another type is dropped when added up, and logged)
            raise ValueError(f"byte counts must be integers from 0 to {MAX_COUNT}")
        log = self.pending
        if now is None:
            now = self._clock()
        log.append((key_id, status, bytes_in, bytes_out, ip, origin, ip_mode, now, rate_limited))
        if len(log) >= self.due:
            self.settle()

    @property
    def batch(self) -> UsageBatch:
        """What is buffered for the next flush, every request recorded so far added up
        (on the event loop's thread only, as recording: it adds up what is pending)."""
        self.settle()
        return self._batch

    def settle(self) -> None:
        """Add up the requests recorded since the last time into the buffer's rows (on the
        event loop's thread: recording and flushing run there). A request recorded with a
        value of the wrong type is not counted, and counted in :attr:`dropped` (logged
        once a minute at most); the others are, before and after it."""
        entries, self.pending = self.pending, []
        start, end = self._span
        row_of, columns, requests, sent, last_at, last_ip, last_origin = self._table.hot()
        watching, by_client, cap = WATCH_IPS, BY_CLIENT, self.table_cap
        batch = self._batch
        noted = batch.seen.get
        rest = iter(entries)
        while True:
            try:  # (costs nothing in the loop while nothing raises)
                for key_id, status, bytes_in, bytes_out, ip, origin, ip_mode, now, limited in rest:
                    failed = status >= 400  # (a status of the wrong type stops here: no row)
                    at = row_of(key_id) if start <= now < end else None
                    if at is None:
                        at = self._index(key_id, now)
                        if at is None:
                            self._drop()
                            continue
                        start, end = self._span  # (the minute's table may be another)
                        row_of, columns, requests, sent, last_at, last_ip, last_origin = (
                            self._table.hot()
                        )
                    requests[at] += 1
                    if bytes_in:  # most requests have no body: skip making an int for nothing
                        columns[BYTES_IN][at] += bytes_in
                    sent[at] += bytes_out
                    if failed:
                        columns[ERRORS_5XX if status >= 500 else ERRORS_4XX][at] += 1
                        if limited:  # a 429
                            columns[RATE_LIMITED][at] += 1
                    if ip_mode == watching:  # a production key: its addresses (new-IP alert)
                        if ip is not None and ip != last_ip[at]:  # (the same as its last: noted)
                            seen = noted(key_id)
                            if seen is None:
                                batch.seen[key_id] = ip
                            elif isinstance(seen, str):
                                if seen != ip:
                                    batch.seen[key_id] = {seen, ip}
                            elif len(seen) < MAX_SEEN:
                                seen.add(ip)
                    elif ip_mode == by_client:  # a client key: its requests by address, origin
                        if ip is not None:
                            _count(batch.ips, key_id, ip, cap)
                        if origin is not None:
                            _count(batch.origins, key_id, origin, cap)
                    latest = last_at[at]
                    if latest is None or now >= latest:  # a slow request ending last is not
                        last_at[at] = now  # the last
                        last_ip[at] = ip
                        last_origin[at] = origin
                return
            except (TypeError, ValueError, ArithmeticError) as exc:  # a wrong value: this entry
                self._reject(exc)

    def _reject(self, exc: Exception) -> None:
        """Count a request recorded with a wrong value as dropped (what it added to its
        row before the wrong value stays)."""
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_rejection > 60:
            self._last_rejection = now
            logger.error(
                "usage: a request recorded with a value of the wrong type was not counted "
                "(%s; %d dropped so far)",
                type(exc).__name__,
                self.dropped,
                extra=fields("usage.rejected"),
            )

    def record_refusal(self, key_id: str, kind: Literal["quota", "inactive"]) -> None:
        """Count a request refused for its quota (already counted as a request by the
        middleware) or an attempt with a revoked or expired key."""
        self.settle()  # in order after the requests recorded before it
        now = self._clock()
        at = self._index(key_id, now)
        if at is None:
            self._drop()
            return
        columns = self._table.columns
        if kind == "quota":
            columns[QUOTA_EXCEEDED][at] += 1
        else:
            columns[INACTIVE][at] += 1
            columns[INACTIVE_AT][at] = now
            inactive = self._batch.inactive
            inactive[key_id] = inactive.get(key_id, 0) + 1

    def record_tokens(self, key_id: str, tokens: int) -> None:
        """Count AI tokens a key consumed (an integer from 0 to :data:`MAX_COUNT`)."""
        check_tokens(tokens)
        self.settle()
        at = self._index(key_id, self._clock())
        if at is None:
            self._drop()
            return
        self._table.columns[TOKENS][at] += tokens

    def _drop(self) -> None:
        self.dropped += 1
        now = self._clock()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning(
                "usage buffer full (%d key-minutes): dropping counts (%d dropped so far)",
                self.max_buckets,
                self.dropped,
                extra=fields("usage.dropped"),
            )

    # -- flushing --------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._task is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # recorded outside a loop: the next flush() or close() takes it
            self._task = loop.create_task(self._run(), name="keystile-usage-flush")
            self.due = _SLICE

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.interval)
            try:
                await self.flush()
            except Exception:  # the task flushes again next time, whatever this one met
                logger.exception("usage flush failed", extra=fields("usage.flush_error"))

    async def flush(self) -> bool:
        """Write what is buffered now; whether everything was written (or nothing was due).

        A batch whose write fails is kept whole, with its process and sequence number, and
        retried first next time (a store applies each key's share of a process's sequence
        number at most once, so a write whose reply was lost is not counted twice); while it
        fails, new counts keep gathering in the bounded buffer.
        """
        written: list[tuple[UsageBatch, Mapping[tuple[str, int], Sequence[int]]]] = []
        ok = True
        async with self._flush_lock:
            while self._retry and ok:
                ok = await self._write(self._retry[0], written)
                if ok:
                    self._retry.pop(0)
            if ok:
                self.settle()
                batch, self._batch = self._batch, UsageBatch()
                self._minute = math.inf
                self._span = (0.0, 0.0)
                if batch:
                    self._stamp(batch)
                    try:
                        ok = await self._write(batch, written)
                    except BaseException:  # cancelled mid-write (close, a reader's timeout):
                        self._retry.append(batch)  # kept whole, written once (its sequence)
                        raise
                    if not ok:
                        self._retry.append(batch)
        for batch, touched in written:
            whole = getattr(touched, "whole", None)
            for callback in self.on_flush:
                try:
                    # A store's totals unpacked as read go to callbacks that say they read
                    # them so (the alert rules': the busy minutes only); others get a dict.
                    given = touched
                    if whole is not None and not getattr(callback, "lazy_totals", False):
                        given = whole()
                    result = callback(batch, given)
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:  # an alert rule must not lose the next flush
                    logger.exception(
                        "usage flush callback failed", extra=fields("usage.callback_failed")
                    )
        return ok

    def _stamp(self, batch: UsageBatch) -> None:
        """Give ``batch`` this process's next sequence number: above every earlier one
        (a retried batch keeps its own, and goes first), and near the clock in ms, so
        stores can tell which process wrote longest ago."""
        pid, token = self._process
        if pid != os.getpid():  # a forked child must not reuse its parent's sequence
            self._process = (pid, token) = (os.getpid(), secrets.token_hex(8))
            self._seq = 0
        self._seq = max(self._seq + 1, int(self._clock() * 1000))
        batch.process, batch.seq = token, self._seq

    async def _write(
        self,
        batch: UsageBatch,
        written: list[tuple[UsageBatch, Mapping[tuple[str, int], Sequence[int]]]],
    ) -> bool:
        began = time.perf_counter()
        try:
            touched = await self.store.write(batch)
        except StoreError as exc:
            self.failed_flushes += 1
            cause = exc.__cause__ or exc
            logger.warning(
                "usage flush failed (%s); counts kept",
                type(cause).__name__,
                extra=fields("usage.flush_failed"),
            )
            return False
        self.flushes += 1
        self.flushed_rows += batch.rows
        self.flush_seconds += time.perf_counter() - began
        written.append((batch, touched))
        return True

    async def close(self) -> None:
        """Stop the background flush and write what is left (one try)."""
        self._closed = True
        task, self._task = self._task, None
        self.due = 0  # from now on a request is added up as it is recorded
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    # -- reading ---------------------------------------------------------------------------

    def reader(self) -> UsageReader:
        """A reader of this recorder's store that flushes the buffer before each read, so
        its reports include what this process counted up to now (the gate's manager's)."""
        return UsageReader(self.store, clock=self._clock, top_n=self.top_n, flush=self.flush)

    async def overview(self, limit: int = 1000) -> UsageOverview:
        """:meth:`UsageReader.overview` of what is flushed."""
        reader = UsageReader(self.store, clock=self._clock, top_n=self.top_n)
        return await reader.overview(limit)

    async def report(
        self,
        key_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        granularity: Granularity = "minute",
    ) -> UsageReport:
        """:meth:`UsageReader.report` of what is flushed."""
        reader = UsageReader(self.store, clock=self._clock, top_n=self.top_n)
        return await reader.report(key_id, start=start, end=end, granularity=granularity)


def _count(table: dict[str, dict[str, int]], key_id: str, member: str, cap: int) -> None:
    """Count a request of ``key_id`` from ``member`` exactly; a member past ``cap`` distinct
    ones of the key in one flush is not tracked (memory stays bounded; the store keeps the
    busiest ``top_n`` of what it gets)."""
    counts = table.get(key_id)
    if counts is None:
        table[key_id] = {member: 1}
    elif member in counts:
        counts[member] += 1
    elif len(counts) < cap:
        counts[member] = 1
