"""Rate limits over exact moving (sliding-log) windows.

Limits are written the way :mod:`limits` writes them (``"100/minute"``,
``"10/second;1000/hour"``); :mod:`keystile.rates` parses them into a
:class:`~keystile.rates.LimitSet`. A request is admitted only when *every* window of its
key admits it, and a refused request consumes nothing. A request costs 1 by default and at
most :data:`MAX_COST` (20,000): a window keeps one timestamp per unit, and in Redis one
script pushes them all while Redis waits (about 10 ms for 20,000); a cost outside
1–20,000 is a ``ValueError``, with either limiter.

The decision follows ``limits``' moving-window algorithm to the letter: a window keeps
the timestamps of its last ``amount`` admissions, newest first, and refuses a request of
cost ``c`` when the entry at index ``amount - c`` is still inside the window
(``entry >= now - window``). ``tests/test_ratelimit.py`` drives both limiters and
``limits``' own ``MovingWindowRateLimiter`` with the same random schedules and compares
every decision.

Two limiters keep that contract (:class:`Limiter`, in :mod:`.base`):

- :class:`MemoryLimiter` (:mod:`.memory`) — one process; takes an injectable clock.
- :class:`RedisLimiter` (:mod:`.redis`) — any number of processes sharing one Redis: one
  Lua script decides every window of a key atomically on Redis' own clock, one EVALSHA
  per decision.
"""

from __future__ import annotations

from keystile.ratelimit.base import MAX_COST, Limiter
from keystile.ratelimit.memory import MemoryLimiter
from keystile.ratelimit.redis import _SHA as _SHA
from keystile.ratelimit.redis import RedisLimiter
from keystile.rates import (
    MAX_AMOUNT,
    MAX_WINDOW,
    Decision,
    LimitSet,
    Window,
    limit_set,
    normalize_rate_limit,
    parse_rate_limit,
)

__all__ = [
    "MAX_AMOUNT",
    "MAX_COST",
    "MAX_WINDOW",
    "Decision",
    "LimitSet",
    "Limiter",
    "MemoryLimiter",
    "RedisLimiter",
    "Window",
    "limit_set",
    "normalize_rate_limit",
    "parse_rate_limit",
]
