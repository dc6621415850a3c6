"""Rate limits over exact moving (sliding-log) windows — the only module that imports
:mod:`limits`.

Limits are written the way :mod:`limits` writes them (``"100/minute"``,
``"10/second;1000/hour"``) and parsed by it. A request is admitted only when *every*
window of its key admits it, and a refused request consumes nothing (SPEC §4). A request
costs 1 by default and at most :data:`MAX_COST` (20,000): a window keeps one timestamp per
unit, and in Redis one script pushes them all while Redis waits (about 10 ms for 20,000);
a cost outside 1–20,000 is a ``ValueError``, with either limiter.

The decision follows ``limits``' moving-window algorithm to the letter: a window keeps
the timestamps of its last ``amount`` admissions, newest first, and refuses a request of
cost ``c`` when the entry at index ``amount - c`` is still inside the window
(``entry >= now - window``). ``tests/test_ratelimit.py`` drives this module and ``limits``'
own ``MovingWindowRateLimiter`` with the same random schedules and compares every decision.

Two limiters keep that contract:

- :class:`MemoryLimiter` — one process; takes an injectable clock. (``limits``' own
  ``MemoryStorage`` reads the wall clock itself and expires entries from a timer thread,
  so it cannot take one.)
- :class:`RedisLimiter` — any number of processes sharing one Redis: one Lua script
  decides every window of a key atomically on Redis' own clock (``TIME``), and returns the
  decision with the numbers for the headers in the same round trip. Requests that arrive
  together share one pipeline; a key known to be over its limit is refused locally until
  its next slot frees, without asking Redis (which can only refuse more, never admit more).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import math
import re
import time
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import limits
from limits import RateLimitItem
from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from keystile.clock import Clock, system_clock
from keystile.exceptions import StoreUnavailable
from keystile.fallback import FailureMode, Fallback, FallingBack, redis_address
from keystile.redis.connect import lean_connection
from keystile.redis.lean import ReplyError, encode

__all__ = [
    "Decision",
    "LimitSet",
    "Limiter",
    "MemoryLimiter",
    "RedisLimiter",
    "limit_set",
    "normalize_rate_limit",
    "parse_rate_limit",
]

logger = logging.getLogger("keystile.ratelimit")

_MAX_LIMIT_TEXT = 256
# "1/0 second": limits reads a zero multiple as one; a window of no time is a mistake.
_ZERO_WINDOW = re.compile(r"(?:/|per)\s*0+\s*[a-z]", re.IGNORECASE)
MAX_AMOUNT = 10_000_000
MAX_WINDOW = 366 * 86_400
MAX_COST = 20_000  # units one request may cost (one timestamp each)


def parse_rate_limit(text: str) -> list[RateLimitItem]:
    """Parse one or several limits; ``ValueError`` with a clear message when malformed."""
    if not isinstance(text, str) or not text.strip() or len(text) > _MAX_LIMIT_TEXT:
        raise ValueError(f"{text!r} is not a rate limit such as '100/minute'")
    try:
        items = limits.parse_many(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a rate limit such as '100/minute' or '10/second;1000/hour'"
        ) from None
    if _ZERO_WINDOW.search(text):
        raise ValueError(f"{text!r} is not a rate limit: a window is at least one unit long")
    for item in items:
        if item.amount < 1:
            raise ValueError(f"{text!r}: a limit must admit at least one request")
        # A moving window keeps one timestamp per admission: bound what one key may hold.
        if item.amount > MAX_AMOUNT:
            raise ValueError(f"{text!r}: at most {MAX_AMOUNT:,} requests per window")
        if item.get_expiry() > MAX_WINDOW:
            raise ValueError(f"{text!r}: a window is at most a year long")
    return items


def normalize_rate_limit(text: str) -> str:
    """The canonical spelling of a limit string: ``"10/second;1000/hour"``."""
    return ";".join(_spell(item) for item in parse_rate_limit(text))


def _spell(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    if item.multiples == 1:
        return f"{item.amount}/{unit}"
    return f"{item.amount}/{item.multiples} {unit}s"


@dataclass(frozen=True, slots=True)
class Window:
    """``amount`` requests per ``seconds``, and the name of its header policy;
    ``per_address``: counted for each client address apart, not for the whole key."""

    amount: int
    seconds: int
    name: str
    per_address: bool = False


@dataclass(frozen=True, slots=True)
class LimitSet:
    """The windows of one limit string, with its ``RateLimit-Policy`` header value."""

    text: str
    windows: tuple[Window, ...]
    policy_header: bytes
    per_address: bool = False  # whether a window counts each client address apart


def _windows(text: str | None, name: str, per_address: bool) -> tuple[Window, ...]:
    items = parse_rate_limit(text) if text else []
    return tuple(
        Window(item.amount, item.get_expiry(), name if i == 0 else f"{name}-{i + 1}", per_address)
        for i, item in enumerate(items)
    )


@lru_cache(maxsize=4096)
def limit_set(text: str | None, name: str, per_address: str | None = None) -> LimitSet:
    """The parsed windows of ``text`` (the key's), then those of ``per_address`` (each
    client address's share); ``name`` (e.g. the key type) names their policies: ``"client"``
    and ``"client-ip"``. A request is admitted only when every window admits it.

    The name goes into response headers, so it must never carry key material.
    """
    windows = _windows(text, name, False) + _windows(per_address, f"{name}-ip", True)
    if not windows:
        raise ValueError("a limit set needs a limit for the key or for its client addresses")
    # draft-ietf-httpapi-ratelimit-headers: a structured-field List of policy items.
    policy = ", ".join(f'"{w.name}";q={w.amount};w={w.seconds}' for w in windows)
    spelt = text or ""
    if per_address:
        spelt += f"|{per_address}"  # tells the sets apart in the limiters' caches
    return LimitSet(spelt, windows, policy.encode("ascii"), per_address is not None)


@dataclass(frozen=True, slots=True)
class Decision:
    """A limiter's answer, with what the headers need, per window of the limit set."""

    allowed: bool
    remaining: tuple[int, ...]
    reset: tuple[int, ...]  # whole seconds until a slot of that window frees (``t``)
    retry_after: int = 0  # whole seconds until the request could be admitted (refused only)
    degraded: bool = False  # admitted because the limiter could not be asked
    at: float = 0.0  # when it was decided, on the limiter's clock (Unix seconds)
    refused_by: tuple[str, ...] = ()  # the policies (window names) that refused

    def headers(self, limits: LimitSet) -> list[tuple[bytes, bytes]]:
        """``RateLimit-Policy`` and ``RateLimit`` (and ``Retry-After`` when refused); none
        for a request admitted undecided (the limiter could not be asked: nothing is known)."""
        if self.degraded:
            return []
        items = ", ".join(
            f'"{w.name}";r={r};t={t}'
            for w, r, t in zip(limits.windows, self.remaining, self.reset, strict=True)
        )
        headers = [(b"ratelimit-policy", limits.policy_header), (b"ratelimit", items.encode())]
        if not self.allowed:
            headers.append((b"retry-after", str(self.retry_after).encode()))
            headers.append((b"cache-control", b"no-store"))
        return headers

    def legacy_headers(self, limits: LimitSet) -> list[tuple[bytes, bytes]]:
        """``X-RateLimit-Limit/Remaining/Reset`` for the tightest window (Reset in
        seconds from now)."""
        if self.degraded:
            return []
        i = min(range(len(self.remaining)), key=self.remaining.__getitem__)
        return [
            (b"x-ratelimit-limit", str(limits.windows[i].amount).encode()),
            (b"x-ratelimit-remaining", str(self.remaining[i]).encode()),
            (b"x-ratelimit-reset", str(self.reset[i]).encode()),
        ]


def _check_cost(cost: int) -> None:
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= MAX_COST:
        raise ValueError(f"a request costs a whole number from 1 to {MAX_COST:,}, not {cost!r}")


def _seconds(value: float) -> int:
    return max(0, math.ceil(value - 1e-9))


def _retry_after(wait: float) -> int:
    # A window refuses while its entry is >= now - window: at exactly `wait` seconds it
    # still refuses, so a whole-second answer must be strictly later — and a refusal never
    # says "retry after 0" (a local refusal can come within a millisecond of the release).
    return max(1, math.floor(wait) + 1)


class Limiter(Protocol):
    """Decides whether a key may make a request now."""

    async def hit(
        self, key: str, limits: LimitSet, cost: int = 1, *, address: str = ""
    ) -> Decision:
        """Admit (and count) or refuse (and count nothing) ``cost`` units for ``key``, and
        for ``address`` in the windows that count each client address apart
        (``ValueError`` unless 1 <= ``cost`` <= :data:`MAX_COST`)."""

    async def start(self) -> None:
        """Prepare (e.g. load scripts) so the first request pays nothing extra."""

    async def close(self) -> None:
        """Release resources. Idempotent."""


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
    full, windows whose entries have all left go first; only if none has, the least
    recently used one (which can then admit again early: size ``max_keys`` for the keys
    active within the longest window).

    A decision costs O(log n) in the admissions a window holds, whatever its limit or the
    request's cost, and a window holds one run per distinct admission time still inside
    it (see :class:`_Log`)."""

    def __init__(self, *, clock: Clock = system_clock, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._max_keys = max_keys
        # (key, address or "", window index) -> its admissions, at most `amount` of them.
        self._events: OrderedDict[tuple[str, str, int], _Log] = OrderedDict()
        self._spans: dict[tuple[str, str, int], int] = {}  # the same keys -> window seconds

    async def hit(
        self, key: str, limits: LimitSet, cost: int = 1, *, address: str = ""
    ) -> Decision:
        return self.hit_now(key, limits, cost, address=address)

    def hit_now(self, key: str, limits: LimitSet, cost: int = 1, *, address: str = "") -> Decision:
        """:meth:`hit` without the coroutine: no I/O happens here."""
        _check_cost(cost)
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
            reset.append(_seconds(oldest + window.seconds - now if count else window.seconds))
        retry = 0 if allowed else _retry_after(wait)
        return Decision(
            allowed, tuple(remaining), tuple(reset), retry, at=now, refused_by=tuple(refused_by)
        )

    def _evict(self, now: float) -> None:
        spans = self._spans
        idle = [
            k
            for k, log in self._events.items()
            if (newest := log.newest) is None or newest < now - spans[k]
        ]
        for name in idle:
            del self._events[name]
            del spans[name]
        while len(self._events) > self._max_keys:
            name, _ = self._events.popitem(last=False)
            del spans[name]

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._events.clear()
        self._spans.clear()


# KEYS: one list per window of the key, newest admission first (hash-tagged by key id).
# ARGV: cost, now in ms ('' = Redis' own clock), then amount and window ms per window.
# Returns, as one space-separated string (one reply line to parse): allowed (1/0), now ms,
# then per window: entries inside the window after the decision, the oldest of them
# (-1: none), the entry that refused (-1: none).
# Times are whole milliseconds: 13 digits, exact in Lua's doubles until the year 2286.
_SCRIPT = """
local cost = tonumber(ARGV[1])
local now
if ARGV[2] ~= '' then
  now = tonumber(ARGV[2])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local n = #KEYS
local allowed = 1
local refused_by = {}
for i = 1, n do
  local amount = tonumber(ARGV[1 + 2 * i])
  local window = tonumber(ARGV[2 + 2 * i])
  refused_by[i] = -1
  if cost > amount then
    allowed = 0
    refused_by[i] = now
  else
    local entry = redis.call('LINDEX', KEYS[i], amount - cost)
    if entry and tonumber(entry) >= now - window then
      allowed = 0
      refused_by[i] = tonumber(entry)
    end
  end
end
if allowed == 1 then
  -- Lua's stack takes fewer than 8,000 results from one unpack(): push in chunks.
  local stamps = {}
  for j = 1, math.min(cost, 1000) do stamps[j] = now end
  for i = 1, n do
    local amount = tonumber(ARGV[1 + 2 * i])
    for pushed = 0, cost - 1, 1000 do
      redis.call('LPUSH', KEYS[i], unpack(stamps, 1, math.min(1000, cost - pushed)))
    end
    redis.call('LTRIM', KEYS[i], 0, amount - 1)
    redis.call('PEXPIRE', KEYS[i], tonumber(ARGV[2 + 2 * i]))
  end
end
local out = {allowed, now}
for i = 1, n do
  local window = tonumber(ARGV[2 + 2 * i])
  local length = redis.call('LLEN', KEYS[i])
  local last, oldest = -1, -1
  if length > 0 then
    local tail = tonumber(redis.call('LINDEX', KEYS[i], -1))
    if tail >= now - window then
      last, oldest = length - 1, tail  -- the usual case: every entry is inside the window
    else
      local low, high = 0, length - 1
      while low <= high do
        local mid = math.floor((low + high) / 2)
        local value = tonumber(redis.call('LINDEX', KEYS[i], mid))
        if value >= now - window then
          last, oldest, low = mid, value, mid + 1
        else
          high = mid - 1
        end
      end
      -- Entries past the window can never refuse again (time only moves on): drop them.
      if last < 0 then
        redis.call('DEL', KEYS[i])
      else
        redis.call('LTRIM', KEYS[i], 0, last)
      end
    end
  end
  out[#out + 1] = last + 1
  out[#out + 1] = oldest
  out[#out + 1] = refused_by[i]
end
return table.concat(out, ' ')
"""
# What SCRIPT LOAD answers for it: the lean path's EVALSHA commands are built with it.
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()


def _read_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class _Pending:
    __slots__ = ("args", "future", "keys")

    def __init__(
        self, keys: list[str], args: list[Any], future: asyncio.Future[Any] | None
    ) -> None:
        self.keys = keys
        self.args = args
        self.future = future


class RedisLimiter(FallingBack):
    """Moving windows in Redis, exact across every process sharing it.

    ``failure`` says what happens when Redis cannot answer within ``timeout`` seconds:
    ``"allow"`` (the default) admits the request, counts it in :attr:`passes` and logs at
    most once per ``log_interval``; ``"deny"`` refuses it (the middleware answers 503).

    After ``trip_after`` failed decisions in a row, the limiter backs off: for
    ``backoff[0]`` seconds every decision follows ``failure`` at once, without waiting on
    Redis; then one request tries Redis again while the others keep skipping it. Each try
    that fails doubles the wait, up to ``backoff[1]``; the first answer from Redis ends it.
    An outage then costs each request no wait, and a struggling Redis no pile of commands;
    decisions skipped meanwhile are not counted in Redis' windows. (Both are
    :attr:`fallback`'s, a :class:`keystile.fallback.Fallback`, shared with token quotas.)

    With ``lean=True`` (the default) the decisions go over one connection of the
    limiter's own (:class:`keystile.redis.lean.LeanRedis`, to the server ``client`` talks to),
    which costs a fraction of redis-py's Python per round trip; ``client`` carries them
    when it cannot (TLS, a credential provider, fakeredis) or with ``lean=False``.
    """

    def __init__(
        self,
        client: Redis,
        *,
        namespace: str = "keystile",
        timeout: float = 0.25,
        failure: FailureMode = "allow",
        log_interval: float = 60.0,
        local_refusals: bool = True,
        lean: bool = True,
        trip_after: int = 3,
        backoff: tuple[float, float] = (0.05, 1.0),
    ) -> None:
        self.fallback = Fallback(
            "rate limiter",
            logger,
            failure=failure,
            log_interval=log_interval,
            trip_after=trip_after,
            backoff=backoff,
            where=redis_address(client),
        )
        self.client = client
        self.namespace = namespace
        self.timeout = timeout
        self.local_refusals = local_refusals
        self.sha = ""  # set once the script is loaded
        self._round_trips = 0  # over `client`
        self._lean = lean_connection(client, timeout=timeout) if lean else None
        # (key, address, limit text, cost) -> the encoded EVALSHA of a decision on Redis' clock
        self._commands: dict[tuple[str, str, str, int], bytes] = {}
        self._loading: asyncio.Task[None] | None = None
        # (key, address, limit text) -> (refused until, monotonic; the decision; when; its cost)
        self._blocked: dict[tuple[str, str, str], tuple[float, Decision, float, int]] = {}
        self._pending: list[_Pending] = []
        self._flushing = False
        self._in_flight = 0  # round trips under way

    def window_key(self, key: str, limits: LimitSet, index: int, address: str = "") -> str:
        """The Redis list of one window; an address's share lives beside the key's, under
        the key's hash tag, so one script decides both."""
        window = limits.windows[index]
        span = f"{window.amount}/{window.seconds}"
        if window.per_address:
            return f"{self.namespace}:rl:{{{key}}}:ip:{address}:{span}"
        return f"{self.namespace}:rl:{{{key}}}:{span}"

    @property
    def round_trips(self) -> int:
        """Round trips to Redis so far (commands sent together count once)."""
        lean = self._lean
        return self._round_trips + (lean.writes if lean is not None else 0)

    @property
    def lean(self) -> bool:
        """Whether decisions go over the limiter's own lean connection."""
        return self._lean is not None

    async def start(self) -> None:
        """Load the script, so no request pays for a NOSCRIPT retry (and, on the lean
        path, connect)."""
        if self._lean is not None:
            loaded = await self._lean.execute("SCRIPT", "LOAD", _SCRIPT)
            if isinstance(loaded, ReplyError):
                raise StoreUnavailable(f"Redis refused the rate-limit script: {loaded.code}")
            if loaded != _SHA.encode():  # the EVALSHA commands are built with _SHA
                raise StoreUnavailable("Redis loaded the rate-limit script under another sha")
            self.sha = _SHA
        else:
            self._round_trips += 1
            self.sha = await self.client.script_load(_SCRIPT)

    async def close(self) -> None:
        self._blocked.clear()
        loading, self._loading = self._loading, None
        if loading is not None and not loading.done():
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                loading.cancel()
        if self._lean is not None:
            await self._lean.aclose()

    async def hit(
        self, key: str, limits: LimitSet, cost: int = 1, *, address: str = ""
    ) -> Decision:
        return await self.hit_at(key, limits, cost, None, address=address)

    async def hit_at(
        self,
        key: str,
        limits: LimitSet,
        cost: int = 1,
        now_ms: int | None = None,
        *,
        address: str = "",
    ) -> Decision:
        """:meth:`hit` on a given Redis-side clock (for tests); ``None`` is Redis' own."""
        _check_cost(cost)
        if not limits.per_address:
            address = ""  # one entry per key in the caches below, whoever calls
        blocked_as = (key, address, limits.text)
        if self.local_refusals and now_ms is None:
            blocked = self._blocked.get(blocked_as)
            if blocked is not None:
                until, refused, decided, refused_cost = blocked
                clock = time.monotonic()
                left = until - clock
                if left > 0 and cost >= refused_cost:
                    # Still over the limit: no slot can have freed yet. No round trip.
                    elapsed = clock - decided
                    frees = tuple(_seconds(t - elapsed) for t in refused.reset)
                    retry = _retry_after(left - 0.001)
                    return Decision(
                        False, refused.remaining, frees, retry, refused_by=refused.refused_by
                    )
                if left <= 0:
                    del self._blocked[blocked_as]
        decide = self._pooled_decide if self._lean is None else self._lean_decide
        raw = await self.fallback.ask(decide, key, limits, cost, now_ms, address)
        if raw is None:  # undecided, and the failure mode is "allow"
            full = tuple(w.amount for w in limits.windows)
            return Decision(True, full, tuple(w.seconds for w in limits.windows), degraded=True)
        raw = raw.split() if isinstance(raw, (bytes, str)) else raw
        decision = self._decide(raw, limits)
        if not decision.allowed and self.local_refusals and now_ms is None:
            # Nothing can free a slot before the refusing entry leaves its window.
            if len(self._blocked) >= 100_000:  # bounded: forget the ones already free
                now = time.monotonic()
                self._blocked = {k: v for k, v in self._blocked.items() if v[0] > now}
            clock = time.monotonic()
            until = clock + self._wait_ms(raw, limits) / 1000
            self._blocked[blocked_as] = (until, decision, clock, cost)
        return decision

    def _arguments(
        self, key: str, limits: LimitSet, cost: int, now_ms: int | None, address: str
    ) -> tuple[list[str], list[Any]]:
        keys = [self.window_key(key, limits, i, address) for i in range(len(limits.windows))]
        args: list[Any] = [cost, "" if now_ms is None else now_ms]
        for window in limits.windows:
            args += [window.amount, window.seconds * 1000]
        return keys, args

    async def _pooled_decide(
        self, key: str, limits: LimitSet, cost: int, now_ms: int | None, address: str
    ) -> Any:
        """One EVALSHA (or a share of a pipeline) over ``client``, within ``timeout``."""
        keys, args = self._arguments(key, limits, cost, now_ms, address)
        async with asyncio.timeout(self.timeout):
            return await self._submit(keys, args)

    async def _lean_decide(
        self, key: str, limits: LimitSet, cost: int, now_ms: int | None, address: str
    ) -> Any:
        """One EVALSHA over the lean connection (after loading the script on NOSCRIPT),
        all within one ``timeout``."""
        lean = self._lean
        if lean is None:  # only chosen when there is one (hit_at)
            raise RuntimeError("the rate limiter has no lean connection")
        cached = (key, address, limits.text, cost)
        command = self._commands.get(cached) if now_ms is None else None
        if command is None:
            command = self._command(cached, limits, now_ms)
        deadline = lean.deadline()
        if self.sha:
            reply = await lean.call(command, deadline)
            if type(reply) is not ReplyError:
                return reply
            if reply.code != "NOSCRIPT":
                raise StoreUnavailable(f"Redis refused the rate-limit script: {reply.code}")
        # The script is not loaded (yet, or any more: SCRIPT FLUSH, a restarted server).
        await self._load(deadline)
        reply = await lean.call(command, deadline)
        if type(reply) is ReplyError:
            raise StoreUnavailable(f"Redis refused the rate-limit script: {reply.code}")
        return reply

    def _command(
        self, cached: tuple[str, str, str, int], limits: LimitSet, now_ms: int | None
    ) -> bytes:
        key, address, _, cost = cached
        keys, args = self._arguments(key, limits, cost, now_ms, address)
        command = encode(["EVALSHA", _SHA, len(keys), *keys, *args])
        if now_ms is None:
            if len(self._commands) >= 10_000:  # bounded: start again
                self._commands.clear()
            self._commands[cached] = command
        return command

    async def _load(self, deadline: float) -> None:
        """SCRIPT LOAD, once for all the callers that found it missing together."""
        loop = asyncio.get_running_loop()
        loading = self._loading
        if loading is None or loading.done() or loading.get_loop() is not loop:
            loading = self._loading = loop.create_task(self._load_once())
            loading.add_done_callback(_read_error)  # read even if every caller gave up
        await asyncio.wait({loading}, timeout=max(0.0, deadline - loop.time()))
        if not loading.done():
            raise TimeoutError("Redis did not load the rate-limit script in time")
        if loading.cancelled():  # the limiter was closed meanwhile
            raise ConnectionError("the rate limiter was closed")
        loading.result()

    async def _load_once(self) -> None:
        self.sha = ""
        await self.start()

    @staticmethod
    def _wait_ms(raw: list[Any], limits: LimitSet) -> int:
        """Milliseconds from now until every refusing entry has left its window (it still
        counts at exactly `window` old, so one more millisecond)."""
        now = int(raw[1])
        wait = 0
        for i, window in enumerate(limits.windows):
            refused_by = int(raw[4 + 3 * i])
            if refused_by >= 0:
                wait = max(wait, refused_by + window.seconds * 1000 + 1 - now)
        return wait

    def _decide(self, raw: list[Any], limits: LimitSet) -> Decision:
        allowed = int(raw[0]) == 1
        now = int(raw[1])
        remaining, reset = [], []
        for i, window in enumerate(limits.windows):
            count, oldest = int(raw[2 + 3 * i]), int(raw[3 + 3 * i])
            remaining.append(window.amount - count)
            span = (oldest + window.seconds * 1000 - now) / 1000 if oldest >= 0 else window.seconds
            reset.append(_seconds(span))
        # Whole milliseconds: Retry-After is the first whole second strictly after the
        # refusing entry's last refusing millisecond (no float rounding near integers).
        retry = 0 if allowed else (self._wait_ms(raw, limits) - 1) // 1000 + 1
        refused_by = tuple(
            w.name for i, w in enumerate(limits.windows) if int(raw[4 + 3 * i]) >= 0
        )
        return Decision(
            allowed, tuple(remaining), tuple(reset), retry, at=now / 1000, refused_by=refused_by
        )

    # -- one round trip for every request that arrives together ------------------------------

    async def _submit(self, keys: list[str], args: list[Any]) -> Any:
        if not self._pending and not self._in_flight:
            # Alone: one EVALSHA from this task, no future, no extra task. Requests that
            # arrive meanwhile gather in one pipeline behind it.
            self._in_flight += 1
            try:
                return (await self._evaluate([_Pending(keys, args, None)]))[0]
            finally:
                self._in_flight -= 1
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append(_Pending(keys, args, future))
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._launch)
        return await future

    def _launch(self) -> None:
        batch, self._pending = self._pending, []
        self._flushing = False
        asyncio.get_running_loop().create_task(self._flush(batch))

    async def _flush(self, batch: list[_Pending]) -> None:
        self._in_flight += 1
        try:
            await self._flush_batch(batch)
        finally:
            self._in_flight -= 1

    async def _flush_batch(self, batch: list[_Pending]) -> None:
        # Skip callers that gave up (their deadline passed while they waited).
        live = [(p, p.future) for p in batch if p.future is not None and not p.future.done()]
        if not live:
            return
        try:
            results = await self._evaluate([p for p, _ in live])
        except (RedisError, OSError) as exc:
            error = StoreUnavailable(f"Redis failed while rate limiting: {type(exc).__name__}")
            error.__cause__ = exc
            for _, future in live:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(live, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _evaluate(self, batch: list[_Pending]) -> list[Any]:
        if not self.sha:
            await self.start()
        self._round_trips += 1
        if len(batch) == 1:
            only = batch[0]
            try:
                return [await self._evalsha(only)]
            except NoScriptError:  # SCRIPT FLUSH, or a restarted server
                await self.start()
                self._round_trips += 1
                return [await self._evalsha(only)]
        results = await self._pipeline(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:
            await self.start()
            self._round_trips += 1
            again = await self._pipeline([batch[i] for i in missing])
            for i, result in zip(missing, again, strict=True):
                results[i] = result
        return results

    async def _evalsha(self, pending: _Pending) -> Any:
        return await self.client.evalsha(self.sha, len(pending.keys), *pending.keys, *pending.args)

    async def _pipeline(self, batch: list[_Pending]) -> list[Any]:
        async with self.client.pipeline(transaction=False) as pipe:
            for pending in batch:
                pipe.evalsha(self.sha, len(pending.keys), *pending.keys, *pending.args)
            return list(await pipe.execute(raise_on_error=False))
