"""The failure mode and back-off that rate limits and token quotas share when Redis fails
(SPEC §9): the state machine on its own, with calls that succeed, fail, hang or are
cancelled on command (the Redis-backed behaviour is in test_ratelimit.py and
test_quotas.py, on fakeredis and a real server)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import fakeredis
import pytest

from keystile import Keystile, KeystileSettings, StoreUnavailable
from keystile.fallback import BACKING_OFF, Fallback
from keystile.ratelimit import RedisLimiter

log = logging.getLogger("keystile.test_fallback")


class Redis:
    """Stands in for Redis: each call answers, fails, or waits for the test to say."""

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False
        self.gates: list[asyncio.Future[str]] = []

    async def answer(self) -> str:
        self.calls += 1
        if self.failing:
            raise ConnectionError("Redis is down")
        return "answer"

    async def held(self) -> str:
        """A call that waits until the test resolves its future (an answer or an error)."""
        self.calls += 1
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        return await gate


def fallback(**options: Any) -> Fallback:
    return Fallback("test decisions", log, **{"backoff": (1.0, 4.0), **options})


async def trip(fb: Fallback, redis: Redis) -> None:
    redis.failing = True
    for _ in range(fb.trip_after):
        assert await fb.ask(redis.answer) is None
    assert fb.skip_until


async def test_while_a_try_is_under_way_the_others_skip_even_past_the_wait(
    monotonic: list[float],
) -> None:
    """Past the wait one call tries; however long it takes (within try_for), every other
    call skips Redis until it ends: never two tries at once."""
    fb, redis = fallback(), Redis()
    await trip(fb, redis)
    monotonic[0] += 1.0
    trying = asyncio.create_task(fb.ask(redis.held))
    await asyncio.sleep(0)
    asked = redis.calls
    for _ in range(5):
        monotonic[0] += 1.5  # past any wait (within try_for), the try still under way
        assert await fb.ask(redis.answer) is None
    assert redis.calls == asked and fb.passes == 3 + 5
    redis.gates[0].set_result("late answer")
    assert await trying == "late answer"
    assert not fb.skip_until and fb.failures == 0
    redis.failing = False
    assert await fb.ask(redis.answer) == "answer"


async def test_a_try_that_fails_after_another_call_succeeded_does_not_back_off_again(
    monotonic: list[float],
) -> None:
    """A call under way since before the back-off answers while the try waits, ending the
    back-off; the try then fails: that is one failure, not a failed try, so Redis is asked
    again at once (no back-off after a single failure)."""
    fb, redis = fallback(), Redis()
    early = asyncio.create_task(fb.ask(redis.held))  # under way before anything failed
    await asyncio.sleep(0)
    await trip(fb, redis)
    monotonic[0] += 1.0
    trying = asyncio.create_task(fb.ask(redis.held))
    await asyncio.sleep(0)
    early_gate, try_gate = redis.gates
    early_gate.set_result("answer")
    assert await early == "answer" and not fb.skip_until
    try_gate.set_exception(ConnectionError("the try's connection broke"))
    assert await trying is None
    assert fb.failures == 1 and not fb.skip_until
    redis.failing = False
    asked = redis.calls
    assert await fb.ask(redis.answer) == "answer" and redis.calls == asked + 1


async def test_a_cancelled_try_lets_the_next_call_try_at_once(monotonic: list[float]) -> None:
    """A try cancelled (its client went away) or failing with an error that is not Redis'
    no longer holds the others back: the next call tries."""
    fb, redis = fallback(), Redis()
    await trip(fb, redis)
    monotonic[0] += 1.0
    trying = asyncio.create_task(fb.ask(redis.held))
    await asyncio.sleep(0)
    trying.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trying
    redis.failing = False
    asked = redis.calls
    assert await fb.ask(redis.answer) == "answer" and redis.calls == asked + 1
    assert not fb.skip_until


async def test_a_hung_try_holds_the_others_back_for_try_for_at_most(
    monotonic: list[float],
) -> None:
    """Should a try hang, another may try once it has taken ``try_for``."""
    fb, redis = fallback(try_for=5.0), Redis()
    await trip(fb, redis)
    monotonic[0] += 1.0
    hung = asyncio.create_task(fb.ask(redis.held))
    await asyncio.sleep(0)
    redis.failing = False
    monotonic[0] += 5.0 - 2**-10
    assert await fb.ask(redis.answer) is None
    monotonic[0] += 2**-10
    assert await fb.ask(redis.answer) == "answer" and not fb.skip_until
    hung.cancel()
    with pytest.raises(asyncio.CancelledError):
        await hung


async def test_deny_refuses_without_asking_while_backing_off_unless_allowed(
    monotonic: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """failure="deny": a failed decision raises StoreUnavailable; while backing off it does
    so without asking Redis (the cause says so); ``allow=True`` (a record of work already
    done) lets it through as a pass instead. The log names the cause, at most once per
    ``log_interval``."""
    caplog.set_level(logging.WARNING, logger=log.name)
    fb, redis = fallback(failure="deny", log_interval=0.0), Redis()
    redis.failing = True
    for _ in range(3):
        with pytest.raises(StoreUnavailable) as failed:
            await fb.ask(redis.answer)
        assert isinstance(failed.value.__cause__, ConnectionError)
    asked = redis.calls
    with pytest.raises(StoreUnavailable) as skipped:
        await fb.ask(redis.answer)
    assert skipped.value.__cause__ is BACKING_OFF and redis.calls == asked
    assert await fb.ask(redis.answer, allow=True) is None and fb.passes == 1
    messages = [r.getMessage() for r in caplog.records if r.name == log.name]
    assert messages[0].startswith("test decisions unavailable (ConnectionError); refusing")
    assert "test decisions unavailable (backing off); refusing" in messages[3]
    assert "(backing off); letting requests through (passes so far: 0)" in messages[4]
    fb.log_interval = 60.0
    with pytest.raises(StoreUnavailable):
        await fb.ask(redis.answer)
    assert len([r for r in caplog.records if r.name == log.name]) == 5


def test_the_back_off_is_configured_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """KEYSTILE_RATE_LIMIT_TRIP_AFTER / _BACKOFF / _BACKOFF_MAX reach the limiter and the
    quotas; a first wait above the most is refused."""
    monkeypatch.setenv("KEYSTILE_RATE_LIMIT_TRIP_AFTER", "5")
    monkeypatch.setenv("KEYSTILE_RATE_LIMIT_BACKOFF", "0.2")
    monkeypatch.setenv("KEYSTILE_RATE_LIMIT_BACKOFF_MAX", "3")
    monkeypatch.setenv("KEYSTILE_RATE_LIMIT_FAILURE", "deny")
    settings = KeystileSettings()
    gate = Keystile(store="memory://", settings=settings)
    fb = gate.quotas.fallback
    assert (fb.trip_after, fb.backoff, fb.failure) == (5, (0.2, 3.0), "deny")
    limiter = RedisLimiter(fakeredis.FakeAsyncRedis(), **settings.fallback_options)
    assert (limiter.fallback.trip_after, limiter.fallback.backoff) == (5, (0.2, 3.0))
    assert limiter.failure == "deny"
    limiter.failure = "allow"
    assert limiter.fallback.failure == "allow"
    with pytest.raises(ValueError, match="failure"):
        limiter.failure = "maybe"  # type: ignore[assignment]
    monkeypatch.setenv("KEYSTILE_RATE_LIMIT_BACKOFF", "4")
    with pytest.raises(ValueError, match="rate_limit_backoff must not exceed"):
        KeystileSettings()
