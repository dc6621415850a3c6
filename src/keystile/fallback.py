"""What a decision Redis must make does when Redis cannot make it (SPEC §9): rate limits
and token quotas follow a failure mode, count and log what they let through, and stop
asking a Redis that keeps failing for a while."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal, TypeVar

from redis.exceptions import RedisError

from keystile.exceptions import StoreUnavailable

__all__ = ["FailureMode", "Fallback", "FallingBack"]

FailureMode = Literal["allow", "deny"]
T = TypeVar("T")

# What failing to get Redis' answer looks like (StoreUnavailable: an answer that is none).
REDIS_FAILED = (TimeoutError, StoreUnavailable, RedisError, OSError)
# The cause of a refusal made while backing off, without asking Redis.
BACKING_OFF = ConnectionError("Redis failed repeatedly: backing off")


class Fallback:
    """The failure mode of one kind of decision, and its back-off from a failing Redis.

    ``failure="allow"`` lets the request through, counted in :attr:`passes` and logged at
    most once per ``log_interval``; ``"deny"`` raises :class:`StoreUnavailable`.

    After ``trip_after`` failures in a row it backs off: for ``backoff[0]`` seconds every
    decision takes the failure mode at once, without asking Redis; then one call tries
    Redis while the others keep skipping it, until that try ends (or, should it hang,
    ``try_for`` seconds). Each failed try doubles the wait, up to ``backoff[1]``; the
    first answer ends the back-off. Calls already under way when it began (or when it
    ended) do not extend it. Callers ask Redis through :meth:`ask`.
    """

    __slots__ = (
        "_episode",
        "_last_log",
        "_logger",
        "_trying_since",
        "_wait",
        "_what",
        "backoff",
        "failure",
        "failures",
        "log_interval",
        "passes",
        "skip_until",
        "trip_after",
        "try_for",
    )

    def __init__(
        self,
        what: str,
        logger: logging.Logger,
        *,
        failure: FailureMode = "allow",
        log_interval: float = 60.0,
        trip_after: int = 3,
        backoff: tuple[float, float] = (0.05, 1.0),
        try_for: float = 10.0,
    ) -> None:
        if failure not in ("allow", "deny"):
            raise ValueError("failure must be 'allow' or 'deny'")
        if trip_after < 1 or not 0 < backoff[0] <= backoff[1]:
            raise ValueError(
                "trip_after must be >= 1 and backoff (first, most) with 0 < first <= most"
            )
        self._what = what
        self._logger = logger
        self.failure: FailureMode = failure
        self.log_interval = log_interval
        self.trip_after = trip_after
        self.backoff = backoff
        self.try_for = try_for
        self.passes = 0  # decisions let through undecided
        self.failures = 0  # failed decisions since Redis last answered
        self.skip_until = 0.0  # monotonic; non-zero: backing off (no try before then)
        self._wait = 0.0  # the current back-off
        self._trying_since = 0.0  # monotonic; non-zero: a try is under way
        self._episode = 0  # one more each time Redis answers after failing
        self._last_log = -math.inf

    async def ask(
        self, call: Callable[..., Awaitable[T]], *args: Any, allow: bool = False
    ) -> T | None:
        """``await call(*args)`` (which asks Redis), unless backing off; ``None`` when
        Redis did not answer and the failure mode was taken: a pass counted, or
        :class:`StoreUnavailable` raised. ``allow``: let it through even with
        ``failure="deny"`` (nothing left to refuse)."""
        trying = False
        if self.skip_until:  # backing off
            now = time.monotonic()
            trying_since = self._trying_since
            if now < self.skip_until or (trying_since and now - trying_since < self.try_for):
                self._fail(None, allow)
                return None
            trying, self._trying_since = True, now
        episode = self._episode
        try:
            answer = await call(*args)
        except REDIS_FAILED as exc:
            self._failed(trying and episode == self._episode)
            self._fail(exc, allow)
            return None
        finally:
            if trying and episode == self._episode:
                self._trying_since = 0.0  # answered, failed, cancelled: the try is over
        if self.failures:
            # Redis answers: no more backing off.
            self.failures, self.skip_until, self._wait = 0, 0.0, 0.0
            self._trying_since = 0.0
            self._episode += 1
        return answer

    def _failed(self, tried: bool) -> None:
        """Count a failure: back off after ``trip_after`` in a row, and twice as long after
        each failed try (``tried``: a try of the current back-off)."""
        self.failures += 1
        if tried:
            self._wait = min(max(self._wait * 2, self.backoff[0]), self.backoff[1])
        elif self.skip_until or self.failures < self.trip_after:
            return
        else:
            self._wait = self.backoff[0]
        self.skip_until = time.monotonic() + self._wait

    def _fail(self, exc: BaseException | None, allow: bool) -> None:
        """Take the failure mode for a decision Redis did not make (``exc``; ``None``:
        skipped while backing off): count and log the pass, or raise StoreUnavailable."""
        deny = self.failure == "deny" and not allow
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            self._last_log = now
            self._logger.warning(
                "%s unavailable (%s); %s (passes so far: %d)",
                self._what,
                "backing off" if exc is None else type(exc).__name__,
                "refusing" if deny else "letting requests through",
                self.passes,
            )
        if deny:
            cause = exc if exc is not None else BACKING_OFF
            raise StoreUnavailable(f"the {self._what} cannot reach Redis") from cause
        self.passes += 1


class FallingBack:
    """For the owner of a :attr:`fallback`: its failure mode, log interval and passes."""

    fallback: Fallback

    @property
    def failure(self) -> FailureMode:
        return self.fallback.failure

    @failure.setter
    def failure(self, value: FailureMode) -> None:
        if value not in ("allow", "deny"):
            raise ValueError("failure must be 'allow' or 'deny'")
        self.fallback.failure = value

    @property
    def log_interval(self) -> float:
        return self.fallback.log_interval

    @log_interval.setter
    def log_interval(self, value: float) -> None:
        self.fallback.log_interval = value

    @property
    def passes(self) -> int:
        """Decisions let through without Redis' answer (``failure="allow"``)."""
        return self.fallback.passes
