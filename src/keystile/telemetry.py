"""What the middleware counts about its decisions, in plain integers: requests by outcome
and key type, and how long authentication took. Reading them costs nothing on the request
path; :mod:`keystile.metrics` hands them to Prometheus.

Every label is from a closed set — the outcome is ``admitted`` or a refusal code, the key
type one of the policy's (``none`` before a key is known) — so the tables stay small
whatever is sent.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from time import perf_counter_ns

__all__ = ["LATENCY_BUCKETS", "ROUND_TRIPS", "RoundTrips", "Telemetry", "perf_counter_ns"]

#: Upper bounds (seconds) of the authentication-latency histogram's buckets.
LATENCY_BUCKETS = (
    0.00001,
    0.000025,
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)
_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)


class Telemetry:
    """Counts of one middleware (or several sharing it)."""

    __slots__ = ("admitted", "latency", "latency_ns", "limits", "lookup_errors", "refused")

    def __init__(self) -> None:
        self.admitted: defaultdict[str, int] = defaultdict(int)  # key type -> requests
        # (refusal code, key type or "none") -> requests
        self.refused: defaultdict[tuple[str, str], int] = defaultdict(int)
        # rate-limit decisions: "allowed", "refused", "degraded" (let through undecided)
        self.limits: defaultdict[str, int] = defaultdict(int)
        self.latency = [0] * (len(_BOUNDS_NS) + 1)  # the last: beyond every bound
        self.latency_ns = 0
        self.lookup_errors = 0  # key lookups the store failed (timeouts, outages)

    def admit(self, key_type: str, started_ns: int) -> None:
        """An admitted request, decided ``perf_counter_ns() - started_ns`` after it came."""
        self.admitted[key_type] += 1
        took = perf_counter_ns() - started_ns
        self.latency[bisect_left(_BOUNDS_NS, took)] += 1
        self.latency_ns += took

    def refuse(self, code: str, key_type: str) -> None:
        self.refused[(code, key_type)] += 1

    def limited(self, allowed: bool, degraded: bool) -> None:
        """A rate-limit decision: let through undecided (Redis did not answer), or not."""
        self.limits["degraded" if degraded else "allowed" if allowed else "refused"] += 1


class RoundTrips:
    """How long keystile's Redis round trips took, by purpose (one process: every gate in
    it). Off — nothing timed, one attribute check per round trip — until
    :class:`keystile.metrics.GateMetrics` turns it on."""

    __slots__ = ("counts", "on", "sums_ns")

    def __init__(self) -> None:
        self.on = False
        # purpose -> observations per bucket (the last: beyond every bound); a closed set
        # of purposes (see keystile.redis.errors), so the table stays small
        self.counts: dict[str, list[int]] = {}
        self.sums_ns: defaultdict[str, int] = defaultdict(int)

    def observe(self, purpose: str, started_ns: int) -> None:
        """A round trip for ``purpose`` that started at ``started_ns`` ended now."""
        took = perf_counter_ns() - started_ns
        counts = self.counts.get(purpose)
        if counts is None:
            counts = self.counts[purpose] = [0] * (len(_BOUNDS_NS) + 1)
        counts[bisect_left(_BOUNDS_NS, took)] += 1
        self.sums_ns[purpose] += took


#: The process's Redis round-trip times (keystile_redis_round_trip_seconds).
ROUND_TRIPS = RoundTrips()
