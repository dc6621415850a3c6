"""Where flushed usage lives: the :class:`UsageStore` protocol, and a memory and a Redis
store with the same retention.

Counts are kept as totals and as per-minute buckets (kept a day) and per-day buckets (kept
90 days) — both configurable. Client keys are also counted per client IP and per origin:
reports name the busiest ``top_n``; the stores track the busiest ``10 * top_n`` (at least
1000), so an address that keeps coming back is not cut at each flush before it can climb.
"""

from __future__ import annotations

import math
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

from keystile.clock import Clock, system_clock
from keystile.redis.connect import RedisClient, is_cluster
from keystile.redis.errors import translated
from keystile.redis.schema import RedisSchema
from keystile.redis.scripts import lua
from keystile.usage.models import (
    DAY,
    FIELDS,
    MINUTE,
    NFIELDS,
    Granularity,
    LastUse,
    tracked,
)

if TYPE_CHECKING:
    from keystile.usage.recorder import UsageBatch

__all__ = ["MemoryUsageStore", "RedisUsageStore", "UsageStore"]

# One key's share of a flush, applied at most once per batch id (what it takes and
# returns: the script's file).
_WRITE = lua("usage_write")


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
    per hour, per-day counts, the busiest IPs and origins, and a marker per flushed batch
    (so a retried flush counts once); and an index of the keys by their last flush. Every
    name comes from :class:`~keystile.redis.schema.RedisSchema` (``usage(key_id, part)``,
    ``usage_index``), which lists each one's type, hash tag and TTL
    (``python -m keystile.redis`` prints them). The addresses a production key has used
    share the prefix but belong to the new-IP alert (:class:`keystile.alerts.RedisAlertState`).
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
        self._cluster = is_cluster(client)

    @translated("writing usage")
    async def write(self, batch: UsageBatch) -> dict[tuple[str, int], list[int]]:
        buckets = batch.buckets
        last = batch.last
        per_key: dict[str, list[int]] = {}
        for key_id, minute in buckets:
            per_key.setdefault(key_id, []).append(minute)
        for key_id in last:
            per_key.setdefault(key_id, [])
        index = self.names.usage_index
        async with self.client.pipeline(transaction=False) as pipe:
            for key_id, minutes in per_key.items():
                keys = [
                    self.names.usage(key_id, f"flush:{batch.id}"),
                    self.names.usage(key_id, "total"),
                    self.names.usage(key_id, "ips"),
                    self.names.usage(key_id, "origins"),
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
                        self.names.usage(key_id, f"h:{minute // 60}"),
                        self.names.usage(key_id, f"d:{minute * MINUTE // DAY}"),
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
                if self._cluster:  # see _one_slot_each
                    _one_slot_each(pipe, _WRITE, keys, args)
                else:
                    await self._script(keys=keys, args=args, client=cast(Any, pipe))
                # GT: a flush of tokens only, or of an older use, never moves a key back.
                pipe.zadd(index, {key_id: at or inactive or 0}, gt=True)
            pipe.expire(index, self.day_retention + DAY)
            replies = await pipe.execute()
        touched: dict[tuple[str, int], list[int]] = {}
        for (key_id, minutes), reply in zip(per_key.items(), replies[0::2], strict=False):
            for i, minute in enumerate(minutes):
                counts = reply[i * NFIELDS : (i + 1) * NFIELDS]
                touched[(key_id, minute)] = [int(v) for v in counts]
        return touched

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
                    pipe.hgetall(self.names.usage(key_id, f"h:{hour}"))
                for raw in await pipe.execute():
                    for field, value in raw.items():
                        minute_text, _, name = _text(field).partition(":")
                        row = rows.setdefault(int(minute_text), [0] * NFIELDS)
                        row[FIELDS.index(name)] += int(value)
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


def _one_slot_each(pipe: Any, script: str, keys: list[str], args: list[Any]) -> None:
    """Queue one script call on a Redis Cluster pipeline. Its names all carry one key's
    hash tag, so the call touches one slot and the pipeline sends it to that slot's node
    (the calls of one node together, the nodes concurrently). A cluster pipeline refuses
    EVALSHA, so it is EVAL: the node keeps the compiled script in its cache, the body is
    sent each time (2.5 kB a key per flush)."""
    pipe.eval(script, len(keys), *keys, *args)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _counts(raw: dict[Any, Any]) -> list[int]:
    counts = [0] * NFIELDS
    for field, value in raw.items():
        name = _text(field)
        if name in FIELDS:
            counts[FIELDS.index(name)] = int(value)
    return counts
