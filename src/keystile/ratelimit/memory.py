"""Moving windows in this process: :class:`MemoryLimiter`, which keeps each window's
admissions as runs of one timestamp (:class:`_Log`).

It decides as ``limits``' moving-window algorithm does, to the letter: a window keeps the
timestamps of its last ``amount`` admissions, newest first, and refuses a request of cost
``c`` when the entry at index ``amount - c`` is still inside the window
(``entry >= now - window``). ``limits``' own ``MemoryStorage`` reads the wall clock itself
and expires entries from a timer thread, so it cannot take a clock; this limiter does.
"""

from __future__ import annotations

import bisect
from array import array
from collections import OrderedDict

from keystile.clock import Clock, system_clock
from keystile.ratelimit.base import check_cost, retry_after, whole_seconds
from keystile.rates import Decision, LimitSet

__all__ = ["MemoryLimiter"]


class _Log:
    """The admissions of one window, oldest first, as runs of one timestamp:
    ``stamps[i]`` was admitted ``ends[i] - ends[i - 1]`` times (``ends`` numbers every
    admission the window ever made). The runs before ``head`` are gone, and so are the
    admissions numbered up to ``dropped`` (the run at ``head`` may have lost its oldest).

    Each operation is an append or a bisection, O(log n) in the runs held (dropped runs are
    compacted away when they are half the list: amortised O(1)); a cost of ``c`` is one run,
    not ``c`` entries. The runs held are at most the admissions still held, which are at most
    the window's amount — and none once they have all left the window: 16 bytes a run."""

    __slots__ = ("dropped", "ends", "head", "stamps", "total")

    def __init__(self) -> None:
        self.stamps = array("d")  # 8 bytes a run each: no float or int objects held
        self.ends = array("q")
        self.head = 0
        self.dropped = 0
        self.total = 0

    def __len__(self) -> int:
        """Admissions held."""
        return self.total - self.dropped

    @property
    def runs(self) -> int:
        """Runs held (what the log's memory grows with)."""
        return len(self.stamps) - self.head

    @property
    def newest(self) -> float | None:
        return self.stamps[-1] if self.total > self.dropped else None

    def at(self, index: int) -> float | None:
        """The entry ``index`` places from the newest (0), or ``None`` past the oldest."""
        number = self.total - index
        if number <= self.dropped:
            return None
        return self.stamps[bisect.bisect_left(self.ends, number, self.head)]

    def push(self, now: float, cost: int) -> None:
        """``cost`` admissions at ``now``."""
        self.total += cost
        if self.total - cost > self.dropped and self.stamps[-1] == now:
            self.ends[-1] = self.total
        else:
            self.stamps.append(now)
            self.ends.append(self.total)

    def keep(self, amount: int) -> None:
        """Drop all but the newest ``amount`` admissions."""
        if self.total - self.dropped > amount:
            self._drop(self.total - amount)

    def inside(self, since: float) -> tuple[int, float]:
        """How many admissions are at ``since`` or later, and the oldest of them (``-1``:
        none). The older ones can never refuse again (time only moves on): dropped."""
        first = bisect.bisect_left(self.stamps, since, self.head)
        if first > self.head:
            self._drop(max(self.dropped, self.ends[first - 1]))
        count = self.total - self.dropped
        return count, self.stamps[self.head] if count else -1.0

    def _drop(self, number: int) -> None:
        """Drop the admissions numbered up to ``number``."""
        self.dropped = number
        self.head = bisect.bisect_right(self.ends, number, self.head)
        if self.head and 2 * self.head >= len(self.stamps):
            del self.stamps[: self.head]
            del self.ends[: self.head]
            self.head = 0


class MemoryLimiter:
    """Moving windows in this process. Bounded: at most ``max_keys`` windows are kept. When
    full, windows whose entries have all left go first (looked for at most once per
    ``max_keys / 10`` new windows); otherwise the least recently used one (which can then
    admit again early: size ``max_keys`` for the keys active within the longest window).

    A decision costs O(log n) in the admissions a window holds, whatever its limit or the
    request's cost, and a window holds one run per distinct admission time still inside
    it (see :class:`_Log`)."""

    def __init__(self, *, clock: Clock = system_clock, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # (key, address or "", window index) -> its admissions, at most `amount` of them.
        self._events: OrderedDict[tuple[str, str, int], _Log] = OrderedDict()
        self._spans: dict[tuple[str, str, int], int] = {}  # the same keys -> window seconds
        self.evictions = 0  # how often the table was scanned to make room (tests count it)
        self._scan_every = max(1, max_keys // 10)
        self._overflows = self._scan_every  # the first overflow scans

    async def hit(
        self, key: str, limits: LimitSet, cost: int = 1, *, address: str = ""
    ) -> Decision:
        return self.hit_now(key, limits, cost, address=address)

    def hit_now(self, key: str, limits: LimitSet, cost: int = 1, *, address: str = "") -> Decision:
        """:meth:`hit` without the coroutine: no I/O happens here."""
        check_cost(cost)
        now = self._clock()
        windows = limits.windows
        names = [(key, address if w.per_address else "", i) for i, w in enumerate(windows)]
        logs = [self._events.get(name) or _Log() for name in names]
        wait = 0.0
        refused_by: list[str] = []
        for window, log in zip(windows, logs, strict=True):
            if cost > window.amount:
                refused_by.append(window.name)
                wait = max(wait, float(window.seconds))
                continue
            entry = log.at(window.amount - cost)
            if entry is not None and entry >= now - window.seconds:
                refused_by.append(window.name)
                wait = max(wait, entry + window.seconds - now)
        allowed = not refused_by
        if allowed:
            for name, window, log in zip(names, windows, logs, strict=True):
                log.push(now, cost)
                log.keep(window.amount)
                self._events[name] = log
                self._events.move_to_end(name)
                self._spans[name] = window.seconds
            if len(self._events) > self._max_keys:
                self._evict(now)
        remaining, reset = [], []
        for window, log in zip(windows, logs, strict=True):
            count, oldest = log.inside(now - window.seconds)
            remaining.append(window.amount - count)
            reset.append(whole_seconds(oldest + window.seconds - now if count else window.seconds))
        retry = 0 if allowed else retry_after(wait)
        return Decision(
            allowed, tuple(remaining), tuple(reset), retry, at=now, refused_by=tuple(refused_by)
        )

    def _evict(self, now: float) -> None:
        """Make room: scan for windows whose entries have all left (O(n)) at most once per
        ``max_keys / 10`` overflows, and otherwise drop the least recently used window
        (O(1)); so a flood of made-up keys costs O(1) per admission, amortised."""
        if self._overflows >= self._scan_every:
            self._overflows = 0
            self.evictions += 1
            spans = self._spans
            idle = [
                k
                for k, log in self._events.items()
                if (newest := log.newest) is None or newest < now - spans[k]
            ]
            for name in idle:
                del self._events[name]
                del spans[name]
        self._overflows += 1
        while len(self._events) > self._max_keys:
            name, _ = self._events.popitem(last=False)
            del self._spans[name]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._events.clear()
        self._spans.clear()
