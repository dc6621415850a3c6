"""Where flushed usage lives: the :class:`UsageStore` protocol, and a memory and a Redis
store with the same retention.

Counts are kept as totals and as per-minute buckets (kept a day) and per-day buckets (kept
90 days) — both configurable. Client keys are also counted per client IP and per origin:
reports name the busiest ``top_n``; the stores track the busiest ``10 * top_n`` (at least
1000), so an address that keeps coming back is not cut at each flush before it can climb.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import NoScriptError

from keystile.clock import Clock, system_clock
from keystile.redis.connect import RedisClient
from keystile.redis.errors import translated
from keystile.redis.packing import Pack, packer
from keystile.redis.schema import RedisSchema
from keystile.redis.scripts import lua
from keystile.usage.models import (
    AT,
    DAY,
    FIELDS,
    INACTIVE_AT,
    MINUTE,
    NFIELDS,
    ROW_WIDTH,
    Granularity,
    LastUse,
    Table,
    tracked,
)
from keystile.usage.totals import FlushTotals, unpack

if TYPE_CHECKING:
    from keystile.usage.recorder import UsageBatch

__all__ = ["MemoryUsageStore", "RedisUsageStore", "UsageStore"]

# A chunk of keys' share of a flush, each key's applied at most once per (process,
# sequence) (what it takes and returns: the script's file).
_WRITE = lua("usage_write")
# Buckets (key-minutes) per script call: one call's work in the app and in Redis stays a
# millisecond or two, whatever the keys in the flush.
CHUNK_ROWS = 200
# Script calls a flush sends per round trip after its first (a pipeline; not on a cluster,
# whose chunks go to their slots' nodes one call each): a flush of 10,000 keys waits on
# Redis 5 times, not 50 — each wait costs the process CPU of its own.
PIPELINE_CHUNKS = 16
# How long a key remembers the latest sequence each process applied to it (a retried
# flush comes sooner: a process whose latest is older than this, by the sequences' ms, is
# forgotten when a new process first writes the key), and how many processes it remembers.
APPLIED_TTL = 3600
APPLIED_CAP = 1024


class UsageStore(Protocol):
    """Where flushed usage lives. The stores here keep per-minute buckets for
    ``minute_retention`` seconds and per-day ones for ``day_retention``; reports ask a store
    with those attributes for nothing older."""

    async def write(self, batch: UsageBatch) -> Mapping[tuple[str, int], Sequence[int]]:
        """Add a batch; return the new per-minute totals of the buckets it touched."""

    async def series(
        self, key_id: str, start: float, end: float, granularity: Granularity
    ) -> list[tuple[int, list[int]]]:
        """(bucket start, counts) for the non-empty buckets starting in [start, end)."""

    async def totals(self, key_id: str) -> list[int]: ...

    async def top(
        self, key_id: str, kind: Literal["ips", "origins"], n: int
    ) -> dict[str, int]: ...

    async def last_use(self, key_id: str) -> LastUse: ...

    async def keys(self, limit: int = 1000) -> list[str]:
        """The ids of keys with recorded usage, the most recently active first."""


class MemoryUsageStore:
    """Usage in this process, with the same retention as the Redis store."""

    def __init__(
        self,
        *,
        clock: Clock = system_clock,
        minute_retention: int = DAY,
        day_retention: int = 90 * DAY,
        top_n: int = 100,
    ) -> None:
        self._clock = clock
        self.minute_retention = minute_retention
        self.day_retention = day_retention
        self.top_n = top_n
        self._minutes: dict[str, dict[int, list[int]]] = {}
        self._days: dict[str, dict[int, list[int]]] = {}
        self._totals: dict[str, list[int]] = {}
        self._last: dict[str, list[Any]] = {}
        self._top: dict[tuple[str, str], Counter[str]] = {}
        # The latest sequence each process applied, the most recent writer last.
        self._applied: OrderedDict[str, int] = OrderedDict()

    async def write(self, batch: UsageBatch) -> Mapping[tuple[str, int], Sequence[int]]:
        if self._applied.get(batch.process, -1) >= batch.seq:
            return {}
        self._applied[batch.process] = batch.seq
        self._applied.move_to_end(batch.process)
        while len(self._applied) > APPLIED_CAP:
            self._applied.popitem(last=False)
        now = self._clock()
        touched: dict[tuple[str, int], Sequence[int]] = {}
        for (key_id, minute), counts in batch.buckets.items():
            for table, bucket in (
                (self._minutes.setdefault(key_id, {}), minute),
                (self._days.setdefault(key_id, {}), minute * MINUTE // DAY),
            ):
                row = table.setdefault(bucket, [0] * NFIELDS)
                for i, value in enumerate(counts):
                    row[i] += value
            total = self._totals.setdefault(key_id, [0] * NFIELDS)
            for i, value in enumerate(counts):
                total[i] += value
            touched[(key_id, minute)] = list(self._minutes[key_id][minute])
        for key_id, last in batch.last.items():
            mine = self._last.setdefault(key_id, [None, None, None, None])
            if last[0] is not None and (mine[0] is None or last[0] >= mine[0]):
                mine[0:3] = last[0:3]
            if last[3] is not None and (mine[3] is None or last[3] >= mine[3]):
                mine[3] = last[3]
        for kind, tops in (("ips", batch.ips), ("origins", batch.origins)):
            for key_id, counter in tops.items():
                top = self._top.setdefault((key_id, kind), Counter())
                top.update(counter)
                if len(top) > (keep := tracked(self.top_n)):
                    self._top[(key_id, kind)] = Counter(dict(top.most_common(keep)))
        self._expire(now)
        return touched

    def _expire(self, now: float) -> None:
        oldest_minute = int((now - self.minute_retention) // MINUTE)
        oldest_day = int((now - self.day_retention) // DAY)
        for table, oldest in ((self._minutes, oldest_minute), (self._days, oldest_day)):
            for buckets in table.values():
                for bucket in [b for b in buckets if b < oldest]:
                    del buckets[bucket]

    async def series(
        self, key_id: str, start: float, end: float, granularity: Granularity
    ) -> list[tuple[int, list[int]]]:
        table, size = (self._minutes, MINUTE) if granularity == "minute" else (self._days, DAY)
        buckets = table.get(key_id, {})
        return [(b * size, list(buckets[b])) for b in sorted(buckets) if start <= b * size < end]

    async def totals(self, key_id: str) -> list[int]:
        return list(self._totals.get(key_id, [0] * NFIELDS))

    async def top(self, key_id: str, kind: Literal["ips", "origins"], n: int) -> dict[str, int]:
        return dict(self._top.get((key_id, kind), Counter()).most_common(n))

    async def last_use(self, key_id: str) -> LastUse:
        return LastUse.of(self._last.get(key_id))

    async def keys(self, limit: int = 1000) -> list[str]:
        def last(key_id: str) -> float:
            row = self._last.get(key_id)
            return float(row[0] or row[3] or 0) if row else 0.0

        return sorted(self._totals, key=last, reverse=True)[:limit]


class RedisUsageStore:
    """Usage in Redis: per key, all-time totals and last use, per-minute counts in one hash
    per hour (a minute's counters in base-64 digits, a byte each), per-day counts, the
    busiest IPs and origins, and, in the totals' hash, per writing process the latest flush
    sequence applied (so a retried flush counts once: a field per process, not a name per
    flush); and an index of the keys by their last flush. A flush is one script call per
    chunk of ~``CHUNK_ROWS`` key-minutes (on a Redis Cluster, per chunk of keys of one hash
    slot), with a yield to the event loop between chunks. Every name comes from
    :class:`~keystile.redis.schema.RedisSchema` (``usage(key_id, part)``, ``usage_index``),
    which lists each one's type, hash tag and TTL (``python -m keystile.redis`` prints
    them). The addresses a production key has used share the prefix but belong to the
    new-IP alert (:class:`keystile.alerts.RedisAlertState`).
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        namespace: str = "keystile",
        minute_retention: int = DAY,
        day_retention: int = 90 * DAY,
        top_n: int = 100,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.names = RedisSchema(namespace)
        self.minute_retention = minute_retention
        self.day_retention = day_retention
        self.top_n = top_n
        self._script = client.register_script(_WRITE)
        # How a chunk's rows are sent: MessagePack where the server unpacks it, else JSON
        # (asked at the first write).
        self._pack: Pack | None = None
        # What a key's usage names are made of around its id: ``<ns>:usage:{``, ``}:``.
        before, _, after = self.names.usage("\n", "").partition("\n")
        self._names = (before, after)
        # On a Redis Cluster one script call may touch one hash slot only: a flush's chunks
        # are then of keys of one slot (every name of a key shares its slot).
        self._slot: Callable[[str], int] | None = None
        if isinstance(client, RedisCluster):
            self._slot = lambda key_id: int(key_slot(self.names.usage(key_id, "").encode()))

    @translated("writing usage")
    async def write(self, batch: UsageBatch) -> Mapping[tuple[str, int], Sequence[int]]:
        index, index_ttl = self.names.usage_index, self.day_retention + DAY
        pack = self._pack
        if pack is None:
            pack = self._pack = await packer(self.client)
        cluster = self._slot is not None
        head = json.dumps(
            [
                batch.process,
                str(batch.seq),
                APPLIED_TTL,
                APPLIED_CAP,
                self.minute_retention + 3600,
                self.day_retention + DAY,
                self.day_retention + DAY,
                tracked(self.top_n),
                0 if cluster else index_ttl,  # the index is the last of KEYS (not on a cluster)
                *self._names,
            ]
        )
        touched = FlushTotals()
        scores: dict[str, Any] = {}
        queued: list[_Call] = []  # (rows, KEYS, ARGV[2:])
        sent = False
        async for chunk in _chunks(batch, self._slot):
            # One declared name per call (the chunk's slot); the script makes each key's.
            ids, minutes, rows = chunk  # (rows: their values, column after column)
            keys = [self.names.usage(ids[0], "total")]
            payload, tops = pack(chunk), _tops(batch, ids, pack)  # [key ids, minutes, values]
            if cluster:  # one slot per call: the index, in a slot of its own, comes last
                reply = await self._script(keys=keys, args=[head, payload, tops])
                n = len(ids)
                used, inactive = rows[AT * n : (AT + 1) * n], rows[INACTIVE_AT * n :]
                for key_id, at, attempt in zip(ids, used, inactive, strict=True):
                    score = at or attempt or 0
                    if score >= scores.get(key_id, 0):
                        scores[key_id] = score
                touched.add(ids, minutes, reply)
            else:
                queued.append((chunk, [*keys, index], payload, tops))
                # The first chunk goes alone: a flush that hears nothing back (Redis gone,
                # the reply lost) sends no more, and is retried whole.
                if len(queued) == PIPELINE_CHUNKS or not sent:
                    sent = True
                    await self._send(queued, head, touched)
                    queued = []
            await asyncio.sleep(0)  # a large flush lets requests run between its chunks
        if queued:
            await self._send(queued, head, touched)
        for start in range(0, len(scores), CHUNK_ROWS):
            part = dict(itertools.islice(scores.items(), start, start + CHUNK_ROWS))
            # GT: a flush of tokens only, or of an older use, never moves a key back.
            await self.client.zadd(index, part, gt=True)
        if scores:
            await self.client.expire(index, index_ttl)
        return touched

    async def _send(self, queued: list[_Call], head: str, touched: FlushTotals) -> None:
        """The script calls of ``queued`` chunks in one round trip (a pipeline, for more
        than one); if Redis had lost the script (restarted, SCRIPT FLUSH), it is loaded and
        the calls that found it missing are sent again. Any other error is raised (the
        flush is retried whole: each key's share applies once)."""
        if len(queued) == 1:  # a flush of one chunk: a plain call (loads a missing script)
            _, keys, payload, tops = queued[0]
            replies = [await self._script(keys=keys, args=[head, payload, tops])]
        else:
            replies = await self._pipelined(queued, head)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:
                await self.client.script_load(_WRITE)
                again = await self._pipelined([queued[i] for i in missing], head)
                for i, reply in zip(missing, again, strict=True):
                    replies[i] = reply
        for ((ids, minutes, _), _, _, _), reply in zip(queued, replies, strict=True):
            if isinstance(reply, Exception):
                raise reply
            touched.add(ids, minutes, reply)

    async def _pipelined(self, queued: list[_Call], head: str) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for _, keys, payload, tops in queued:
                pipe.evalsha(self._script.sha, len(keys), *keys, head, payload, tops)
            return list(await pipe.execute(raise_on_error=False))

    @translated("reading usage")
    async def series(
        self, key_id: str, start: float, end: float, granularity: Granularity
    ) -> list[tuple[int, list[int]]]:
        if granularity == "minute":
            first, last = int(start // 3600), math.ceil(end / 3600)
            # Bounded: the latest 2000 hours (~83 days) of the range at most.
            hours = range(max(first, last - 1999), last + 1)
            rows: dict[int, list[int]] = {}
            async with self.client.pipeline(transaction=False) as pipe:
                for hour in hours:
                    pipe.hgetall(self.names.usage(key_id, f"m:{hour}"))
                    # The earlier layout's hash of the hour, until it expires (the write
                    # script moves a minute of it to m:<hour> when it writes the minute).
                    pipe.hgetall(self.names.usage(key_id, f"h:{hour}"))
                hashes = iter(await pipe.execute())  # m:<hour>, h:<hour>, per hour
                for hour, digits, earlier in zip(hours, hashes, hashes, strict=True):
                    for field, value in digits.items():
                        row = rows.setdefault(hour * 60 + int(field), [0] * NFIELDS)
                        for i, count in enumerate(_undigit(value)):
                            row[i] += count
                    for field, value in earlier.items():
                        minute_text, old, name = _text(field).partition(":")
                        if old:  # written before the counts were packed: one per field
                            row = rows.setdefault(int(minute_text), [0] * NFIELDS)
                            row[FIELDS.index(name)] += int(value)
                            continue
                        row = rows.setdefault(hour * 60 + int(minute_text), [0] * NFIELDS)
                        for i, count in enumerate(unpack(_text(value))):
                            row[i] += count
            return [(m * MINUTE, rows[m]) for m in sorted(rows) if start <= m * MINUTE < end]
        first_day, last_day = int(start // DAY), math.ceil(end / DAY)
        days = range(max(first_day, last_day - 399), last_day + 1)  # the latest 400 at most
        async with self.client.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self.names.usage(key_id, f"d:{day}"))
            replies = await pipe.execute()
        out = []
        for day, raw in zip(days, replies, strict=True):
            if raw and start <= day * DAY < end:
                out.append((day * DAY, _counts(raw)))
        return out

    @translated("reading usage")
    async def totals(self, key_id: str) -> list[int]:
        raw: dict[Any, Any] = await self.client.hgetall(self.names.usage(key_id, "total"))
        return _counts(raw)

    @translated("reading usage")
    async def top(self, key_id: str, kind: Literal["ips", "origins"], n: int) -> dict[str, int]:
        raw: list[Any] = await self.client.zrevrange(
            self.names.usage(key_id, kind), 0, n - 1, withscores=True
        )
        return {_text(member): int(score) for member, score in raw}

    @translated("reading usage")
    async def last_use(self, key_id: str) -> LastUse:
        fields = ("last_at", "last_ip", "last_origin", "last_inactive_at")
        raw = await self.client.hmget(self.names.usage(key_id, "total"), *fields)
        if all(v is None for v in raw):
            return LastUse()
        values = [None if v is None else _text(v) for v in raw]
        return LastUse.of(values)

    @translated("reading usage")
    async def keys(self, limit: int = 1000) -> list[str]:
        index = self.names.usage_index
        raw: list[Any] = await self.client.zrevrange(index, 0, limit - 1)
        return [_text(k) for k in raw]


# A chunk of a flush, as the write script takes it: the key id and the minute of each of
# its rows (a key's one after another, in minute order), and the rows' values column after
# column (each row's first counter, then each row's second, ... each row's last inactive
# attempt at: ``ROW_WIDTH`` columns of ``len(ids)``).
Chunk = tuple[list[str], list[int], list[Any]]
# A script call waiting to be sent: its chunk, KEYS, and ARGV after the head.
_Call = tuple[Chunk, list[str], str | bytes, str | bytes]
_NO_TOPS: list[dict[str, Any]] = [{}, {}]


async def _chunks(batch: UsageBatch, slot: Callable[[str], int] | None) -> AsyncIterator[Chunk]:
    """``batch`` in chunks of about ``CHUNK_ROWS`` rows, a key's rows one after another in
    one chunk (the script checks a key's sequence at its first); with ``slot`` (a
    cluster), each chunk of keys of one slot. A flush of one minute (the usual) is cut as
    it comes, its columns sliced in C; one of several minutes is grouped by key first,
    with a yield to the event loop every ``CHUNK_ROWS`` rows."""
    if len(batch.minutes) == 1 and slot is None:
        [(minute, table)] = batch.minutes.items()
        ids = list(table)
        for start in range(0, len(ids), CHUNK_ROWS):
            part = ids[start : start + CHUNK_ROWS]
            yield part, [minute] * len(part), table.flat(start, start + CHUNK_ROWS)
        return
    groups: dict[int, dict[str, list[tuple[int, Table, int]]]] = {}
    done = 0
    for minute in sorted(batch.minutes):
        table = batch.minutes[minute]
        for key_id, at in table.index.items():
            group = groups.setdefault(0 if slot is None else slot(key_id), {})
            mine = group.get(key_id)
            if mine is None:
                mine = group[key_id] = []
            mine.append((minute, table, at))
            done += 1
            if done % CHUNK_ROWS == 0:
                await asyncio.sleep(0)
    for group in groups.values():
        rows: list[tuple[str, int, Table, int]] = []
        for key_id, mine in group.items():
            rows += [(key_id, minute, table, at) for minute, table, at in mine]  # never cut
            if len(rows) >= CHUNK_ROWS:
                yield _gathered(rows)
                rows = []
        if rows:
            yield _gathered(rows)


def _gathered(rows: list[tuple[str, int, Table, int]]) -> Chunk:
    """A chunk of rows from tables of several minutes: (key id, minute, table, index)."""
    values = [t.columns[field][at] for field in range(ROW_WIDTH) for _, _, t, at in rows]
    return [k for k, _, _, _ in rows], [m for _, m, _, _ in rows], values


def _tops(batch: UsageBatch, ids: list[str], pack: Pack) -> str | bytes:
    """The per-IP and per-origin counts of the chunk's keys that have any, as the write
    script takes them: ``[{key id: {member: count}}, {...}]`` (client keys only)."""
    ips, origins = batch.ips, batch.origins
    if not ips and not origins:
        return pack(_NO_TOPS)
    return pack(
        [{k: ips[k] for k in ids if k in ips}, {k: origins[k] for k in ids if k in origins}]
    )


_ZEROS = (0,) * NFIELDS


def _undigit(packed: bytes | str) -> list[int]:
    """A minute's counters as ``m:<hour>`` holds them: one after another, trailing zeros
    left out, each in base 64, most significant digit first, a byte per digit (0-63), the
    last digit of each counter with 64 added."""
    counts: list[int] = []
    value = 0
    for byte in packed.encode() if isinstance(packed, str) else packed:
        if byte >= 64:
            counts.append(value * 64 + byte - 64)
            value = 0
        else:
            value = value * 64 + byte
    if len(counts) < NFIELDS:
        counts += _ZEROS[len(counts) :]
    return counts


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _counts(raw: dict[Any, Any]) -> list[int]:
    counts = [0] * NFIELDS
    for field, value in raw.items():
        name = _text(field)
        if name in FIELDS:
            counts[FIELDS.index(name)] = int(value)
    return counts
