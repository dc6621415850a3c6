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

from typing import Annotated, Any

from fastapi import Depends, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes
from fastapi.security.utils import get_authorization_scheme_param
from starlette.requests import HTTPConnection

from keystile.models import ApiKey
from keystile.responses import raise_refusal
from keystile.routing import PRINCIPAL, check_scopes

__all__ = ["api_key", "bearer", "require"]


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
