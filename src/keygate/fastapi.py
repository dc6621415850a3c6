"""FastAPI integration: per-route scopes as a ``Security`` dependency (SPEC §3).

::

    from fastapi import FastAPI, Security
    from keygate.fastapi import api_key

    @app.post("/cloud/vec/databases")
    async def create(key: ApiKey = Security(api_key, scopes=["vec:write"])): ...

The scopes appear in the OpenAPI document as requirements of the ``KeyGate`` bearer
scheme. Authentication itself is done by :class:`~keygate.middleware.KeyGateMiddleware`,
which must be installed in front of the app (or of an app that mounts it); refusals keep
the SPEC's JSON body and ``WWW-Authenticate`` header (see :class:`keygate.Refusal`).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer, SecurityScopes

from keygate.models import ApiKey
from keygate.responses import raise_refusal
from keygate.routing import PRINCIPAL, check_scopes

__all__ = ["api_key", "bearer", "require"]

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="KeyGate",
    bearerFormat="keygate API key (dev_, prod_ or client_)",
    description="An API key sent as `Authorization: Bearer <key>`.",
)


async def api_key(
    security_scopes: SecurityScopes,
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> ApiKey:
    """The authenticated key's record, once it is known to hold the required scopes."""
    refusal = check_scopes(request, security_scopes.scopes)
    if refusal is not None:
        raise_refusal(request, refusal)
    key: ApiKey = request.scope[PRINCIPAL].key
    return key


def require(*scopes: str) -> Any:
    """``Security(api_key, scopes=[...])`` spelled shorter: ``Depends``-style default."""
    return Security(api_key, scopes=list(scopes))
