"""The usage reports (pydantic models) and the layout of the rows usage is counted in.

A count row holds the :data:`FIELDS` counters (indexed by :data:`REQUESTS` ...
:data:`INACTIVE`), then, in a recorder's buffer, the last use seen in that minute and the
last inactive attempt (:data:`AT` ... :data:`INACTIVE_AT`); a buffer keeps a minute's rows
as columns (:class:`Table`). The stores keep the counters only.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from keystile.addresses import BY_CLIENT, WATCH_IPS
from keystile.clock import to_datetime

__all__ = [
    "BY_CLIENT",
    "DAY",
    "FIELDS",
    "MINUTE",
    "WATCH_IPS",
    "Granularity",
    "KeyUsage",
    "LastUse",
    "UsageOverview",
    "UsagePoint",
    "UsageReport",
    "UsageTotals",
]

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
NFIELDS = len(FIELDS)
MINUTE = 60
DAY = 86_400
Granularity = Literal["minute", "day"]

# A buffered row: the FIELDS counters, then the last use seen in that minute (its time,
# address and origin), then the last inactive attempt's time; ROW_WIDTH values in all, in
# that order.
AT, IP, ORIGIN, INACTIVE_AT = range(NFIELDS, NFIELDS + 4)
ROW_WIDTH = NFIELDS + 4
MAX_SEEN = 64  # addresses a buffer notes per watched key between two flushes
# The most one call may count (tokens, a request's bytes recorded by hand): whatever a
# minute adds up stays within the 64 bits a flush sends a count in (2**63 needs 2**27
# such calls for one key in one minute).
MAX_COUNT = 2**36


def check_tokens(tokens: int) -> None:
    """Raise ValueError unless ``tokens`` is an integer from 0 to :data:`MAX_COUNT`."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 0 <= tokens <= MAX_COUNT:
        raise ValueError(f"tokens must be an integer from 0 to {MAX_COUNT}")


Row = tuple[Any, ...]  # a row read out of a Table: its ROW_WIDTH values
_FIRST = 1  # rows a table's columns hold at first; then they double when full


class Table(Mapping[str, Row]):
    """A minute's rows in a recorder's buffer, one per key, kept as ``ROW_WIDTH`` columns
    (lists): a key's row is its index (:attr:`index`) in each. Read as a mapping, key id
    -> the row's values (a tuple, made when read).

    Columns, not an object per row: at thousands of keys a request's row is far from the
    CPU's caches, and a row of its own was several cache lines away (the object, its
    table, its values); a column holds a value of each key side by side, so adding up
    touches a slot of each column a request counts in. The columns hold plain values
    only (the collector tracks the 13 lists, not what is in them), and double when full:
    a table's memory follows its rows, whatever the minutes held."""

    __slots__ = ("columns", "index")

    def __init__(self) -> None:
        self.index: dict[str, int] = {}  # key id -> its row
        self.columns: list[list[Any]] = [[] for _ in range(ROW_WIDTH)]

    def add(self, key_id: str) -> int:
        """A new (empty) row for ``key_id``; its index."""
        at = len(self.index)
        columns = self.columns
        if at == len(columns[0]):  # full: doubled (not grown a row at a time)
            more = max(at, _FIRST)
            for field, column in enumerate(columns):
                column.extend(itertools.repeat(0 if field < NFIELDS else None, more))
        self.index[key_id] = at
        return at

    def hot(self) -> tuple[Any, ...]:
        """What adding up a request reads: the rows' index (its ``get``), the columns, and
        those every request touches (requests, bytes out, last used at, ip, origin)."""
        columns = self.columns
        return (
            self.index.get,
            columns,
            columns[REQUESTS],
            columns[BYTES_OUT],
            columns[AT],
            columns[IP],
            columns[ORIGIN],
        )

    def flat(self, start: int, stop: int) -> list[Any]:
        """Rows ``start`` to ``stop`` (index order): their values column after column (each
        counter of every row, ..., each last inactive attempt), as a flush sends them."""
        stop = min(stop, len(self.index))  # (the columns run on past the last row)
        return list(itertools.chain.from_iterable(c[start:stop] for c in self.columns))

    def __getitem__(self, key_id: str) -> Row:
        at = self.index[key_id]
        return tuple(column[at] for column in self.columns)

    def __iter__(self) -> Iterator[str]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key_id: object) -> bool:
        return key_id in self.index


def counters(row: Row) -> tuple[int, ...]:
    """A row's :data:`FIELDS` counters."""
    return row[:NFIELDS]


def tracked(top_n: int) -> int:
    """How many IPs or origins per client key a buffer or store keeps counting, for
    reports of the busiest ``top_n``."""
    return max(10 * top_n, 1_000)


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
    def sum(cls, totals: Iterable[UsageTotals]) -> UsageTotals:
        """The field-by-field sum of ``totals``."""
        fields = list(cls.model_fields)
        summed = dict.fromkeys(fields, 0)
        for one in totals:
            for name in fields:
                summed[name] += getattr(one, name)
        return cls(**summed)

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

    @classmethod
    def of(cls, raw: Sequence[Any] | None) -> LastUse:
        """From ``[at, ip, origin, inactive attempt at]`` as a store keeps them."""
        if raw is None:
            return cls()
        at, ip, origin, inactive = raw
        return cls(
            at=None if at is None else to_datetime(float(at)),
            ip=ip or None,
            origin=origin or None,
            inactive_attempt_at=None if inactive is None else to_datetime(float(inactive)),
        )


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
    name: str | None = None  # the key's name, filled in by the manager's overview
    totals: UsageTotals
    last_use: LastUse


class UsageOverview(BaseModel):
    """Every key with recorded usage (the most recently active first, at most ``limit``)."""

    model_config = ConfigDict(frozen=True)

    keys: list[KeyUsage]
    totals: UsageTotals
