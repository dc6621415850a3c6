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

from keygate.exceptions import StoreUnavailable

__all__ = ["FailureMode", "Fallback", "FallingBack"]

FailureMode = Literal["allow", "deny"]
T = TypeVar("T")

# What failing to get Redis' answer looks like (StoreUnavailable: an answer that is none).
REDIS_FAILED = (TimeoutError, StoreUnavailable, RedisError, OSError)
# The cause of a decision skipped while backing off (never raised itself).
BACKING_OFF = ConnectionError("Redis failed repeatedly: backing off")


class Fallback:
    """The failure mode of one kind of decision, and its back-off from a failing Redis.

    ``failure="allow"`` lets the request through, counted in :attr:`passes` and logged at
    most once per ``log_interval``; ``"deny"`` raises :class:`StoreUnavailable`.

    After ``trip_after`` failures in a row it backs off: for ``backoff[0]`` seconds every
    decision takes the failure mode at once (:meth:`may_ask` is false); then one caller
    may try Redis (for at most ``try_for`` seconds) while the others keep skipping it. Each
    failed try doubles the wait, up to ``backoff[1]``; the first answer ends it. Failures of
    calls already under way when it began do not extend it.

    Callers ask Redis through :meth:`ask`.
    """

    __slots__ = (
        "_last_log",
        "_logger",
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
        try_for: float = 1.0,
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
        self.passes = 0  # requests let through undecided (failure="allow")
        self.failures = 0  # failed decisions since Redis last answered
        self.skip_until = 0.0  # monotonic; while ahead, decisions do not ask Redis
        self._wait = 0.0  # the current back-off
        self._last_log = -math.inf

    async def ask(self, call: Callable[..., Awaitable[T]], *args: Any) -> T | None:
        """``await call(*args)`` (which asks Redis), unless backing off; ``None`` when
        Redis did not answer, and the failure mode taken: a pass counted, or
        :class:`StoreUnavailable` raised."""
        trying = False
        if self.skip_until:  # backing off
            trying = self.may_ask()
            if not trying:
                self.fail(BACKING_OFF)
                return None
        try:
            answer = await call(*args)
        except REDIS_FAILED as exc:
            self.failed(trying)
            self.fail(exc)
            return None
        if self.failures:
            self.answered()
        return answer

    def may_ask(self) -> bool:
        """While backing off: whether this call may try Redis now (then the others skip
        it until its answer, or ``try_for``)."""
        clock = time.monotonic()
        if clock < self.skip_until:
            return False
        self.skip_until = clock + self.try_for
        return True

    def failed(self, trying: bool) -> None:
        """Count a failed decision: back off after ``trip_after`` in a row, and twice as
        long after each failed try."""
        self.failures += 1
        if trying:
            self._wait = min(max(self._wait * 2, self.backoff[0]), self.backoff[1])
        elif self.skip_until or self.failures < self.trip_after:
            return
        else:
            self._wait = self.backoff[0]
        self.skip_until = time.monotonic() + self._wait

    def answered(self) -> None:
        """Redis answered: no more backing off."""
        self.failures, self.skip_until, self._wait = 0, 0.0, 0.0

    def fail(self, exc: BaseException) -> None:
        """Take the failure mode for a decision Redis did not make: count and log the
        pass, or raise :class:`StoreUnavailable` (``failure="deny"``)."""
        now = time.monotonic()
        if now - self._last_log >= self.log_interval:
            self._last_log = now
            self._logger.warning(
                "%s unavailable (%s); %s requests (passes so far: %d)",
                self._what,
                type(exc).__name__,
                "admitting" if self.failure == "allow" else "refusing",
                self.passes,
            )
        if self.failure == "deny":
            raise StoreUnavailable(f"the {self._what} cannot reach Redis") from exc
        self.passes += 1


class FallingBack:
    """For the owner of a :attr:`fallback`: its failure mode and passes, read-only."""

    fallback: Fallback

    @property
    def failure(self) -> FailureMode:
        return self.fallback.failure

    @property
    def passes(self) -> int:
        """Decisions let through without Redis' answer (``failure="allow"``)."""
        return self.fallback.passes
