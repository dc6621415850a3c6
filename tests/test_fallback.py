"""The failure mode and back-off that rate limits and token quotas share when Redis fails
(docs/failure-modes.md): the state machine on its own, with calls that succeed, fail, hang or are
cancelled on command (the Redis-backed behaviour is in test_ratelimit.py and
test_quotas.py, on fakeredis and a real server)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import fakeredis
import pytest

from keystile import Keystile, KeystileSettings, StoreUnavailable
from keystile.fallback import BACKING_OFF, Fallback, Health
from keystile.ratelimit import RedisLimiter, limit_set

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


@pytest.fixture
def monotonic() -> list[float]:
    """The monotonic clock given to the fallbacks of a test (``monotonic=``), set by the
    test: ``monotonic[0] += seconds``. Unlike conftest's, it patches no module."""
    return [1000.0]


def fallback(monotonic: list[float], **options: Any) -> Fallback:
    """A Fallback on the test's monotonic clock."""
    return Fallback(
        "test decisions",
        log,
        **{"backoff": (1.0, 4.0), "monotonic": lambda: monotonic[0], **options},
    )


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
    fb, redis = fallback(monotonic), Redis()
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
    fb, redis = fallback(monotonic), Redis()
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
    fb, redis = fallback(monotonic), Redis()
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
    fb, redis = fallback(monotonic, try_for=5.0), Redis()
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
    fb, redis = fallback(monotonic, failure="deny", log_interval=0.0), Redis()
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


# -- a loud outage: one warning with its cause, and a health signal (issue #18, item 0) -------


def outage_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == log.name and r.levelno == logging.WARNING and "cannot reach" in r.getMessage()
    ]


@pytest.mark.parametrize("failure", ["allow", "deny"])
async def test_item0_an_outage_longer_than_the_back_off_is_logged_once_with_its_cause(
    caplog: pytest.LogCaptureFixture, failure: str
) -> None:
    """Redis failing past the back-off (a try fails) is logged once, a warning naming the
    cause (class and message) and where Redis is, however many decisions and tries follow;
    :meth:`health` is "degraded" from the back-off until Redis answers, "ok" after. Redis
    answering ends the outage (logged at INFO); the next outage is logged once again."""
    caplog.set_level(logging.INFO, logger=log.name)
    now = [50.0]
    fb = Fallback(
        "test decisions",
        log,
        failure=failure,  # type: ignore[arg-type]
        backoff=(1.0, 4.0),
        where="10.0.0.7:6379",
        monotonic=lambda: now[0],
    )
    cause = "Error 111 connecting to 10.0.0.7:6379. Connection refused."

    async def down() -> str:
        raise ConnectionError(cause)

    async def up() -> str:
        return "answer"

    async def ask(call: Any) -> str | None:
        try:
            return await fb.ask(call)
        except StoreUnavailable:
            return None

    for outage in range(2):
        assert fb.health().ok and fb.health().since is None
        for _ in range(3):  # trip_after failures in a row: backing off
            assert await ask(down) is None
        health = fb.health()
        assert health.status == "degraded" and health.since is not None
        assert health.last_error == f"connection refused (ConnectionError: {cause})"
        assert len(outage_warnings(caplog)) == outage  # not yet: the back-off is young
        for _ in range(5):  # each wait over, a try fails; the decisions between skip Redis
            now[0] += 4.0
            assert await ask(down) is None
            assert await ask(down) is None
        warned = outage_warnings(caplog)
        assert len(warned) == outage + 1
        assert warned[-1].startswith("test decisions cannot reach Redis at 10.0.0.7:6379 for")
        assert f"back-off (connection refused (ConnectionError: {cause}))" in warned[-1]
        doing = "refusing" if failure == "deny" else "letting requests through undecided"
        assert doing in warned[-1]
        assert not fb.health().ok
        now[0] += 4.0
        assert await ask(up) == "answer"
        assert fb.health() == Health("test decisions", passes=fb.passes)
        back = [r for r in caplog.records if r.levelno == logging.INFO]
        assert len(back) == outage + 1 and "reaches Redis at 10.0.0.7:6379 again" in (
            back[-1].getMessage()
        )


async def test_item0_a_short_outage_is_not_announced() -> None:
    """Failures that end before the back-off is over (the first try answers) degrade
    health for their while, and log no outage warning."""
    now = [0.0]
    fb = Fallback("test decisions", log, backoff=(1.0, 4.0), monotonic=lambda: now[0])
    redis = Redis()
    await trip(fb, redis)
    assert not fb.health().ok
    redis.failing = False
    now[0] += 1.0
    assert await fb.ask(redis.answer) == "answer"
    assert fb.health().ok and not fb._announced


async def test_item0_a_dead_redis_makes_the_gate_say_so(
    unused_redis_url: str, monotonic: list[float], caplog: pytest.LogCaptureFixture
) -> None:
    """A gate whose Redis is gone: once the limiter has failed past its back-off it logs
    one warning naming host:port and the cause (never the password in the URL), and
    ``Keystile.health()`` says "degraded" for the limiter, "ok" for the quotas (not used)."""
    caplog.set_level(logging.WARNING, logger="keystile.ratelimit")
    url = unused_redis_url.replace("redis://", "redis://:hunter2-not-logged@")
    settings = KeystileSettings(rate_limit_timeout=0.2, redis_timeout=0.2)
    gate = Keystile(store=url, secret="s" * 32, settings=settings)
    limiter = gate.limiter
    assert isinstance(limiter, RedisLimiter)
    limiter.fallback.monotonic = lambda: monotonic[0]  # the gate built it on the real clock
    limits_ = limit_set("10/minute", "dev")
    try:
        assert gate.health().ok and gate.health().status == "ok"
        for _ in range(3):
            assert (await limiter.hit("k", limits_)).degraded
        monotonic[0] += 1.0
        assert (await limiter.hit("k", limits_)).degraded  # the try fails
        health = gate.health()
        assert not health.ok and health.status == "degraded" and health.quotas.ok
        assert health.limiter.status == "degraded" and health.limiter.passes == 4
        port = unused_redis_url.rsplit(":", 1)[1].split("/")[0]
        [warning] = [r.getMessage() for r in caplog.records if "cannot reach" in r.getMessage()]
        assert f"rate limiter cannot reach Redis at 127.0.0.1:{port}" in warning
        assert "(connection refused (" in warning
        assert all("hunter2" not in r.getMessage() for r in caplog.records)
        assert "hunter2" not in repr(health)
    finally:
        await gate.aclose()
