"""Usage monitoring: what each key does, aggregated in process and flushed in batches.

Per key: requests, bytes in and out, 4xx and 5xx apart, requests refused by the rate
limit or the token quota, AI tokens, attempts with a revoked or expired key, and
when/where it was last used; client keys also per client IP and per origin. Every Redis
name carries a TTL.

- :mod:`~keystile.usage.models` — the report models and the layout of a count row;
- :mod:`~keystile.usage.recorder` — :class:`UsageRecorder`: recording without I/O in a
  bounded buffer, flushed as a :class:`UsageBatch`;
- :mod:`~keystile.usage.stores` — the :class:`UsageStore` protocol, the memory and the
  Redis store;
- :mod:`~keystile.usage.reports` — :class:`UsageReader`: a key's report, the overview.
"""

from __future__ import annotations

from keystile.usage.models import (
    BY_CLIENT,
    BYTES_IN,
    BYTES_OUT,
    DAY,
    ERRORS_4XX,
    ERRORS_5XX,
    FIELDS,
    INACTIVE,
    MINUTE,
    QUOTA_EXCEEDED,
    RATE_LIMITED,
    REQUESTS,
    TOKENS,
    WATCH_IPS,
    Granularity,
    KeyUsage,
    LastUse,
    UsageOverview,
    UsagePoint,
    UsageReport,
    UsageTotals,
    tracked,
)
from keystile.usage.recorder import UsageBatch, UsageRecorder
from keystile.usage.reports import UsageReader
from keystile.usage.stores import MemoryUsageStore, RedisUsageStore, UsageStore

__all__ = [
    "BYTES_IN",
    "BYTES_OUT",
    "BY_CLIENT",
    "DAY",
    "ERRORS_4XX",
    "ERRORS_5XX",
    "FIELDS",
    "INACTIVE",
    "MINUTE",
    "QUOTA_EXCEEDED",
    "RATE_LIMITED",
    "REQUESTS",
    "TOKENS",
    "WATCH_IPS",
    "Granularity",
    "KeyUsage",
    "LastUse",
    "MemoryUsageStore",
    "RedisUsageStore",
    "UsageBatch",
    "UsageOverview",
    "UsagePoint",
    "UsageReader",
    "UsageRecorder",
    "UsageReport",
    "UsageStore",
    "UsageTotals",
    "tracked",
]
