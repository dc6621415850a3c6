"""One error contract for everything keystile keeps in Redis.

Whatever the store — key records, rate-limit windows, token quotas, usage, alert state —
a Redis that cannot be reached or does not answer in time raises
:class:`~keystile.exceptions.StoreUnavailable`, and a Redis that answers with an error
raises :class:`~keystile.exceptions.StoreError` (its parent), each raised from the
original so the cause stays in the traceback. Callers catch the library's errors only.

A Redis Cluster adds its own: a cluster that is down, a slot no node serves, a slot being
moved (``CLUSTERDOWN``, ``TRYAGAIN``, redis-py's ``SlotNotCoveredError``) count as
unreachable; every other cluster error — ``MOVED``/``ASK`` not followed, a cross-slot
command or transaction, and redis-py's ``RedisClusterException`` family, which is not a
``RedisError`` — as an error answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    RedisError,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from keystile import tracing
from keystile.exceptions import StoreError, StoreUnavailable
from keystile.telemetry import ROUND_TRIPS, perf_counter_ns

__all__ = ["PURPOSES", "REDIS_FAILURES", "UNREACHABLE", "redis_errors", "translated"]

# Redis could not be asked, or did not answer in time.
UNREACHABLE = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
    ClusterDownError,
    TryAgainError,
    SlotNotCoveredError,
)
# Anything redis-py or the socket raises when a command fails.
REDIS_FAILURES = (*UNREACHABLE, RedisError, RedisClusterException)

P = ParamSpec("P")
T = TypeVar("T")


# What each action is for: the ``purpose`` label of keystile_redis_round_trip_seconds (a
# closed set; an action not named here is "other").
PURPOSES = {
    "looking a key up": "key lookup",
    "looking keys up": "key lookup",
    "adding a key": "key store",
    "reading a key": "key store",
    "updating a key": "key store",
    "listing keys": "key store",
    "indexing a key": "key store",
    "indexing keys": "key store",
    "listing projects": "key store",
    "reading a project": "key store",
    "writing a project": "key store",
    "reading alert rules": "alerts",
    "writing alert rules": "alerts",
    "loading the rate-limit script": "rate limiter",
    "spending AI tokens": "quotas",
    "loading the token-quota script": "quotas",
    "writing usage": "usage flush",
    "reading usage": "usage read",
    "writing the audit trail": "audit",
    "reading the audit trail": "audit",
    "claiming an alert": "alerts",
    "noting the addresses a key used": "alerts",
    "pinging": "connection",
    "finding the cluster's nodes": "connection",
    "checking the deployment": "connection",
}


@contextlib.contextmanager
def redis_errors(action: str) -> Iterator[None]:
    """Turn redis-py's and the socket's errors into the library's own, keeping the cause;
    ``action`` says what was being done ("reading a key"). With metrics on, the time the
    block took is one round trip of the action's purpose (:data:`PURPOSES`); with tracing
    on, it is a ``keystile.redis`` span (:func:`keystile.tracing.redis_span`)."""
    if tracing.state.tracer is None:
        with _translated(action):
            yield
        return
    with tracing.redis_span(action, PURPOSES.get(action, "other")), _translated(action):
        yield


@contextlib.contextmanager
def _translated(action: str) -> Iterator[None]:
    timed = ROUND_TRIPS.on
    started = perf_counter_ns() if timed else 0
    try:
        yield
    except UNREACHABLE as exc:
        raise StoreUnavailable(
            f"Redis is unreachable while {action}: {type(exc).__name__}"
        ) from exc
    except (RedisError, RedisClusterException) as exc:
        raise StoreError(f"Redis failed while {action}: {type(exc).__name__}") from exc
    finally:
        if timed:
            ROUND_TRIPS.observe(PURPOSES.get(action, "other"), started)


Method = Callable[P, Coroutine[Any, Any, T]]


def translated(action: str) -> Callable[[Method[P, T]], Method[P, T]]:
    """A coroutine method whose Redis errors follow the contract (see :func:`redis_errors`)."""

    def decorate(method: Method[P, T]) -> Method[P, T]:
        @functools.wraps(method)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with redis_errors(action):
                return await method(*args, **kwargs)

        return wrapper

    return decorate
