"""FastAPI integration: per-route scopes as a ``Security`` dependency.

::

    from fastapi import FastAPI, Security
    from keystile.fastapi import api_key

    @app.post("/cloud/vec/databases")
    async def create(key: ApiKey = Security(api_key, scopes=["vec:write"])): ...

    @app.websocket("/cloud/vec/stream")
    async def stream(websocket: WebSocket, key: ApiKey = require("vec:read")): ...

The scopes appear in the OpenAPI document as requirements of the ``Keystile`` bearer
scheme. Authentication itself is done by :class:`~keystile.middleware.KeystileMiddleware`,
which must be installed in front of the app (or of an app that mounts it); refusals keep
the library's JSON body and ``WWW-Authenticate`` header (see :class:`keystile.Refusal`), and a
websocket handshake is closed with 1008 (policy violation), as the middleware does.
"""

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import Depends, Security
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from keystile.admin_handlers import invalid_response
from keystile.exceptions import FieldError
from keystile.models import ApiKey
from keystile.responses import raise_refusal
from keystile.routing import PRINCIPAL, check_scopes

__all__ = [
    "ERROR_RESPONSES",
    "ERROR_SCHEMA",
    "api_key",
    "bearer",
    "document_errors",
    "require",
    "validation_errors",
]


class _Bearer(HTTPBearer):
    """``HTTPBearer`` for HTTP requests and websockets alike (older FastAPI's own takes a
    ``Request``, which a websocket route cannot give). No ``from __future__ import
    annotations`` in this module: older FastAPI resolves a callable instance's annotations
    through ``__globals__``, which an instance has not, and would take a string for a query
    parameter."""

    async def __call__(self, request: HTTPConnection) -> HTTPAuthorizationCredentials | None:
        scheme, credentials = get_authorization_scheme_param(request.headers.get("Authorization"))
        if not credentials or scheme.lower() != "bearer":
            return None  # the middleware has refused such a request already
        return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials)


bearer = _Bearer(
    auto_error=False,
    scheme_name="Keystile",
    bearerFormat="keystile API key (dev_, prod_ or client_)",
    description="An API key sent as `Authorization: Bearer <key>`.",
)


async def api_key(
    security_scopes: SecurityScopes,
    conn: HTTPConnection,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The authenticated key's record, once it is known to hold the required scopes (an
    HTTP request or a websocket)."""
    refusal = check_scopes(conn, security_scopes.scopes)
    if refusal is not None:
        raise_refusal(conn, refusal)
    key: ApiKey = conn.scope[PRINCIPAL].key
    return key


def require(*scopes: str) -> Any:
    """``Security(api_key, scopes=[...])`` spelled shorter: ``Depends``-style default."""
    return Security(api_key, scopes=list(scopes))


# -- the OpenAPI document and FastAPI's own errors (issue #20) ---------------------------------

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string", "description": "What went wrong, for programs."},
                "message": {"type": "string", "description": "The same, for people."},
                "fields": {
                    "type": "array",
                    "description": "422 only: each field's problem.",
                    "items": {
                        "type": "object",
                        "required": ["field", "message"],
                        "properties": {"field": {"type": "string"}, "message": {"type": "string"}},
                    },
                },
            },
        }
    },
}
_ERROR_REF = {"$ref": "#/components/schemas/KeystileError"}
_CHALLENGE = {
    "WWW-Authenticate": {
        "description": 'The Bearer challenge (RFC 6750), e.g. `Bearer realm="api", '
        'error="invalid_token"`.',
        "schema": {"type": "string"},
    }
}
_LIMIT_HEADERS = {
    "Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}},
    "RateLimit": {
        "description": 'The refusing policy\'s state, e.g. `"client";r=0;t=12`.',
        "schema": {"type": "string"},
    },
    "RateLimit-Policy": {
        "description": 'The key\'s limits, e.g. `"client";q=100;w=60`.',
        "schema": {"type": "string"},
    },
}
ERROR_RESPONSES: dict[str, dict[str, Any]] = {
    "401": {
        "description": "No key, or a key that is malformed, unknown, expired or revoked "
        "(`missing_api_key`, `invalid_api_key`, `expired_api_key`, `revoked_api_key`).",
        "headers": _CHALLENGE,
    },
    "403": {
        "description": "The key lacks a scope the route needs (`insufficient_scope`), or is "
        "used from an origin or address it does not allow (`origin_not_allowed`, "
        "`ip_not_allowed`).",
        "headers": _CHALLENGE,
    },
    "429": {
        "description": "Over the key's rate limit (`rate_limited`) or AI token quota "
        "(`quota_exceeded`).",
        "headers": _LIMIT_HEADERS,
    },
}


def document_errors(app: Any) -> None:
    """Add the 401, 403 and 429 answers, with the error envelope (``KeystileError``) and
    their headers, to every operation of ``app`` (a FastAPI app) that needs a key.
    :class:`~keystile.middleware.KeystileMiddleware` does it when the app starts; calling
    it again does nothing."""
    build = app.openapi
    if getattr(build, "__keystile__", False):
        return

    def openapi() -> dict[str, Any]:
        fresh = app.openapi_schema is None
        schema: dict[str, Any] = build()
        if fresh:
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.setdefault("KeystileError", ERROR_SCHEMA)
            for item in schema.get("paths", {}).values():
                for operation in item.values():
                    if not isinstance(operation, dict):
                        continue
                    needs = operation.get("security") or ()
                    if any("Keystile" in requirement for requirement in needs):
                        answers = operation.setdefault("responses", {})
                        for status, answer in ERROR_RESPONSES.items():
                            content = {"application/json": {"schema": _ERROR_REF}}
                            answers.setdefault(status, {**answer, "content": content})
        return schema

    openapi.__keystile__ = True  # type: ignore[attr-defined]
    app.openapi = openapi


def _field(loc: Sequence[Any]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name or "request"


async def _validation_failed(request: Request, exc: Exception) -> Response:
    problems = exc.errors() if isinstance(exc, RequestValidationError) else []
    fields = [FieldError(_field(p.get("loc", ())), str(p.get("msg", ""))) for p in problems]
    return invalid_response(fields)


def validation_errors(app: Any) -> None:
    """Answer FastAPI's own validation errors (422) in keystile's envelope:
    ``{"error": {"code": "validation_failed", "message": ..., "fields": [...]}}``, as the
    admin API does, instead of FastAPI's ``{"detail": [...]}``. Opt-in: call it once."""
    app.add_exception_handler(RequestValidationError, _validation_failed)
