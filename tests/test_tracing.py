"""OpenTelemetry spans: one per authentication decision, children for the key lookup and
the rate-limit decision, joined to the server's span; never a secret (issue #17, item 2)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from keystile import Keystile, KeystileMiddleware, Rule, public
from keystile.tracing import disable_tracing, enable_tracing
from usage_app import http


@pytest.fixture
def spans() -> Iterator[tuple[InMemorySpanExporter, TracerProvider]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    enable_tracing(provider)
    yield exporter, provider
    disable_tracing()


async def ok(request: Request) -> Response:
    return JSONResponse({"ok": True})


class ServerSpan:
    """What OpenTelemetry's ASGI middleware does: the request runs inside a server span."""

    def __init__(self, app: Any, provider: TracerProvider) -> None:
        self.app = app
        self.tracer = provider.get_tracer("server")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with self.tracer.start_as_current_span("GET /read", kind=trace.SpanKind.SERVER):
            await self.app(scope, receive, send)


async def test_each_decision_is_a_span_with_its_key_and_outcome(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, provider = spans
    gate = Keystile()
    inner = Starlette(routes=[Route("/read", ok), Route("/health", ok)])
    inner.add_middleware(
        KeystileMiddleware,
        gate=gate,
        rules=[public("/health"), Rule("GET", "/read", ["vec:read"])],
    )
    app = ServerSpan(inner, provider)
    reader = await gate.manager.create(
        {
            "name": "r",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": ["https://app.example"],
            "rate_limit": "1/minute",
            "project": "shop",
        }
    )
    token = reader.secret.get_secret_value()
    headers = {"Authorization": f"Bearer {token}", "Origin": "https://app.example"}
    async with http(app) as client:
        assert (await client.get("/read", headers=headers)).status_code == 200
        assert (await client.get("/read", headers=headers)).status_code == 429
        assert (await client.get("/read")).status_code == 401
        assert (await client.get("/health")).status_code == 200
    finished = exporter.get_finished_spans()
    decisions = [s for s in finished if s.name == "keystile.authenticate"]
    assert [s.attributes["keystile.decision"] for s in decisions] == [
        "admitted",
        "rate_limited",
        "missing_api_key",
        "public",
    ]
    admitted = decisions[0]
    assert admitted.attributes["keystile.key_id"] == reader.key.id
    assert admitted.attributes["keystile.key_type"] == "client"
    assert admitted.attributes["keystile.project"] == "shop"
    assert decisions[1].attributes["keystile.key_id"] == reader.key.id
    assert "keystile.key_id" not in decisions[2].attributes
    # Joined to the server's span: same trace, the server span its parent.
    servers = [s for s in finished if s.name == "GET /read"]
    assert admitted.parent is not None and admitted.parent.span_id == servers[0].context.span_id
    assert admitted.context.trace_id == servers[0].context.trace_id
    # The Redis-facing steps are children of the decision.
    lookups = [s for s in finished if s.name == "keystile.key_lookup"]
    limits = [s for s in finished if s.name == "keystile.rate_limit"]
    assert len(lookups) == 1 and lookups[0].parent.span_id == admitted.context.span_id
    assert [s.attributes["keystile.allowed"] for s in limits] == [True, False]
    # The decision span ends before the app's answer: it times the decision alone.
    assert admitted.end_time <= servers[0].end_time
    everything = repr([(s.name, dict(s.attributes or {})) for s in finished])
    assert token not in everything and "Bearer" not in everything
    await gate.aclose()


async def test_without_tracing_no_span_is_made(
    spans: tuple[InMemorySpanExporter, TracerProvider],
) -> None:
    exporter, _ = spans
    disable_tracing()
    gate = Keystile()
    app = Starlette(routes=[Route("/read", ok)])
    app.add_middleware(KeystileMiddleware, gate=gate)
    async with http(app) as client:
        assert (await client.get("/read")).status_code == 401
    assert exporter.get_finished_spans() == ()
    await gate.aclose()


@pytest.mark.parametrize("backend", ["fakeredis", "redis"], indirect=True)
async def test_each_redis_operation_is_a_span_under_the_step_that_made_it(
    spans: tuple[InMemorySpanExporter, TracerProvider], store: Any
) -> None:
    """With a Redis store, the key lookup of an uncached key and the usage flush after it
    are ``keystile.redis`` spans: the lookup's under the request's ``keystile.key_lookup``,
    the flush's on its own; each names its action and purpose, never a key or a name."""
    exporter, _ = spans
    gate = Keystile(store=store, secret="tracing-test-secret-0123456789")
    app = Starlette(routes=[Route("/read", ok)])
    app.add_middleware(KeystileMiddleware, gate=gate, rules=[Rule("GET", "/read", ["vec:read"])])
    made = await gate.manager.create({"name": "r", "type": "dev", "scopes": ["vec:read"]})
    token = made.secret.get_secret_value()
    gate.store.clear()  # the next request looks the key up in Redis
    exporter.clear()
    async with http(app) as client:
        answer = await client.get("/read", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
    await gate.usage.flush()
    finished = exporter.get_finished_spans()
    redis_spans = [s for s in finished if s.name == "keystile.redis"]
    by_purpose = {s.attributes["keystile.redis.purpose"]: s for s in redis_spans}
    lookup = next(s for s in finished if s.name == "keystile.key_lookup")
    assert by_purpose["key lookup"].parent.span_id == lookup.context.span_id
    assert by_purpose["key lookup"].attributes["db.system"] == "redis"
    flush = by_purpose["usage flush"]
    assert flush.parent is None or flush.parent.span_id != lookup.context.span_id
    everything = repr([(s.name, dict(s.attributes or {})) for s in finished])
    assert token not in everything
    assert not any(made.key.id in str(v) for s in redis_spans for v in s.attributes.values())
    assert all(
        set(s.attributes) == {"db.system", "keystile.redis.action", "keystile.redis.purpose"}
        for s in redis_spans
    )
    await gate.aclose()
