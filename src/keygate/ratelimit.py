"""Rate limits, written the way :mod:`limits` writes them (``"100/minute"``,
``"10/second;1000/hour"``). This is the only module that imports :mod:`limits`.
"""

from __future__ import annotations

import limits
from limits import RateLimitItem

__all__ = ["normalize_rate_limit", "parse_rate_limit"]

_MAX_LIMIT_TEXT = 256


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
    for item in items:
        if item.amount < 1:
            raise ValueError(f"{text!r}: a limit must admit at least one request")
    return items


def normalize_rate_limit(text: str) -> str:
    """The canonical spelling of a limit string: ``"10/second;1000/hour"``."""
    return ";".join(_spell(item) for item in parse_rate_limit(text))


def _spell(item: RateLimitItem) -> str:
    unit = item.GRANULARITY.name
    if item.multiples == 1:
        return f"{item.amount}/{unit}"
    return f"{item.amount}/{item.multiples} {unit}s"
