"""Rate limits as values: limit strings, their windows, a limiter's decision and its
headers — the only module that imports :mod:`limits`, and one that imports no Redis.

Limits are written the way :mod:`limits` writes them (``"100/minute"``,
``"10/second;1000/hour"``) and parsed by it (:func:`parse_rate_limit`, with keystile's
bounds on top). :func:`limit_set` turns the limit of a key and the share of each client
address into a :class:`LimitSet` of :class:`Window` s, which the limiters of
:mod:`keystile.ratelimit` decide; their answer is a :class:`Decision`, which spells the
``RateLimit-Policy``, ``RateLimit`` and ``Retry-After`` headers
(draft-ietf-httpapi-ratelimit-headers) and the legacy ``X-RateLimit-*`` ones.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import limits
from limits import RateLimitItem

__all__ = [
    "MAX_AMOUNT",
    "MAX_WINDOW",
    "Decision",
    "LimitSet",
    "Window",
    "limit_set",
    "normalize_rate_limit",
    "parse_rate_limit",
]

_MAX_LIMIT_TEXT = 256
# "1/0 second": limits reads a zero multiple as one; a window of no time is a mistake.
_ZERO_WINDOW = re.compile(r"(?:/|per)\s*0+\s*[a-z]", re.IGNORECASE)
MAX_AMOUNT = 10_000_000
MAX_WINDOW = 366 * 86_400


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
