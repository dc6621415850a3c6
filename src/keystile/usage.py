"""Usage monitoring: what each key does, aggregated in process and flushed in batches
(SPEC §7).

Per key: requests, bytes in and out, 4xx and 5xx apart, requests refused by the rate
limit or the token quota, AI tokens, attempts with a revoked or expired key, and
when/where it was last used. Client keys also per client IP and per origin: reports name
the busiest ``top_n``; the stores track the busiest ``10 * top_n`` (at least 1000), so
an address that keeps coming back is not cut at each flush before it can climb. Counts
are kept as totals and as per-minute buckets (kept a day) and per-day buckets (kept 90
days) — both configurable — and every Redis name carries a TTL.

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
import secrets
from collections import Counter, OrderedDict
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis
from redis.exceptions import RedisError

from keystile.addresses import BY_CLIENT, WATCH_IPS
from keystile.clock import Clock, system_clock, to_datetime, to_timestamp

__all__ = [
    "BY_CLIENT",
    "FIELDS",
    "WATCH_IPS",
    "KeyUsage",
    "LastUse",
    "MemoryUsageStore",
    "RedisUsageStore",
    "UsageBatch",
    "UsageOverview",
    "UsagePoint",
    "UsageRecorder",
    "UsageReport",
    "UsageStore",
    "UsageTotals",
    "usage_store_for",
]

logger = logging.getLogger("keystile.usage")

FIELDS = (
    "requests",
    "bytes_in",
    "bytes_out",
    "errors_4xx",
    "errors_5xx",
    "rate_limited",
    "quota_exceeded",
    "tokens",
    "inactive_attempts",
)
(
    REQUESTS,
    BYTES_IN,
    BYTES_OUT,
    ERRORS_4XX,
    ERRORS_5XX,
    RATE_LIMITED,
    QUOTA_EXCEEDED,
    TOKENS,
    INACTIVE,
) = range(len(FIELDS))
_N = len(FIELDS)
MINUTE = 60
DAY = 86_400
Granularity = Literal["minute", "day"]


# -- reports --------------------------------------------------------------------------------


class UsageTotals(BaseModel):
    """Counts over some span."""

    model_config = ConfigDict(frozen=True)

    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    errors_4xx: int = 0
    errors_5xx: int = 0
    rate_limited: int = 0
    quota_exceeded: int = 0
    tokens: int = 0
    inactive_attempts: int = 0

    @classmethod
    def of(cls, counts: Sequence[int]) -> UsageTotals:
        return cls(**dict(zip(FIELDS, counts, strict=True)))


class UsagePoint(BaseModel):
    """One bucket of a series."""

    model_config = ConfigDict(frozen=True)

    start: datetime
    counts: UsageTotals


class LastUse(BaseModel):
    """When and from where a key was last used (and last tried while revoked/expired)."""

    model_config = ConfigDict(frozen=True)

    at: datetime | None = None
    ip: str | None = None
    origin: str | None = None
    inactive_attempt_at: datetime | None = None


class UsageReport(BaseModel):
    """A key's usage: totals over the range, a series, the busiest IPs and origins."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    start: datetime
    end: datetime
    granularity: Granularity
    totals: UsageTotals
    all_time: UsageTotals
    series: list[UsagePoint]
    top_ips: dict[str, int]
    top_origins: dict[str, int]
    last_use: LastUse


class KeyUsage(BaseModel):
    """One key's all-time totals and last use, in an overview."""

    model_config = ConfigDict(frozen=True)

    key_id: str
    totals: UsageTotals
    last_use: LastUse


class UsageOverview(BaseModel):
    """Every key with recorded usage (the most recently active first, at most ``limit``)."""

    model_config = ConfigDict(frozen=True)

    keys: list[KeyUsage]
    totals: UsageTotals


# -- what a flush carries -------------------------------------------------------------------


# A bucket row: the FIELDS counters, then the last use seen in that minute, then the
# addresses a watched key used that minute (a set, or None).
_AT, _IP, _ORIGIN, _INACTIVE_AT, _SEEN = range(_N, _N + 5)
_MAX_SEEN = 64


def tracked(top_n: int) -> int:
    """How many IPs or origins per client key a buffer or store keeps counting, for
    reports of the busiest ``top_n``."""
    return max(10 * top_n, 1_000)


def _row() -> list[Any]:
    return [0] * _N + [None, None, None, None, None]


class UsageBatch:
    """Counts gathered since the last flush: per minute, per key, one row each."""

    __slots__ = ("id", "ips", "minutes", "origins", "rows")

    def __init__(self) -> None:
        self.id = secrets.token_hex(8)  # what makes a retried write idempotent
        self.minutes: dict[int, dict[str, list[Any]]] = {}
        self.rows = 0  # key-minutes held (the buffer's bound counts these)
        self.ips: dict[str, Counter[str]] = {}
        self.origins: dict[str, Counter[str]] = {}

    def __bool__(self) -> bool:
        return self.rows > 0

    @property
    def buckets(self) -> dict[tuple[str, int], list[int]]:
        """(key id, minute) -> counters."""
        return {
            (key_id, minute): row[:_N]
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
                if row[_AT] is not None:
                    mine[0:3] = row[_AT : _ORIGIN + 1]
                if row[_INACTIVE_AT] is not None:
                    mine[3] = row[_INACTIVE_AT]
        return out

    @property
    def seen_ips(self) -> dict[str, set[str]]:
        """key id -> the addresses a watched key used since the last flush."""
        out: dict[str, set[str]] = {}
        for table in self.minutes.values():
            for key_id, row in table.items():
                if row[_SEEN]:
                    out.setdefault(key_id, set()).update(row[_SEEN])
        return out

    def requests(self) -> int:
        return sum(c[REQUESTS] + c[INACTIVE] for c in self.buckets.values())

    def row(self, key_id: str, minute: int) -> list[Any]:
        table = self.minutes.setdefault(minute, {})
        row = table.get(key_id)
        if row is None:
            row = table[key_id] = _row()
            self.rows += 1
        return row

    def merge(
        self, other: UsageBatch, limit: int | None = None, table_cap: int | None = None
    ) -> int:
        """Add ``other``'s counts into this batch; rows beyond ``limit`` are not taken, and
        per-IP/origin tables keep their ``table_cap`` busiest. Returns the requests the
        rows not taken held (what was dropped)."""
        lost = 0
        for minute, table in other.minutes.items():
            for key_id, row in table.items():
                mine_table = self.minutes.get(minute)
                present = mine_table is not None and key_id in mine_table
                if not present and limit is not None and self.rows >= limit:
                    lost += row[REQUESTS] + row[INACTIVE]
                    continue
                mine = self.row(key_id, minute)
                for i in range(_N):
                    mine[i] += row[i]
                if row[_AT] is not None and (mine[_AT] is None or row[_AT] >= mine[_AT]):
                    mine[_AT : _ORIGIN + 1] = row[_AT : _ORIGIN + 1]
                if row[_INACTIVE_AT] is not None and (
                    mine[_INACTIVE_AT] is None or row[_INACTIVE_AT] >= mine[_INACTIVE_AT]
                ):
                    mine[_INACTIVE_AT] = row[_INACTIVE_AT]
                if row[_SEEN]:
                    mine[_SEEN] = set(list((mine[_SEEN] or set()) | row[_SEEN])[:_MAX_SEEN])
        for table_mine, source in ((self.ips, other.ips), (self.origins, other.origins)):
            for key_id, counter in source.items():
                mine_counter = table_mine.setdefault(key_id, Counter())
                mine_counter.update(counter)
                if table_cap is not None and len(mine_counter) > table_cap:
                    table_mine[key_id] = Counter(dict(mine_counter.most_common(table_cap)))
        return lost


class UsageStore(Protocol):
    """Where flushed usage lives. The stores here keep per-minute buckets for
    ``minute_retention`` seconds and per-day ones for ``day_retention``; reports ask a store
    with those attributes for nothing older."""

    async def write(self, batch: UsageBatch) -> dict[tuple[str, int], list[int]]:
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
        self._applied: OrderedDict[str, None] = OrderedDict()  # recent batch ids

    async def write(self, batch: UsageBatch) -> dict[tuple[str, int], list[int]]:
        if batch.id in self._applied:
            return {}
        self._applied[batch.id] = None
        while len(self._applied) > 1000:
            self._applied.popitem(last=False)
        now = self._clock()
        touched: dict[tuple[str, int], list[int]] = {}
        for (key_id, minute), counts in batch.buckets.items():
            for table, bucket in (
                (self._minutes.setdefault(key_id, {}), minute),
                (self._days.setdefault(key_id, {}), minute * MINUTE // DAY),
            ):
                row = table.setdefault(bucket, [0] * _N)
                for i, value in enumerate(counts):
                    row[i] += value
            total = self._totals.setdefault(key_id, [0] * _N)
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
        return list(self._totals.get(key_id, [0] * _N))

    async def top(self, key_id: str, kind: Literal["ips", "origins"], n: int) -> dict[str, int]:
        return dict(self._top.get((key_id, kind), Counter()).most_common(n))

    async def last_use(self, key_id: str) -> LastUse:
        return _last_use(self._last.get(key_id))

    async def keys(self, limit: int = 1000) -> list[str]:
        def last(key_id: str) -> float:
            row = self._last.get(key_id)
            return float(row[0] or row[3] or 0) if row else 0.0

        return sorted(self._totals, key=last, reverse=True)[:limit]


def _last_use(raw: Sequence[Any] | None) -> LastUse:
    if raw is None:
        return LastUse()
    at, ip, origin, inactive = raw
    return LastUse(
        at=None if at is None else to_datetime(float(at)),
        ip=ip or None,
        origin=origin or None,
        inactive_attempt_at=None if inactive is None else to_datetime(float(inactive)),
    )


# One key's share of a flush, applied at most once per batch id (KEYS[1] is the batch's
# marker: a retried flush whose first reply was lost finds it set and adds nothing).
# KEYS: marker, total, ips, origins, then an hour and a day hash per minute bucket.
# ARGV: marker ms, hour ttl, day ttl, total ttl, top n, number of buckets; per bucket the
# minute and the counters; last use (at, ip, origin, inactive at; '' = none); the per-IP
# then the per-origin table as a count followed by member, count pairs.
# Returns each bucket's minute totals after the write.
_WRITE = """
local fields = {'requests', 'bytes_in', 'bytes_out', 'errors_4xx', 'errors_5xx',
                'rate_limited', 'quota_exceeded', 'tokens', 'inactive_attempts'}
local fresh = redis.call('SET', KEYS[1], '1', 'NX', 'PX', ARGV[1])
local n = tonumber(ARGV[6])
local pos = 7
local out = {}
for b = 1, n do
  local minute = ARGV[pos]
  local hour_key, day_key = KEYS[3 + 2 * b], KEYS[4 + 2 * b]
  for i = 1, #fields do
    local value = tonumber(ARGV[pos + i])
    local field = minute .. ':' .. fields[i]
    if fresh and value ~= 0 then
      redis.call('HINCRBY', hour_key, field, value)
      redis.call('HINCRBY', day_key, fields[i], value)
      redis.call('HINCRBY', KEYS[2], fields[i], value)
    end
    out[#out + 1] = tonumber(redis.call('HGET', hour_key, field) or '0')
  end
  if fresh then
    redis.call('EXPIRE', hour_key, ARGV[2])
    redis.call('EXPIRE', day_key, ARGV[3])
  end
  pos = pos + 1 + #fields
end
if fresh then
  local at, ip, origin, inactive = ARGV[pos], ARGV[pos + 1], ARGV[pos + 2], ARGV[pos + 3]
  pos = pos + 4
  if at ~= '' then
    local seen = redis.call('HGET', KEYS[2], 'last_at')
    if not seen or tonumber(at) >= tonumber(seen) then
      redis.call('HSET', KEYS[2], 'last_at', at, 'last_ip', ip, 'last_origin', origin)
    end
  end
  if inactive ~= '' then
    local seen = redis.call('HGET', KEYS[2], 'last_inactive_at')
    if not seen or tonumber(inactive) >= tonumber(seen) then
      redis.call('HSET', KEYS[2], 'last_inactive_at', inactive)
    end
  end
  redis.call('EXPIRE', KEYS[2], ARGV[4])
  for t = 3, 4 do
    local count = tonumber(ARGV[pos])
    pos = pos + 1
    for j = 1, count do
      redis.call('ZINCRBY', KEYS[t], ARGV[pos + 1], ARGV[pos])
      pos = pos + 2
    end
    if count > 0 then
      redis.call('ZREMRANGEBYRANK', KEYS[t], 0, -(tonumber(ARGV[5]) + 1))
      redis.call('EXPIRE', KEYS[t], ARGV[4])
    end
  end
end
return out
"""


class RedisUsageStore:
    """Usage in Redis, every name hash-tagged by key id and carrying a TTL::

    keystile:usage:{key_id}:total        hash: field -> count, and last use
    keystile:usage:{key_id}:h:<hour>     hash: "<minute>:<field>" -> count (a day)
    keystile:usage:{key_id}:d:<day>      hash: field -> count (90 days)
    keystile:usage:{key_id}:ips          sorted set: the busiest client IPs
    keystile:usage:{key_id}:origins      sorted set: the busiest origins
    keystile:usage:index                 sorted set: key ids by last flush
    """

    def __init__(
        self,
        client: Redis,
        *,
        namespace: str = "keystile",
        minute_retention: int = DAY,
        day_retention: int = 90 * DAY,
        top_n: int = 100,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.minute_retention = minute_retention
        self.day_retention = day_retention
        self.top_n = top_n
        self._script = client.register_script(_WRITE)

    def _name(self, key_id: str, suffix: str) -> str:
        return f"{self.namespace}:usage:{{{key_id}}}:{suffix}"

    async def write(self, batch: UsageBatch) -> dict[tuple[str, int], list[int]]:
        buckets = batch.buckets
        last = batch.last
        per_key: dict[str, list[int]] = {}
        for key_id, minute in buckets:
            per_key.setdefault(key_id, []).append(minute)
        for key_id in last:
            per_key.setdefault(key_id, [])
        index = f"{self.namespace}:usage:index"
        async with self.client.pipeline(transaction=False) as pipe:
            for key_id, minutes in per_key.items():
                keys = [
                    self._name(key_id, f"flush:{batch.id}"),
                    self._name(key_id, "total"),
                    self._name(key_id, "ips"),
                    self._name(key_id, "origins"),
                ]
                args: list[Any] = [
                    3_600_000,  # a batch id is remembered an hour: retries come sooner
                    self.minute_retention + 3600,
                    self.day_retention + DAY,
                    self.day_retention + DAY,
                    tracked(self.top_n),
                    len(minutes),
                ]
                for minute in minutes:
                    keys += [
                        self._name(key_id, f"h:{minute // 60}"),
                        self._name(key_id, f"d:{minute * MINUTE // DAY}"),
                    ]
                    args += [minute, *buckets[(key_id, minute)]]
                at, ip, origin, inactive = last.get(key_id, (None, None, None, None))
                args += ["" if at is None else at, ip or "", origin or ""]
                args += ["" if inactive is None else inactive]
                empty: Counter[str] = Counter()
                for table in (batch.ips.get(key_id, empty), batch.origins.get(key_id, empty)):
                    args.append(len(table))
                    for member, count in table.items():
                        args += [member, count]
                await self._script(keys=keys, args=args, client=pipe)
                # GT: a flush of tokens only, or of an older use, never moves a key back.
                pipe.zadd(index, {key_id: at or inactive or 0}, gt=True)
            pipe.expire(index, self.day_retention + DAY)
            replies = await pipe.execute()
        touched: dict[tuple[str, int], list[int]] = {}
        for (key_id, minutes), reply in zip(per_key.items(), replies[0::2], strict=False):
            for i, minute in enumerate(minutes):
                touched[(key_id, minute)] = [int(v) for v in reply[i * _N : (i + 1) * _N]]
        return touched

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
                    pipe.hgetall(self._name(key_id, f"h:{hour}"))
                for raw in await pipe.execute():
                    for field, value in raw.items():
                        minute_text, _, name = _text(field).partition(":")
                        row = rows.setdefault(int(minute_text), [0] * _N)
                        row[FIELDS.index(name)] += int(value)
            return [(m * MINUTE, rows[m]) for m in sorted(rows) if start <= m * MINUTE < end]
        first_day, last_day = int(start // DAY), math.ceil(end / DAY)
        days = range(max(first_day, last_day - 399), last_day + 1)  # the latest 400 at most
        async with self.client.pipeline(transaction=False) as pipe:
            for day in days:
                pipe.hgetall(self._name(key_id, f"d:{day}"))
            replies = await pipe.execute()
        out = []
        for day, raw in zip(days, replies, strict=True):
            if raw and start <= day * DAY < end:
                out.append((day * DAY, _counts(raw)))
        return out

    async def totals(self, key_id: str) -> list[int]:
        raw: dict[Any, Any] = await self.client.hgetall(self._name(key_id, "total"))
        return _counts(raw)

    async def top(self, key_id: str, kind: Literal["ips", "origins"], n: int) -> dict[str, int]:
        raw: list[Any] = await self.client.zrevrange(
            self._name(key_id, kind), 0, n - 1, withscores=True
        )
        return {_text(member): int(score) for member, score in raw}

    async def last_use(self, key_id: str) -> LastUse:
        raw = await self.client.hmget(
            self._name(key_id, "total"), "last_at", "last_ip", "last_origin", "last_inactive_at"
        )
        if all(v is None for v in raw):
            return LastUse()
        values = [None if v is None else _text(v) for v in raw]
        return _last_use(values)

    async def keys(self, limit: int = 1000) -> list[str]:
        index = f"{self.namespace}:usage:index"
        raw: list[Any] = await self.client.zrevrange(index, 0, limit - 1)
        return [_text(k) for k in raw]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _counts(raw: dict[Any, Any]) -> list[int]:
    counts = [0] * _N
    for field, value in raw.items():
        name = _text(field)
        if name in FIELDS:
            counts[FIELDS.index(name)] = int(value)
    return counts


class UsageRecorder:
    """Aggregates usage in process and flushes it to a :class:`UsageStore` in batches.

    ``max_buckets`` bounds the buffer (distinct key-minutes waiting to be flushed); counts
    that do not fit are dropped and counted in :attr:`dropped` (requests). ``top_n`` bounds
    the per-IP and per-origin tables of each client key. ``on_flush`` callbacks receive
    each flushed batch and the new per-minute totals (alert rules hang there).
    """

    def __init__(
        self,
        store: UsageStore,
        *,
        clock: Clock = system_clock,
        interval: float = 1.0,
        max_buckets: int = 50_000,
        top_n: int = 100,
    ) -> None:
        self.store = store
        self._clock = clock
        self.interval = interval
        self.max_buckets = max_buckets
        self.top_n = top_n
        # Exact per-IP/origin counts for up to this many members per key per flush; the
        # store keeps counting as many, and reports the busiest top_n.
        self.table_cap = tracked(top_n)
        self.dropped = 0
        self.flushes = 0
        self.failed_flushes = 0
        self.on_flush: list[Any] = []
        self._batch = UsageBatch()
        self._retry: list[UsageBatch] = []  # a batch whose write failed, kept whole
        self._minute = -1  # the minute whose table _row() last used, in self._batch
        self._span = (0.0, 0.0)  # [start, end) of that minute, in seconds
        self._table: dict[str, list[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._flush_lock = asyncio.Lock()
        self._last_warning = -math.inf

    # -- recording (no I/O) ----------------------------------------------------------------

    def _row(self, key_id: str, now: float) -> list[Any] | None:
        minute = int(now // MINUTE)
        if minute == self._minute:
            table = self._table
        else:
            table = self._batch.minutes.setdefault(minute, {})
            self._minute, self._table = minute, table
            # Floats: `now` is one, and a float compares slowly with an int past 2**30.
            self._span = (float(minute * MINUTE), float((minute + 1) * MINUTE))
        row = table.get(key_id)
        if row is None:
            if self._batch.rows >= self.max_buckets:
                return None
            row = table[key_id] = _row()
            self._batch.rows += 1
            if self._task is None:
                self._ensure_task()
        return row

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
        new-IP alert on production keys). ``rate_limited``: refused by the rate limit."""
        if now is None:
            now = self._clock()
        start, end = self._span
        row = self._table.get(key_id) if start <= now < end else None
        if row is None:
            row = self._row(key_id, now)
            if row is None:
                self._drop()
                return
        row[REQUESTS] += 1
        if bytes_in:  # most requests have no body: skip making an int for nothing
            row[BYTES_IN] += bytes_in
        row[BYTES_OUT] += bytes_out
        if status >= 400:
            row[ERRORS_5XX if status >= 500 else ERRORS_4XX] += 1
            if rate_limited:  # a 429
                row[RATE_LIMITED] += 1
        if ip_mode == WATCH_IPS:  # a production key: its addresses, for the new-IP alert
            if ip is not None and ip != row[_IP]:
                seen = row[_SEEN]
                if seen is None:
                    seen = row[_SEEN] = set()
                if len(seen) < _MAX_SEEN:
                    seen.add(ip)
        elif ip_mode == BY_CLIENT:
            self._count_client(key_id, ip, origin)
        at = row[_AT]
        if at is None or now >= at:  # a slow request ending last is not the last use
            row[_AT] = now
            row[_IP] = ip
            row[_ORIGIN] = origin

    def _count_client(self, key_id: str, ip: str | None, origin: str | None) -> None:
        """Count a client key's request by IP and by origin."""
        for tables, member in ((self._batch.ips, ip), (self._batch.origins, origin)):
            if member is not None:
                counter = tables.get(key_id)
                if counter is None:  # not setdefault: that builds a Counter every time
                    counter = tables[key_id] = Counter()
                _count(counter, member, self.table_cap)

    def record_refusal(self, key_id: str, kind: Literal["quota", "inactive"]) -> None:
        """Count a request refused for its quota (already counted as a request by the
        middleware) or an attempt with a revoked or expired key."""
        now = self._clock()
        row = self._row(key_id, now)
        if row is None:
            self._drop()
            return
        if kind == "quota":
            row[QUOTA_EXCEEDED] += 1
        else:
            row[INACTIVE] += 1
            row[_INACTIVE_AT] = now

    def record_tokens(self, key_id: str, tokens: int) -> None:
        """Count AI tokens a key consumed."""
        row = self._row(key_id, self._clock())
        if row is None:
            self._drop()
            return
        row[TOKENS] += tokens

    def _drop(self) -> None:
        self.dropped += 1
        now = self._clock()
        if now - self._last_warning > 60:
            self._last_warning = now
            logger.warning(
                "usage buffer full (%d key-minutes): dropping counts (%d dropped so far)",
                self.max_buckets,
                self.dropped,
            )

    # -- flushing --------------------------------------------------------------------------

    def _ensure_task(self) -> None:
        if self._task is None and not self._closed:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # recorded outside a loop: the next flush() or close() takes it
            self._task = loop.create_task(self._run(), name="keystile-usage-flush")

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.interval)
            await self.flush()

    async def flush(self) -> bool:
        """Write what is buffered now; whether everything was written (or nothing was due).

        A batch whose write fails is kept whole, with its id, and retried first next time
        (the stores apply a batch id at most once, so a write whose reply was lost is not
        counted twice); while it fails, new counts keep gathering in the bounded buffer.
        """
        written: list[tuple[UsageBatch, dict[tuple[str, int], list[int]]]] = []
        ok = True
        async with self._flush_lock:
            while self._retry and ok:
                ok = await self._write(self._retry[0], written)
                if ok:
                    self._retry.pop(0)
            if ok:
                batch, self._batch = self._batch, UsageBatch()
                self._minute = -1
                self._span = (0.0, 0.0)
                if batch:
                    ok = await self._write(batch, written)
                    if not ok:
                        self._retry.append(batch)
        for batch, touched in written:
            for callback in self.on_flush:
                try:
                    result = callback(batch, touched)
                    if asyncio.iscoroutine(result):
                        await result
                except Exception:  # an alert rule must not lose the next flush
                    logger.exception("usage flush callback failed")
        return ok

    async def _write(
        self,
        batch: UsageBatch,
        written: list[tuple[UsageBatch, dict[tuple[str, int], list[int]]]],
    ) -> bool:
        try:
            touched = await self.store.write(batch)
        except (RedisError, OSError, TimeoutError) as exc:
            self.failed_flushes += 1
            logger.warning("usage flush failed (%s); counts kept", type(exc).__name__)
            return False
        self.flushes += 1
        written.append((batch, touched))
        return True

    async def close(self) -> None:
        """Stop the background flush and write what is left (one try)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    # -- reading ---------------------------------------------------------------------------

    async def overview(self, limit: int = 1000) -> UsageOverview:
        """All-time totals and last use of every key with recorded usage (most recently
        active first, at most ``limit``)."""
        keys = []
        grand = [0] * _N
        for key_id in await self.store.keys(limit):
            counts = await self.store.totals(key_id)
            for i, value in enumerate(counts):
                grand[i] += value
            keys.append(
                KeyUsage(
                    key_id=key_id,
                    totals=UsageTotals.of(counts),
                    last_use=await self.store.last_use(key_id),
                )
            )
        return UsageOverview(keys=keys, totals=UsageTotals.of(grand))

    async def report(
        self,
        key_id: str,
        *,
        start: datetime | None = None,
        end: datetime | None = None,
        granularity: Granularity = "minute",
    ) -> UsageReport:
        """A key's usage in the buckets starting in [``start``, ``end``) (default: the hour,
        or 30 days, up to and including the current bucket), with totals, a series, all-time
        totals, the busiest IPs/origins and the last use."""
        now = self._clock()
        size = MINUTE if granularity == "minute" else DAY
        # By default the range ends with the bucket now is in, so it includes what was
        # just counted.
        end_ts = to_timestamp(end) if end is not None else (now // size + 1) * size
        span = 3600 if granularity == "minute" else 30 * DAY
        start_ts = to_timestamp(start) if start is not None else end_ts - span
        if end_ts < start_ts:
            raise ValueError("the report's end is before its start")
        # Buckets exist only within their retention (a margin for TTLs and clocks): asking
        # for more would only read nothing, at a cost that grows with the range.
        if granularity == "minute":
            kept, margin = getattr(self.store, "minute_retention", None), 3600
        else:
            kept, margin = getattr(self.store, "day_retention", None), DAY
        first = start_ts if kept is None else max(start_ts, now - kept - margin)
        last = min(end_ts, now + margin)
        points = await self.store.series(key_id, first, last, granularity) if first < last else []
        totals = [0] * _N
        for _, counts in points:
            for i, value in enumerate(counts):
                totals[i] += value
        return UsageReport(
            key_id=key_id,
            start=to_datetime(start_ts),
            end=to_datetime(end_ts),
            granularity=granularity,
            totals=UsageTotals.of(totals),
            all_time=UsageTotals.of(await self.store.totals(key_id)),
            series=[UsagePoint(start=to_datetime(t), counts=UsageTotals.of(c)) for t, c in points],
            top_ips=await self.store.top(key_id, "ips", self.top_n),
            top_origins=await self.store.top(key_id, "origins", self.top_n),
            last_use=await self.store.last_use(key_id),
        )


def usage_store_for(store: object) -> UsageStore:
    """A reader of the usage recorded for ``store`` (a key store, cached or not): the
    Redis usage store on the same Redis and namespace, else an empty memory one."""
    from keystile.stores.redis import RedisStore

    backend = getattr(store, "store", store)
    if isinstance(backend, RedisStore):
        return RedisUsageStore(backend.client, namespace=backend.namespace)
    return MemoryUsageStore()


def _count(counter: Counter[str], member: str, cap: int) -> None:
    """Count ``member`` exactly; a member past ``cap`` distinct ones in one flush is not
    tracked (memory stays bounded; the store keeps the busiest ``top_n`` of what it gets)."""
    if member in counter or len(counter) < cap:
        counter[member] += 1
