"""The EVALSHA a Redis limiter sends for a decision (keystile.ratelimit.redis): put together
from a shape per limit string and cost (the cache of whole commands holds 10,000 and a
platform has more keys and addresses than that), it is byte for byte the command spelt out
word by word — the window names as the limiter's schema spells them, the arguments the
moving-window script reads."""

from __future__ import annotations

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keystile.ratelimit.redis import _SHA, RedisLimiter
from keystile.rates import LimitSet, limit_set
from keystile.redis.lean import encode

LIMITS = [
    ("100/minute", None),
    ("10/second;100/minute;1000/hour", None),
    ("100/minute", "20/minute"),
    (None, "5/second;50/minute"),
    ("1/day", "1/day"),
]


def client_limits(text: int) -> LimitSet:
    key_limit, address_limit = LIMITS[text]
    return limit_set(key_limit, "client", address_limit)


def spelt_out(limiter: RedisLimiter, key: str, address: str, text: int, cost: int) -> bytes:
    """The decision's command, word by word."""
    limits = client_limits(text)
    names = [
        limiter._schema.window(key, w.amount, w.seconds, (address or "-") if w.per_address else "")
        for w in limits.windows
    ]
    args: list[str | int] = [cost, ""]
    for window in limits.windows:
        args += [window.amount, window.seconds * 1000]
    return encode(["EVALSHA", _SHA, len(names), *names, *args])


# An operator's namespace may hold any character (it is configuration, not validated):
# one with the characters a shape could mistake for where the key id or address goes.
@pytest.fixture(scope="module", params=["ks:{app}", "ks\n\r:x"])
def limiter(request: pytest.FixtureRequest) -> RedisLimiter:
    return RedisLimiter(fakeredis.FakeAsyncRedis(), namespace=request.param, lean=False)


keys = st.from_regex(r"[a-z]{2,8}_[A-Za-z0-9]{1,24}", fullmatch=True)
addresses = st.sampled_from(["", "203.0.113.7", "2001:db8::/64", "10.0.0.0/24"])


@settings(max_examples=300, deadline=None)
@given(
    key=keys,
    address=addresses,
    text=st.integers(0, len(LIMITS) - 1),
    cost=st.integers(1, 10_000),
)
def test_a_decisions_command_is_the_command_spelt_out(
    limiter: RedisLimiter, key: str, address: str, text: int, cost: int
) -> None:
    limits = client_limits(text)
    address = address if limits.per_address else ""
    limiter._commands.clear()  # built from its shape, not taken from the cache
    built = limiter._command((key, address, limits.text, cost), limits, None)
    assert built == spelt_out(limiter, key, address, text, cost)
    # and the names are the ones window_key gives (what the limiter's readers use)
    for i in range(len(limits.windows)):
        assert limiter.window_key(key, limits, i, address).encode() in built


def test_past_the_cache_every_command_is_still_its_own(limiter: RedisLimiter) -> None:
    """More keys than the command cache holds: each command still names its own key's
    windows, and the cache stays within its bound."""
    limits = limit_set("100/minute", "client", "20/minute")
    for n in range(10_050):
        key = f"key_{n}"
        built = limiter._command((key, "198.51.100.1", limits.text, 1), limits, None)
        assert f"{{{key}}}:".encode() in built
        assert len(limiter._commands) <= 10_000
    assert limiter._commands[(key, "198.51.100.1", limits.text, 1)] == built
