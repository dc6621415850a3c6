"""What a decision Redis must make does when Redis cannot make it: rate limits
and token quotas follow a failure mode, count and log what they let through, and stop
asking a Redis that keeps failing for a while."""

from __future__ import annotations

import logging
import math
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from redis.exceptions import RedisError

from keystile.exceptions import StoreError, StoreMisconfigured, StoreUnavailable
from keystile.logs import fields

__all__ = [
    "FailureMode",
    "Fallback",
    "FallingBack",
    "Health",
    "failure_cause",
    "redis_address",
]

FailureMode = Literal["allow", "deny"]
T = TypeVar("T")

# What failing to get Redis' answer looks like: the stores' errors (StoreError, and its
# StoreUnavailable: an answer that is none), and redis-py's or the socket's own from a
# limiter that talks to Redis itself.
REDIS_FAILED = (TimeoutError, StoreError, RedisError, OSError)
# The cause of a refusal made while backing off, without asking Redis.
BACKING_OFF = ConnectionError("Redis failed repeatedly: backing off")


def _monotonic() -> float:
    return time.monotonic()  # looked up on each call: tests replace the module's clock


def redis_address(client: object) -> str:
    """Where a redis-py client connects (``host:port`` or a socket path; ``""`` when it
    does not say), for messages: never its credentials."""
    options = getattr(getattr(client, "connection_pool", None), "connection_kwargs", None)
    if not isinstance(options, dict):
        return ""
    if options.get("path"):
        return str(options["path"])
    host = options.get("host")
    if not isinstance(host, str):
        return ""
    return f"{f'[{host}]' if ':' in host else host}:{options.get('port', 6379)}"


_CAUSES = (  # what redis-py's messages say, when the original error is not chained
    ("connection refused", "connection refused"),
    ("name or service not known", "host name not found (DNS)"),
    ("nodename nor servname", "host name not found (DNS)"),
    ("temporary failure in name resolution", "host name not found (DNS)"),
    ("timeout", "timed out"),
    ("timed out", "timed out"),
)


def failure_cause(exc: BaseException) -> str:
    """Why Redis could not be reached, in words — ``connection refused``, ``host name not
    found (DNS)``, ``timed out``, ``authentication failed`` — followed by the underlying
    error's type and message (cut short) in parentheses; just those when the cause is
    none of these. Follows the chain of causes (a store's error, redis-py's)."""
    original = _cause(exc)
    detail = f"{type(original).__name__}: {str(original)[:200]}" if str(original) else ""
    detail = detail or type(original).__name__
    words = _cause_words(exc)
    return f"{words} ({detail})" if words else detail


def _cause_words(exc: BaseException) -> str | None:
    seen: list[BaseException] = []
    error: BaseException | None = exc
    while error is not None and len(seen) < 8:
        seen.append(error)
        error = error.__cause__ or error.__context__
    for error in seen:
        if isinstance(error, socket.gaierror):
            return "host name not found (DNS)"
        if isinstance(error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(error, TimeoutError) or type(error).__name__ == "TimeoutError":
            return "timed out"
        if type(error).__name__ == "AuthenticationError":
            return "authentication failed"
    for error in seen:
        text = str(error).lower()
        for words, cause in _CAUSES:
            if words in text:
                return cause
    return None


def _cause(exc: BaseException) -> BaseException:
    """What went wrong under a store's error (it is raised from the original)."""
    if isinstance(exc, StoreError) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


@dataclass(frozen=True, slots=True)
class Health:
    """What one component knows of the Redis it needs: ``"ok"``, or ``"degraded"`` while it
    backs off from a Redis that failed ``trip_after`` times in a row (decisions then take
    the failure mode), ``since`` the first of those failures, the ``last_error``."""

    component: str
    status: Literal["ok", "degraded"] = "ok"
    since: datetime | None = None
    last_error: str | None = None
    passes: int = 0  # decisions let through undecided, ever

    @property
    def ok(self) -> bool:
        return self.status == "ok"


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

    An outage that outlasts the back-off (a try fails) is logged once, a warning naming
    the cause and ``where`` Redis is; the first answer after it once more, and
    :meth:`health` says ``"degraded"`` while backing off. ``monotonic`` is the clock of
    all of it.
    """

    __slots__ = (
        "_announced",
        "_down_at",
        "_down_since",
        "_episode",
        "_error",
        "_last_log",
        "_logger",
        "_trying_since",
        "_wait",
        "_what",
        "backoff",
        "errors",
        "failure",
        "failures",
        "log_interval",
        "monotonic",
        "passes",
        "skip_until",
        "trip_after",
        "try_for",
        "where",
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
        where: str = "",
        monotonic: Callable[[], float] = _monotonic,
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
        self.where = where  # where Redis is, for the log (host:port, no credentials)
        self.monotonic = monotonic
        self.passes = 0  # decisions let through undecided
        self.failures = 0  # failed decisions since Redis last answered
        self.errors = 0  # failed decisions in all (keystile.metrics)
        self.skip_until = 0.0  # monotonic; non-zero: backing off (no try before then)
        self._wait = 0.0  # the current back-off
        self._trying_since = 0.0  # monotonic; non-zero: a try is under way
        self._episode = 0  # one more each time Redis answers after failing
        self._last_log = -math.inf
        self._down_at = 0.0  # monotonic: the first of `failures`
        self._down_since: datetime | None = None  # the same, on the wall clock
        self._error: str | None = None  # the last failure's cause
        self._announced = False  # the outage has been logged

    async def ask(
        self, call: Callable[..., Awaitable[T]], *args: Any, allow: bool = False
    ) -> T | None:
        """``await call(*args)`` (which asks Redis), unless backing off; ``None`` when
        Redis did not answer and the failure mode was taken: a pass counted, or
        :class:`StoreUnavailable` raised. ``allow``: let it through even with
        ``failure="deny"`` (nothing left to refuse)."""
        trying = False
        if self.skip_until:  # backing off
            now = self.monotonic()
            trying_since = self._trying_since
            if now < self.skip_until or (trying_since and now - trying_since < self.try_for):
                self._fail(None, allow)
                return None
            trying, self._trying_since = True, now
        episode = self._episode
        try:
            answer = await call(*args)
        except StoreMisconfigured as exc:
            # Redis answered, but not for this key (a node of a Redis Cluster reached
            # without the cluster answers MOVED): no outage, so no failure mode to take —
            # never a request let through undecided for it.
            self._failed(trying and episode == self._episode, exc)
            if allow:
                self.passes += 1
                return None
            raise StoreUnavailable(f"the {self._what} cannot use Redis: {exc}") from exc
        except REDIS_FAILED as exc:
            self._failed(trying and episode == self._episode, exc)
            self._fail(exc, allow)
            return None
        finally:
            if trying and episode == self._episode:
                self._trying_since = 0.0  # answered, failed, cancelled: the try is over
        if self.failures:
            self._recovered()
        return answer

    def health(self) -> Health:
        """``"degraded"`` while backing off from a failing Redis, else ``"ok"``."""
        if not self.skip_until:
            return Health(self._what, passes=self.passes)
        return Health(self._what, "degraded", self._down_since, self._error, self.passes)

    def _recovered(self) -> None:
        """Redis answers: no more backing off (and say so, if the outage was logged)."""
        if self._announced:
            self._logger.info(
                "%s reaches Redis%s again after %.1f s (passes so far: %d)",
                self._what,
                f" at {self.where}" if self.where else "",
                self.monotonic() - self._down_at,
                self.passes,
                extra=fields("redis.back", store=self.where or None),
            )
        self.failures, self.skip_until, self._wait = 0, 0.0, 0.0
        self._trying_since = 0.0
        self._episode += 1
        self._down_since, self._error, self._announced = None, None, False

    def _failed(self, tried: bool, exc: BaseException | None = None) -> None:
        """Count a failure: back off after ``trip_after`` in a row, and twice as long after
        each failed try (``tried``: a try of the current back-off), logging the outage
        the first time a try fails."""
        if not self.failures:
            self._down_at, self._down_since = self.monotonic(), datetime.now(UTC)
        self.failures += 1
        self.errors += 1
        if exc is not None:
            self._error = failure_cause(exc)
        if tried:
            if not self._announced:
                self._announce()
            self._wait = min(max(self._wait * 2, self.backoff[0]), self.backoff[1])
        elif self.skip_until or self.failures < self.trip_after:
            return
        else:
            self._wait = self.backoff[0]
        self.skip_until = self.monotonic() + self._wait

    def _announce(self) -> None:
        self._announced = True
        self._logger.warning(
            "%s cannot reach Redis%s for %.1f s, longer than its back-off (%s); %s until it "
            "answers (passes so far: %d)",
            self._what,
            f" at {self.where}" if self.where else "",
            self.monotonic() - self._down_at,
            self._error,
            "refusing" if self.failure == "deny" else "letting requests through undecided",
            self.passes,
            extra=fields("redis.down", store=self.where or None),
        )

    def _fail(self, exc: BaseException | None, allow: bool) -> None:
        """Take the failure mode for a decision Redis did not make (``exc``; ``None``:
        skipped while backing off): count and log the pass, or raise StoreUnavailable."""
        deny = self.failure == "deny" and not allow
        now = self.monotonic()
        if now - self._last_log >= self.log_interval:
            self._last_log = now
            self._logger.warning(
                "%s unavailable (%s); %s (passes so far: %d)",
                self._what,
                "backing off" if exc is None else type(_cause(exc)).__name__,
                "refusing" if deny else "letting requests through",
                self.passes,
                extra=fields("redis.unavailable", store=self.where or None),
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

    def health(self) -> Health:
        """``"degraded"`` while backing off from a failing Redis (:class:`Health`)."""
        return self.fallback.health()
