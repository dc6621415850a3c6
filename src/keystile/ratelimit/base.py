"""What every limiter shares: the :class:`Limiter` protocol, what a request may cost, and
how a wait becomes the whole seconds of the headers."""

from __future__ import annotations

import math
from typing import Protocol

from keystile.rates import Decision, LimitSet

__all__ = ["MAX_COST", "Limiter", "check_cost", "retry_after", "whole_seconds"]

MAX_COST = 20_000  # units one request may cost (one timestamp each)


class Limiter(Protocol):
    """Decides whether a key may make a request now."""

    async def hit(
        self, key: str, limits: LimitSet, cost: int = 1, *, address: str = ""
    ) -> Decision:
        """Admit (and count) or refuse (and count nothing) ``cost`` units for ``key``, and
        for ``address`` in the windows that count each client address apart
        (``ValueError`` unless 1 <= ``cost`` <= :data:`MAX_COST`)."""

    async def start(self) -> None:
        """Prepare (e.g. load scripts) so the first request pays nothing extra."""

    async def close(self) -> None:
        """Release resources. Idempotent."""


def check_cost(cost: int) -> None:
    """``ValueError`` unless ``cost`` is a whole number from 1 to :data:`MAX_COST`."""
    if isinstance(cost, bool) or not isinstance(cost, int) or not 1 <= cost <= MAX_COST:
        raise ValueError(f"a request costs a whole number from 1 to {MAX_COST:,}, not {cost!r}")


def whole_seconds(value: float) -> int:
    """``value`` seconds rounded up (``t`` of the ``RateLimit`` header), never below 0."""
    return max(0, math.ceil(value - 1e-9))


def retry_after(wait: float) -> int:
    """``Retry-After`` for a request that could be admitted ``wait`` seconds from now."""
    # A window refuses while its entry is >= now - window: at exactly `wait` seconds it
    # still refuses, so a whole-second answer must be strictly later — and a refusal never
    # says "retry after 0" (a local refusal can come within a millisecond of the release).
    return max(1, math.floor(wait) + 1)
