"""The admin REST API: a thin shell over :class:`~keystile.manager.KeyManager`.

Mount it under an app that runs :class:`~keystile.middleware.KeystileMiddleware`, which
authenticates the caller; each endpoint then checks its scope itself::

    app = Starlette(
        routes=[admin_mount(gate, "/cloud/keys")],
        middleware=[Middleware(KeystileMiddleware, gate=gate)],
    )

:func:`admin_mount` answers the collection at the mount path itself (``GET /cloud/keys``)
as at ``/cloud/keys/``; a plain ``Mount("/cloud/keys", app=admin_app(gate))`` would answer
the bare path with a redirect, which ``curl`` and ``httpx`` do not follow.

======  ==================  =====================  =========================================
method  path                scope                  answer
======  ==================  =====================  =========================================
POST    ``/``               ``admin:manage_keys``  201 ``{"key": record, "secret": "..."}``
GET     ``/``               ``admin:manage_keys``  ``{"keys": [record, ...], "next": cursor}``
GET     ``/usage``          ``admin:view_usage``   the usage of all keys
GET     ``/{id}``           ``admin:manage_keys``  ``{"key": record}``
PATCH   ``/{id}``           ``admin:manage_keys``  ``{"key": record}``
POST    ``/{id}/revoke``    ``admin:manage_keys``  ``{"key": record}`` (idempotent)
POST    ``/{id}/rotate``    ``admin:manage_keys``  201 ``{"key", "secret", "previous"}``
GET     ``/{id}/usage``     ``admin:view_usage``   the usage of one key
GET     ``/project``        ``admin:view_usage``   ``{"project": {"id", "name", ...}}``
PATCH   ``/project``        ``admin:manage_keys``  ``{"project": ...}`` (body: name, description)
GET     ``/alert-rules``    ``admin:view_usage``   ``{"alert_rules": {"rules", "effective"...}}``
PUT     ``/alert-rules``    ``admin:manage_keys``  the same; the body is the rules it sets
======  ==================  =====================  =========================================

``/alert-rules`` also takes ``PATCH`` (change the rules given, keep the others) and
``DELETE`` (back to the process-wide rules); ``/{id}/alert-rules`` takes the same four
methods for one key's overrides (``{"alert_rules": {"overrides", "project_rules",
"effective", ...}}``), with the same scopes.

``/project`` and ``/alert-rules`` are the calling key's own project's: no route reaches
another project's (and another project's key id answers 404, as an unknown one does).

``GET /`` filters with ``?type=dev|prod|client``, ``?status=active|rotated|revoked|expired`` and
``?meta.<name>=<value>`` (e.g. ``meta.project=search``), and pages with ``?limit=`` (1 to
1000, default 100) and ``?cursor=`` (the previous answer's ``next``). ``POST /{id}/rotate``
takes an optional body ``{"grace_seconds": 86400}``.

The secret appears only in the answers to create and rotate (sent with
``Cache-Control: no-store``). Errors keep the envelope ``{"error": {"code",
"message"}}``: invalid input is 422 ``validation_failed`` with ``"fields": [{"field",
"message"}, ...]``; a body that is not JSON is 400 ``invalid_json``; an unknown id is 404
``not_found``; a key that cannot be rotated is 409 (``key_revoked``, ``key_expired``,
``key_already_rotated``); an unreachable store is 503 ``store_unavailable``.

``admin:manage_keys`` is not root. The calling key may grant only scopes it holds itself
(``vec:*`` covers ``vec:read``, ``*`` covers all), may not change its own ``scopes``,
``allowed_origins``, ``allowed_ips`` or ``expires_at``, and may not update or rotate a key
holding a scope it lacks (rotating would hand it the successor's secret). Any of these is
403 ``insufficient_scope``, with the missing scopes in the message and in the
``WWW-Authenticate`` challenge's ``scope`` (``*`` for changes to itself). A ``*`` key may do
everything; the command line and :class:`~keystile.manager.KeyManager` called from Python
(no calling key) are not restricted. A rotated key's ``expires_at`` may only move earlier
(else 422 ``validation_failed``), and a revocation is final.

FastAPI apps include :func:`fastapi_router` instead, which shows the endpoints and their
scopes in the OpenAPI document. The handlers behind both are in
:mod:`keystile.admin_handlers`; this module wraps them in Starlette routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Mount, Route
from starlette.types import Scope

from keystile.admin_handlers import MANAGE_KEYS, VIEW_USAGE, AdminAPI, error_response
from keystile.gate import Keystile
from keystile.manager import RECORD_FIELDS, record_json
from keystile.responses import Refusal
from keystile.routing import Rule, check_scopes

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = [
    "MANAGE_KEYS",
    "RECORD_FIELDS",
    "VIEW_USAGE",
    "AdminAPI",
    "AdminMount",
    "admin_app",
    "admin_mount",
    "admin_routes",
    "admin_rules",
    "fastapi_router",
    "record_json",
]


def _guarded(
    scope: str, handler: Callable[[Request], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        refusal = check_scopes(request, [scope])
        if refusal is not None:
            return refusal.response()
        return await handler(request)

    endpoint.__name__ = endpoint.__qualname__ = f"admin_{handler.__name__}"
    endpoint.__keystile_scopes__ = (scope,)  # type: ignore[attr-defined]
    return endpoint


def _by_method(
    endpoints: Mapping[str, Callable[[Request], Awaitable[Response]]],
) -> Callable[[Request], Awaitable[Response]]:
    # One route per path, so that a 405 names every method the path takes in its Allow.
    async def endpoint(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await endpoints[method](request)

    return endpoint


def admin_routes(gate: Keystile) -> list[Route]:
    """The admin endpoints as Starlette routes, each checking its scope; for
    ``Mount(path, routes=admin_routes(gate))``. See :func:`admin_app` for JSON 404/405s."""
    api = AdminAPI(gate.manager)
    keys = {"POST": _guarded(MANAGE_KEYS, api.create), "GET": _guarded(MANAGE_KEYS, api.list)}
    key = {"GET": _guarded(MANAGE_KEYS, api.get), "PATCH": _guarded(MANAGE_KEYS, api.update)}
    project = {
        "GET": _guarded(VIEW_USAGE, api.project),
        "PATCH": _guarded(MANAGE_KEYS, api.update_project),
    }
    rules = {
        "GET": _guarded(VIEW_USAGE, api.alert_rules),
        **{m: _guarded(MANAGE_KEYS, api.alert_rules) for m in ("PUT", "PATCH", "DELETE")},
    }
    return [
        Route("/", _by_method(keys), methods=list(keys), name="keys"),
        # Before "/{key_id}", which would take "usage" for a key id.
        Route("/usage", _guarded(VIEW_USAGE, api.usage), methods=["GET"], name="usage"),
        Route("/audit", _guarded(VIEW_USAGE, api.audit), methods=["GET"], name="audit"),
        Route("/project", _by_method(project), methods=list(project), name="project"),
        Route("/alert-rules", _by_method(rules), methods=list(rules), name="alert_rules"),
        Route("/{key_id}", _by_method(key), methods=list(key), name="key"),
        Route(
            "/{key_id}/revoke", _guarded(MANAGE_KEYS, api.revoke), methods=["POST"], name="revoke"
        ),
        Route(
            "/{key_id}/rotate", _guarded(MANAGE_KEYS, api.rotate), methods=["POST"], name="rotate"
        ),
        Route(
            "/{key_id}/usage", _guarded(VIEW_USAGE, api.usage), methods=["GET"], name="key_usage"
        ),
        Route(
            "/{key_id}/alert-rules",
            _by_method(rules),
            methods=list(rules),
            name="key_alert_rules",
        ),
    ]


async def _http_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, Refusal):
        return exc.response()
    if not isinstance(exc, HTTPException):  # registered for another exception: not ours
        raise exc
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, exc.detail, headers=exc.headers)


def admin_app(gate: Keystile) -> Starlette:
    """The admin endpoints as an app to mount, e.g. ``Mount("/cloud/keys",
    app=admin_app(gate))``, answering unknown paths and methods in the library's JSON envelope
    too. It does not authenticate: the middleware in front does."""
    return Starlette(routes=admin_routes(gate), exception_handlers={HTTPException: _http_error})


def _route_path(scope: Scope) -> str:
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class AdminMount(Mount):
    """A ``Mount`` whose bare path (``/cloud/keys``) is the collection, as the path with a
    slash (``/cloud/keys/``) is: no redirect."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        if match is Match.NONE and scope["type"] == "http" and _route_path(scope) == self.path:
            slashed = {**scope, "path": scope["path"] + "/"}
            if isinstance(scope.get("raw_path"), bytes):
                slashed["raw_path"] = scope["raw_path"] + b"/"
            match, child = super().matches(slashed)
            if match is not Match.NONE:
                child = {**child, "path": slashed["path"], "raw_path": slashed.get("raw_path")}
        return match, child


def admin_mount(gate: Keystile, path: str = "/cloud/keys") -> Mount:
    """The admin API mounted at ``path``, answering there too (``GET`` and ``POST
    /cloud/keys``, not only ``/cloud/keys/``); add ``admin_rules(path)`` to the middleware's
    rules when it refuses unmatched routes."""
    return AdminMount(path, app=admin_app(gate))


def admin_rules(prefix: str = "/cloud/keys") -> list[Rule]:
    """Rules for the middleware's central table covering the admin API mounted at
    ``prefix``, with the same scopes its endpoints check; needed when the middleware
    refuses unmatched routes (``deny_unmatched=True``)."""
    base = prefix.rstrip("/")
    return [
        Rule("GET", f"{base}/usage", [VIEW_USAGE]),
        Rule("GET", f"{base}/audit", [VIEW_USAGE]),
        Rule("GET", f"{base}/{{key_id}}/usage", [VIEW_USAGE]),
        Rule("GET", f"{base}/project", [VIEW_USAGE]),
        Rule("PATCH", f"{base}/project", [MANAGE_KEYS]),
        Rule("GET", f"{base}/alert-rules", [VIEW_USAGE]),
        Rule("PUT|PATCH|DELETE", f"{base}/alert-rules", [MANAGE_KEYS]),
        Rule("GET", f"{base}/{{key_id}}/alert-rules", [VIEW_USAGE]),
        Rule("PUT|PATCH|DELETE", f"{base}/{{key_id}}/alert-rules", [MANAGE_KEYS]),
        Rule("GET|POST", base or "/", [MANAGE_KEYS]),
        Rule("GET|POST", f"{base}/", [MANAGE_KEYS]),
        Rule("GET|PATCH", f"{base}/{{key_id}}", [MANAGE_KEYS]),
        Rule("POST", f"{base}/{{key_id}}/revoke", [MANAGE_KEYS]),
        Rule("POST", f"{base}/{{key_id}}/rotate", [MANAGE_KEYS]),
    ]


def fastapi_router(
    gate: Keystile, *, tags: Sequence[str] = ("keys",), prefix: str = ""
) -> APIRouter:
    """The admin endpoints as a FastAPI ``APIRouter`` whose scopes appear in the OpenAPI
    document: ``app.include_router(fastapi_router(gate, prefix="/cloud/keys"))`` (the
    collection then answers at ``/cloud/keys`` and ``/cloud/keys/``).

    Needs the ``fastapi`` extra; defined in :mod:`keystile.admin_fastapi`, imported only
    when called so that this module needs no FastAPI (that one does not import this one).
    """
    from keystile.admin_fastapi import fastapi_router as build

    return build(gate, tags=tags, prefix=prefix)
