"""Prometheus metrics (``pip install 'keystile[metrics]'``, which brings prometheus-client).

One line serves them from the app, beside a rule that lets the scraper in without a key::

    app.add_route("/metrics", metrics_app(gate))    # rules=[public("/metrics"), ...]

or registers them with the app's own registry: ``GateMetrics(gate, registry=registry)``.

=============================================  ==============================================
``keystile_requests_total``                    requests by ``outcome`` (``admitted`` or the
                                               refusal code) and ``key_type`` (``none``
                                               before a key is known)
``keystile_auth_seconds``                      histogram: arrival to admission
``keystile_cache_hits_total``, ``_misses_``    key cache lookups; ``keystile_cache_entries``
``keystile_rate_limit_decisions_total``        by ``decision``: allowed, refused, degraded
                                               (let through undecided: Redis did not answer)
``keystile_rate_limit_local_refusals_total``   refused without asking Redis
``keystile_quota_decisions_total``             by ``mode`` (reserve, check, record) and
                                               ``decision`` (allowed, refused, none, unavailable)
``keystile_redis_errors_total``                by ``purpose``: rate limiter, quotas, key store,
                                               usage
``keystile_redis_round_trip_seconds``         histogram by ``purpose``: key lookup, key store,
                                               rate limiter, quotas, usage flush, usage read,
                                               audit, alerts, connection (the whole process)
``keystile_usage_flushes_total``               usage flushes by ``result`` (ok, failed); rows
                                               written (``_rows_total``), time spent
                                               (``_seconds_total``), counts dropped
                                               (``keystile_usage_dropped_total``)
``keystile_alerts_fired_total``                alerts raised
=============================================  ==============================================

No label carries a key id, a path or an address: every label value is from a closed set.

The library counts in process, in plain integers (a few nanoseconds a request: the
benchmarks measure it); this module hands the counts to prometheus_client at every scrape
and every ``interval`` seconds, and when the gate shuts down. In prometheus_client's
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set before the workers start, as its
documentation says), every worker's counts thus reach the files that
:func:`metrics_app` adds up, at most ``interval`` seconds late.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_asgi_app
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from keystile.telemetry import LATENCY_BUCKETS, ROUND_TRIPS

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Receive, Scope, Send

    from keystile.gate import Keystile

__all__ = ["GateMetrics", "metrics_app"]


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class _SyncFirst(Collector):
    """Registered before the metrics: a scrape first brings them up to date."""

    def __init__(self, metrics: GateMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Any]:
        self._metrics.sync()
        return ()


class GateMetrics:
    """The gate's counts as Prometheus metrics in ``registry`` (prometheus_client's default
    registry if ``None``; in multiprocess mode, none: the scrape reads the workers' files)."""

    def __init__(
        self,
        gate: Keystile,
        *,
        registry: CollectorRegistry | None = None,
        interval: float = 1.0,
    ) -> None:
        self.gate = gate
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._seen: dict[tuple[str, tuple[str, ...]], float] = {}
        multiprocess = _multiprocess()
        if registry is None and not multiprocess:
            from prometheus_client import REGISTRY

            registry = REGISTRY
        own = None if multiprocess else registry
        if own is not None:
            own.register(_SyncFirst(self))
        options: dict[str, Any] = {"registry": own}
        self.requests = Counter(
            "keystile_requests",
            "Requests by outcome (admitted or the refusal code) and key type.",
            ["outcome", "key_type"],
            **options,
        )
        self.auth_seconds = Histogram(
            "keystile_auth_seconds",
            "Seconds from a request's arrival to its admission.",
            buckets=LATENCY_BUCKETS,
            **options,
        )
        self.cache_hits = Counter("keystile_cache_hits", "Key cache hits.", **options)
        self.cache_misses = Counter("keystile_cache_misses", "Key cache misses.", **options)
        self.cache_entries = Gauge(
            "keystile_cache_entries",
            "Key records cached.",
            multiprocess_mode="livesum",
            **options,
        )
        self.limits = Counter(
            "keystile_rate_limit_decisions",
            "Rate-limit decisions: allowed, refused, degraded (let through undecided).",
            ["decision"],
            **options,
        )
        self.local_refusals = Counter(
            "keystile_rate_limit_local_refusals",
            "Requests refused over their rate limit without asking Redis.",
            **options,
        )
        self.quotas = Counter(
            "keystile_quota_decisions",
            "AI token quota decisions by mode and decision.",
            ["mode", "decision"],
            **options,
        )
        self.redis_errors = Counter(
            "keystile_redis_errors",
            "Redis round trips that failed or timed out, by purpose.",
            ["purpose"],
            **options,
        )
        self.round_trips = Histogram(
            "keystile_redis_round_trip_seconds",
            "Seconds per Redis round trip, by purpose.",
            ["purpose"],
            buckets=LATENCY_BUCKETS,
            **options,
        )
        ROUND_TRIPS.on = True  # timed from now on, in this process
        self.flushes = Counter(
            "keystile_usage_flushes", "Usage flushes by result.", ["result"], **options
        )
        self.flush_rows = Counter(
            "keystile_usage_flush_rows", "Key-minutes of usage written.", **options
        )
        self.flush_seconds = Counter(
            "keystile_usage_flush_seconds", "Seconds spent writing usage.", **options
        )
        self.dropped = Counter(
            "keystile_usage_dropped", "Usage counts dropped (the buffer was full).", **options
        )
        self.alerts = Counter("keystile_alerts_fired", "Alerts raised.", **options)
        gate.extensions.append(self)
        if gate.started:  # made after start-up: start now, if there is a loop to run on
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                self._task = loop.create_task(self._run(), name="keystile-metrics")

    # -- what the gate counts, read ---------------------------------------------------------

    def _readings(self) -> Iterator[tuple[Any, tuple[str, ...], float]]:
        gate = self.gate
        telemetry = gate.telemetry
        for key_type, count in list(telemetry.admitted.items()):
            yield self.requests, ("admitted", key_type), count
        for (code, key_type), count in list(telemetry.refused.items()):
            yield self.requests, (code, key_type), count
        for verdict, count in list(telemetry.limits.items()):
            yield self.limits, (verdict,), count
        cache = gate.store
        yield self.cache_hits, (), cache.hits
        yield self.cache_misses, (), cache.misses
        limiter = gate.limiter
        yield self.local_refusals, (), getattr(limiter, "local_refused", 0)
        for (mode, verdict), count in list(gate.quotas.decisions.items()):
            yield self.quotas, (mode, verdict), count
        fallback = getattr(limiter, "fallback", None)
        yield self.redis_errors, ("rate limiter",), getattr(fallback, "errors", 0)
        yield self.redis_errors, ("quotas",), gate.quotas.fallback.errors
        yield self.redis_errors, ("key store",), telemetry.lookup_errors
        usage = gate.usage
        yield self.redis_errors, ("usage",), usage.failed_flushes
        yield self.flushes, ("ok",), usage.flushes
        yield self.flushes, ("failed",), usage.failed_flushes
        yield self.flush_rows, (), usage.flushed_rows
        yield self.flush_seconds, (), usage.flush_seconds
        yield self.dropped, (), usage.dropped
        yield self.alerts, (), gate.alerts.fired

    def sync(self) -> None:
        """Hand what was counted since the last call to prometheus_client."""
        seen = self._seen
        for metric, labels, value in self._readings():
            name = (metric._name, labels)
            delta = value - seen.get(name, 0)
            if delta > 0:
                (metric.labels(*labels) if labels else metric).inc(delta)
                seen[name] = value
        self.cache_entries.set(len(self.gate.store))
        self._sync_latency()

    def _sync_latency(self) -> None:
        telemetry = self.gate.telemetry
        self._sync_histogram(self.auth_seconds, "latency", telemetry.latency, telemetry.latency_ns)
        for purpose, counts in list(ROUND_TRIPS.counts.items()):
            self._sync_histogram(
                self.round_trips.labels(purpose),
                f"round trips {purpose}",
                counts,
                ROUND_TRIPS.sums_ns[purpose],
            )

    def _sync_histogram(self, histogram: Any, name: str, counts: list[int], total_ns: int) -> None:
        """Hand a histogram counted in plain integers (observations per bucket, the last
        beyond every bound; nanoseconds in all) to prometheus_client, since the last call."""
        for index, count in enumerate(list(counts)):
            seen = (name, (str(index),))
            delta = count - int(self._seen.get(seen, 0))
            if delta > 0:
                histogram._buckets[index].inc(delta)
                self._seen[seen] = count
        before = self._seen.get((name, ()), 0)
        if total_ns > before:
            histogram._sum.inc((total_ns - before) / 1e9)
            self._seen[(name, ())] = total_ns

    # -- the gate's lifetime -----------------------------------------------------------------

    async def start(self) -> None:
        """Sync every ``interval`` seconds (so that other workers' counts reach the
        multiprocess files) until :meth:`close`."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keystile-metrics")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sync()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.sync()


def metrics_app(
    gate: Keystile, *, registry: CollectorRegistry | None = None, interval: float = 1.0
) -> Any:
    """An ASGI app serving the gate's metrics (Prometheus' text format). Without
    ``registry``, a registry of its own, or, in multiprocess mode, every worker's files.
    (Typed ``Any``: Starlette's ``add_route`` serves ASGI apps, but is typed for request
    handlers only.)"""
    if _multiprocess():
        scraped = CollectorRegistry()
        metrics = GateMetrics(gate, interval=interval)
        scraped.register(_SyncFirst(metrics))
        MultiProcessCollector(scraped)  # type: ignore[no-untyped-call]
    else:
        scraped = registry if registry is not None else CollectorRegistry()
        GateMetrics(gate, registry=scraped, interval=interval)
    return _MetricsApp(make_asgi_app(scraped))


class _MetricsApp:
    """prometheus_client's ASGI app as an object, not a function: Starlette's
    ``add_route`` and ``Route`` then serve it as an ASGI app at exactly that path."""

    __slots__ = ("_app",)

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)
