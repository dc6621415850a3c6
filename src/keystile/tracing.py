"""OpenTelemetry traces (``pip install 'keystile[tracing]'``, which brings the
OpenTelemetry API): a span per authentication decision, with child spans for the key
lookup and the rate-limit decision, and a ``keystile.redis`` span per Redis operation —
under the request's spans when a request made it, on its own for background work (a
usage flush, an alert, the audit trail).

    from keystile.tracing import enable_tracing
    enable_tracing()          # the global tracer provider, or enable_tracing(provider)

``keystile.authenticate`` starts when the request reaches the middleware, as a child of the
span current then (the server's request span, with OpenTelemetry's ASGI middleware in
front), and ends when the decision is made — before the app runs — with the attributes
``keystile.decision`` (``admitted``, ``public``, ``preflight`` or the refusal code),
``keystile.key_id``, ``keystile.key_type`` and ``keystile.project`` once the key is known.
No attribute ever holds a secret, a header or a path with ids. Off until enabled: then
the middleware pays nothing for it but one attribute check.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from starlette.types import Scope

if TYPE_CHECKING:
    from keystile.principal import Principal

__all__ = [
    "SPAN",
    "child",
    "disable_tracing",
    "enable_tracing",
    "end",
    "identify",
    "redis_span",
    "start",
]

SPAN = "keystile.span"  # the scope key of the request's authentication span


class _State:
    tracer: Any = None


state = _State()


def enable_tracing(tracer_provider: Any = None) -> None:
    """Trace authentication from now on, with ``tracer_provider`` (default: the global
    one OpenTelemetry's SDK or distro set up)."""
    from opentelemetry import trace

    state.tracer = trace.get_tracer("keystile", tracer_provider=tracer_provider)


def disable_tracing() -> None:
    state.tracer = None


def start(scope: Scope) -> None:
    """Open the request's ``keystile.authenticate`` span (tracing is on)."""
    kind = scope["type"]
    attributes = {"keystile.request": kind}
    if kind == "http":
        attributes["http.request.method"] = scope.get("method", "GET")
    scope[SPAN] = state.tracer.start_span("keystile.authenticate", attributes=attributes)


def identify(scope: Scope, principal: Principal) -> None:
    """Name the request's key on its span (its id, type and project; never its secret)."""
    span = scope.get(SPAN)
    if span is not None:
        span.set_attribute("keystile.key_id", principal.key_id)
        span.set_attribute("keystile.key_type", principal.type_name)
        span.set_attribute("keystile.project", principal.key.project)


def end(scope: Scope, decision: str, principal: Principal | None = None) -> None:
    """Close the request's span with its decision."""
    span = scope.pop(SPAN, None)
    if span is None:
        return
    if principal is not None:
        scope[SPAN] = span
        identify(scope, principal)
        del scope[SPAN]
    span.set_attribute("keystile.decision", decision)
    span.end()


@contextmanager
def child(scope: Scope, name: str) -> Iterator[Any]:
    """A span under the request's authentication span (``None`` when tracing is off)."""
    parent = scope.get(SPAN)
    if parent is None or state.tracer is None:
        yield None
        return
    from opentelemetry import trace

    context = trace.set_span_in_context(parent)
    with state.tracer.start_as_current_span(name, context=context) as span:
        yield span


@contextmanager
def redis_span(action: str, purpose: str) -> Iterator[Any]:
    """A ``keystile.redis`` span around one Redis operation (tracing is on), a child of
    the span current then: ``keystile.redis.action`` says what was done ("looking a key
    up"), ``keystile.redis.purpose`` its purpose (the label of the round-trip metric).
    Names of Redis keys and values are never attributes."""
    attributes = {
        "db.system": "redis",
        "keystile.redis.action": action,
        "keystile.redis.purpose": purpose,
    }
    with state.tracer.start_as_current_span("keystile.redis", attributes=attributes) as span:
        yield span
