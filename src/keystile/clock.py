"""Time, injectable: everything that asks "what time is it?" takes a clock.

A clock is any callable returning Unix seconds as a float. Tests pass a
:class:`ManualClock` and move it forward instead of sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

__all__ = ["Clock", "ManualClock", "system_clock", "to_datetime", "to_timestamp"]

Clock = Callable[[], float]
system_clock: Clock = time.time


class ManualClock:
    """A clock that only moves when told to."""

    __slots__ = ("now",)

    def __init__(self, start: float | datetime = 1_800_000_000.0) -> None:
        self.now = to_timestamp(start) if isinstance(start, datetime) else float(start)

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __repr__(self) -> str:
        return f"ManualClock({to_datetime(self.now).isoformat()})"


def to_datetime(timestamp: float) -> datetime:
    """Unix seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(timestamp, UTC)


def to_timestamp(moment: datetime) -> float:
    """An aware datetime as Unix seconds."""
    if moment.tzinfo is None:
        raise ValueError("naive datetimes are ambiguous; pass an aware datetime")
    return moment.timestamp()
