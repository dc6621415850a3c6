"""Reading usage: a key's report and the overview of every key, from a
:class:`~keystile.usage.stores.UsageStore`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

from keystile.clock import Clock, system_clock, to_datetime, to_timestamp
from keystile.usage.models import (
    DAY,
    MINUTE,
    NFIELDS,
    Granularity,
    KeyUsage,
    UsageOverview,
    UsagePoint,
    UsageReport,
    UsageTotals,
)

if TYPE_CHECKING:
    from keystile.usage.stores import UsageStore

__all__ = ["UsageReader"]


class UsageReader:
    """Reads the usage a :class:`~keystile.usage.stores.UsageStore` holds.

    ``top_n`` is how many IPs and origins a report names. ``flush``, when given, runs
    before each read: the gate's manager passes its recorder's, so a report includes what
    this process counted up to now (see :meth:`UsageRecorder.reader
    <keystile.usage.recorder.UsageRecorder.reader>`).
    """

    def __init__(
        self,
        store: UsageStore,
        *,
        clock: Clock = system_clock,
        top_n: int = 100,
        flush: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.store = store
        self.clock = clock
        self.top_n = top_n
        self._flush = flush

    async def overview(self, limit: int = 1000) -> UsageOverview:
        """All-time totals and last use of every key with recorded usage (most recently
        active first, at most ``limit``)."""
        if self._flush is not None:
            await self._flush()
        keys = []
        grand = [0] * NFIELDS
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
        if self._flush is not None:
            await self._flush()
        now = self.clock()
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
        totals = [0] * NFIELDS
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
