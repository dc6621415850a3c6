"""The admin REST API as a FastAPI router, so its endpoints, bodies and scopes appear in the
OpenAPI document (needs the ``fastapi`` extra)::

    app = FastAPI()
    app.add_middleware(KeystileMiddleware, gate=gate)
    app.include_router(fastapi_router(gate, prefix="/cloud/keys"))

With ``prefix=`` the collection answers at the prefix itself (``GET``/``POST /cloud/keys``)
as at ``/cloud/keys/``; ``include_router(fastapi_router(gate), prefix=...)`` serves it at
``/cloud/keys/`` only (the bare path then answers with a redirect).

Each endpoint requires its scope through ``Security(keystile.fastapi.api_key, scopes=[...])``
and then runs the same handler (:class:`~keystile.admin_handlers.AdminAPI`) as the
Starlette routes of :mod:`keystile.admin`, so the answers — the error envelope included —
are identical. Bodies and query parameters are parsed by those handlers, not by FastAPI;
their schemas are declared for the document only.
The same bounds hold: ``admin:manage_keys`` grants, changes and rotates only scopes the
calling key holds itself (see :mod:`keystile.admin`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

from fastapi import APIRouter, Request, Security
from fastapi.responses import Response

from keystile.admin_handlers import MANAGE_KEYS, VIEW_USAGE, AdminAPI
from keystile.alerts import AlertRules
from keystile.audit import ACTIONS
from keystile.fastapi import api_key
from keystile.gate import Keystile
from keystile.manager import UPDATABLE_FIELDS, KeyStatus
from keystile.models import ApiKey, KeySettings
from keystile.rotation import MAX_GRACE

__all__ = ["fastapi_router"]

ManageKeys = Annotated[ApiKey, Security(api_key, scopes=[MANAGE_KEYS])]
ViewUsage = Annotated[ApiKey, Security(api_key, scopes=[VIEW_USAGE])]


def _inline(schema: Any, defs: dict[str, Any]) -> Any:
    """``schema`` with its local ``#/$defs/...`` references replaced by their definitions:
    inside an operation, such references would point at the document's root."""
    if isinstance(schema, dict):
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in schema.items() if k != "$defs"}
    if isinstance(schema, list):
        return [_inline(v, defs) for v in schema]
    return schema


def _settings_schema(types: Sequence[str]) -> dict[str, Any]:
    schema = KeySettings.model_json_schema()
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}))
    inlined["properties"]["type"] = _type_schema(types)
    return inlined


def _type_schema(types: Sequence[str]) -> dict[str, Any]:
    """A key type: one the gate's policy declares."""
    return {"title": "Type", "type": "string", "enum": [str(t) for t in types]}


def _body(schema: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema}},
        }
    }


def _update_schema(settings: dict[str, Any]) -> dict[str, Any]:
    properties = settings["properties"]
    return {
        "title": "KeyUpdate",
        "description": "The fields to change; each replaces the old value whole.",
        "type": "object",
        "properties": {name: properties[name] for name in UPDATABLE_FIELDS},
        "additionalProperties": False,
    }


_ROTATE_SCHEMA = {
    "title": "Rotation",
    "type": "object",
    "properties": {
        "grace_seconds": {
            "type": "integer",
            "minimum": 0,
            "maximum": int(MAX_GRACE.total_seconds()),
            "default": 86_400,
            "description": "How long the old key keeps working.",
        }
    },
    "additionalProperties": False,
}

# A page's size and where it starts: the same on every listing.
_PAGING: list[dict[str, Any]] = [
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    },
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "The previous page's `next`.",
        "schema": {"type": "string"},
    },
]


def _list_parameters(types: Sequence[str]) -> list[dict[str, Any]]:
    type_filter = {"name": "type", "in": "query", "required": False}
    return [{**type_filter, "schema": _type_schema(types)}, *_LIST_FILTERS]


_LIST_FILTERS = [
    {
        "name": "status",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": [s.value for s in KeyStatus]},
    },
    {
        "name": "meta",
        "in": "query",
        "required": False,
        "style": "deepObject",
        "explode": True,
        "description": "Metadata filters, sent as meta.<name>=<value>.",
        "schema": {"type": "object", "additionalProperties": {"type": "string"}},
    },
    *_PAGING,
]


_AUDIT_PARAMETERS: list[dict[str, Any]] = [
    {"name": "key_id", "in": "query", "required": False, "schema": {"type": "string"}},
    {
        "name": "action",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": list(ACTIONS)},
    },
    {
        "name": "outcome",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["ok", "refused"]},
    },
    {
        "name": "actor",
        "in": "query",
        "required": False,
        "description": "A key id, `command line` or `python`.",
        "schema": {"type": "string"},
    },
    *_PAGING,
]


def _responses(*pairs: tuple[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"description": text} for status, text in pairs}


_INVALID = (422, "Invalid input: `error.fields` lists each field's problem.")
_NOT_FOUND = (404, "No key has this id.")
_BEYOND = (
    403,
    "`insufficient_scope`: the calling key lacks the scopes named, or the key it would"
    " change holds them.",
)


_PROJECT_SCHEMA = {
    "title": "ProjectUpdate",
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 200},
        "description": {"type": "string", "maxLength": 1000},
    },
    "additionalProperties": False,
}


def _rules_schema() -> dict[str, Any]:
    schema = AlertRules.model_json_schema()
    return {
        "title": "AlertRuleSettings",
        "description": "The rules this level sets; the others are inherited.",
        "type": "object",
        "properties": schema["properties"],
        "additionalProperties": False,
    }


def _rule_routes(router: APIRouter, api: AdminAPI, path: str, what: str) -> None:
    """GET (``admin:view_usage``), PUT, PATCH and DELETE (``admin:manage_keys``) of ``path``."""
    found = (_NOT_FOUND,) if "{key_id}" in path else ()

    async def read(request: Request, caller: ViewUsage) -> Response:
        return await api.alert_rules(request)

    async def write(request: Request, caller: ManageKeys) -> Response:
        return await api.alert_rules(request)

    router.add_api_route(
        path, read, methods=["GET"], summary=f"Show {what}", responses=_responses(*found)
    )
    for method, verb, body in (
        ("PUT", "Set", True),
        ("PATCH", "Change", True),
        ("DELETE", "Clear", False),
    ):
        router.add_api_route(
            path,
            write,
            methods=[method],
            summary=f"{verb} {what}",
            openapi_extra=_body(_rules_schema()) if body else None,
            responses=_responses(*found, *((_INVALID,) if body else ())),
            operation_id=f"{verb.lower()}_{'key_' if found else ''}alert_rules",
        )


def fastapi_router(
    gate: Keystile, *, tags: Sequence[str] = ("keys",), prefix: str = ""
) -> APIRouter:
    """The admin API as an ``APIRouter`` (see the module docstring); under ``prefix``
    (e.g. ``"/cloud/keys"``) the collection answers at the prefix itself too."""
    api = AdminAPI(gate.manager)
    prefix = prefix.rstrip("/")
    router = APIRouter(tags=list(tags), prefix=prefix)
    settings = _settings_schema(gate.policy.names)
    collection = "" if prefix else "/"

    @router.post(
        collection,
        status_code=201,
        summary="Create a key",
        openapi_extra=_body(settings),
        responses=_responses(
            (201, "The key's record and its secret, shown this once."),
            (400, "The body is not JSON."),
            (403, "`insufficient_scope`: the calling key lacks a scope it would grant."),
            _INVALID,
        ),
    )
    async def create_key(request: Request, caller: ManageKeys) -> Response:
        return await api.create(request)

    @router.get(
        collection,
        summary="List keys",
        openapi_extra={"parameters": _list_parameters(gate.policy.names)},
        responses=_responses((200, "A page of key records and the next cursor."), _INVALID),
    )
    async def list_keys(request: Request, caller: ManageKeys) -> Response:
        return await api.list(request)

    if prefix:  # the collection with a slash too, as documented elsewhere
        router.add_api_route(
            "/", create_key, methods=["POST"], status_code=201, include_in_schema=False
        )
        router.add_api_route("/", list_keys, methods=["GET"], include_in_schema=False)

    @router.get("/usage", summary="Usage of all keys")
    async def usage(request: Request, caller: ViewUsage) -> Response:
        return await api.usage(request)

    @router.get(
        "/audit",
        summary="The audit trail",
        openapi_extra={"parameters": _AUDIT_PARAMETERS},
        responses=_responses((200, "Events, newest first, and the next cursor."), _INVALID),
    )
    async def audit(request: Request, caller: ViewUsage) -> Response:
        return await api.audit(request)

    @router.get("/project", summary="The calling key's project")
    async def project(request: Request, caller: ViewUsage) -> Response:
        return await api.project(request)

    @router.patch(
        "/project",
        summary="Rename the calling key's project",
        openapi_extra=_body(_PROJECT_SCHEMA),
        responses=_responses((200, "The project."), _INVALID),
    )
    async def update_project(request: Request, caller: ManageKeys) -> Response:
        return await api.update_project(request)

    _rule_routes(router, api, "/alert-rules", "the project's alert rules")
    _rule_routes(router, api, "/{key_id}/alert-rules", "a key's alert-rule overrides")

    @router.get(
        "/{key_id}",
        summary="Show a key",
        responses=_responses((200, "The key's record."), _NOT_FOUND),
    )
    async def get_key(key_id: str, request: Request, caller: ManageKeys) -> Response:
        return await api.get(request)

    @router.patch(
        "/{key_id}",
        summary="Update a key",
        openapi_extra=_body(_update_schema(settings)),
        responses=_responses((200, "The updated record."), _BEYOND, _NOT_FOUND, _INVALID),
    )
    async def update_key(key_id: str, request: Request, caller: ManageKeys) -> Response:
        return await api.update(request)

    @router.post(
        "/{key_id}/revoke",
        summary="Revoke a key",
        responses=_responses(
            (200, "The revoked record (revoking twice is harmless)."), _NOT_FOUND
        ),
    )
    async def revoke_key(key_id: str, request: Request, caller: ManageKeys) -> Response:
        return await api.revoke(request)

    @router.post(
        "/{key_id}/rotate",
        status_code=201,
        summary="Rotate a key",
        openapi_extra=_body(_ROTATE_SCHEMA, required=False),
        responses=_responses(
            (201, "The successor's record, its secret (shown once) and the previous record."),
            _BEYOND,
            _NOT_FOUND,
            (409, "The key is revoked, expired or already rotated."),
            _INVALID,
        ),
    )
    async def rotate_key(key_id: str, request: Request, caller: ManageKeys) -> Response:
        return await api.rotate(request)

    @router.get(
        "/{key_id}/usage",
        summary="Usage of one key",
        responses=_responses((200, "The key's usage report."), _NOT_FOUND),
    )
    async def key_usage(key_id: str, request: Request, caller: ViewUsage) -> Response:
        return await api.usage(request)

    return router
