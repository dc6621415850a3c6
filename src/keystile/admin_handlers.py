"""The admin endpoints as plain ``request -> response`` handlers (:class:`AdminAPI`), with
the scopes they need and the error envelope (:func:`error_response`).

They check no scopes and read only the request: :mod:`keystile.admin` wraps them in
Starlette routes that check the scopes, :mod:`keystile.admin_fastapi` in a FastAPI router
whose scopes show in the OpenAPI document. Both import this module, and neither imports the
other's framework (see :mod:`keystile.admin` for the endpoints and their answers).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from keystile.audit import Actor
from keystile.exceptions import (
    FieldError,
    KeyConflict,
    KeyNotFound,
    KeyValidationError,
    RotationRefused,
    ScopeRefused,
    StoreError,
    StoreUnavailable,
)
from keystile.logs import fields
from keystile.manager import DEFAULT_PAGE_SIZE, KeyManager, key_status, record_json
from keystile.models import ApiKey
from keystile.responses import Refusals
from keystile.routing import PRINCIPAL, REFUSALS

__all__ = [
    "MANAGE_KEYS",
    "MAX_BODY",
    "VIEW_USAGE",
    "AdminAPI",
    "error_response",
    "invalid_response",
]

# One logger for the admin API, whichever framework serves it.
logger = logging.getLogger("keystile.admin")

MANAGE_KEYS = "admin:manage_keys"
VIEW_USAGE = "admin:view_usage"

MAX_BODY = 64 * 1024
_LIST_PARAMETERS = ("type", "status", "limit", "cursor")
_ROTATION_CODES = {
    "revoked": "key_revoked",
    "expired": "key_expired",
    "rotated": "key_already_rotated",
}
# Responses that carry a secret must not be stored by any cache (RFC 9111 §5.2.2.5).
_NO_STORE = {"cache-control": "no-store"}


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    fields: Sequence[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The error envelope, with a field-by-field list when there is one."""
    error: dict[str, Any] = {"code": code, "message": message}
    if fields is not None:
        error["fields"] = [{"field": f.field, "message": f.message} for f in fields]
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def invalid_response(errors: Sequence[FieldError]) -> JSONResponse:
    """The 422 of input that failed validation: the envelope with each field's problem."""
    count = len(errors)
    noun = "field is" if count == 1 else "fields are"
    return error_response(
        422,
        "validation_failed",
        f"{count} {noun} not valid: " + "; ".join(str(e) for e in errors),
        fields=errors,
    )


class _Answer(Exception):
    """Raised inside a handler to answer at once with ``response``."""

    def __init__(self, response: Response) -> None:
        self.response = response


async def _json_object(request: Request, *, required: bool) -> dict[str, Any]:
    """The request body as a JSON object (``{}`` when it is empty and not ``required``)."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise _Answer(
                error_response(413, "too_large", f"The body is larger than {MAX_BODY} bytes.")
            )
    if not body.strip():
        if not required:
            return {}
        raise _Answer(error_response(400, "invalid_json", "The body must be a JSON object."))
    try:
        data = json.loads(bytes(body))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise _Answer(error_response(400, "invalid_json", "The body is not valid JSON.")) from None
    if not isinstance(data, dict):
        raise KeyValidationError.single("body", "must be a JSON object")
    return data


def _by(request: Request) -> Actor:
    """Who acts, for the audit trail: the calling key, from the client's address."""
    client = request.client
    return Actor.of_key(_actor(request), client.host if client else None)


def _logged(event: str, request: Request, key_id: str) -> dict[str, Any]:
    client = request.client
    return fields(
        event,
        key_id=key_id,
        actor=_caller(request),
        client_ip=client.host if client else None,
    )


def _project(request: Request) -> str:
    """The calling key's project: the only one whose keys, usage and audit it may see
    (another project's key ids answer 404, as ids that do not exist)."""
    return _actor(request).project


def _caller(request: Request) -> str:
    principal = request.scope.get(PRINCIPAL)
    return principal.key.id if principal is not None else "?"


def _actor(request: Request) -> ApiKey:
    """The calling key, whose scopes bound what it may do; refused when there is none (the
    handlers are used without the routes' scope checks, or without the middleware)."""
    principal = request.scope.get(PRINCIPAL)
    if principal is None:
        raise _Answer(error_response(401, "missing_api_key", "An API key is required."))
    key: ApiKey = principal.key
    return key


def _scope_refusal(request: Request, exc: ScopeRefused) -> Response:
    """403 ``insufficient_scope`` with the middleware's RFC 6750 challenge naming ``missing``."""
    logger.warning(
        "admin: %s was refused: %s",
        _caller(request),
        exc,
        extra=fields("admin.refused", code="insufficient_scope", actor=_caller(request)),
    )
    refusals: Refusals = request.scope[REFUSALS]  # present with a principal
    return refusals.insufficient_scope(exc.missing, str(exc)).response()


def _key_id(request: Request) -> str:
    key_id: str = request.path_params["key_id"]
    return key_id


class AdminAPI:
    """The admin endpoints as plain ``request -> response`` handlers, shared by the
    Starlette routes (:func:`keystile.admin.admin_routes`) and the FastAPI router
    (:func:`keystile.admin_fastapi.fastapi_router`).

    The handlers check no scopes: the routes around them do.
    """

    def __init__(self, manager: KeyManager) -> None:
        self.manager = manager

    async def _answer(
        self, request: Request, handler: Callable[[], Awaitable[Response]]
    ) -> Response:
        try:
            return await handler()
        except _Answer as answer:
            return answer.response
        except ScopeRefused as exc:
            return _scope_refusal(request, exc)
        except KeyValidationError as exc:
            return invalid_response(exc.errors)
        except KeyNotFound:
            return error_response(404, "not_found", "There is no key with this id.")
        except RotationRefused as exc:
            return error_response(409, _ROTATION_CODES.get(exc.reason, "conflict"), str(exc))
        except KeyConflict as exc:
            return error_response(409, "conflict", str(exc))
        except StoreUnavailable:
            return error_response(
                503,
                "store_unavailable",
                "The key store cannot be reached; try again shortly.",
                headers={"retry-after": "1"},
            )
        except StoreError as exc:
            logger.error(
                "admin API: the key store failed: %s", exc, extra=fields("admin.store_failed")
            )
            return error_response(503, "store_error", "The key store failed; try again shortly.")

    def _new(self, record: ApiKey) -> dict[str, Any]:
        """A key just made, as JSON: never used yet."""
        return record_json(record, status=key_status(record, self.manager.now()))

    async def _records(self, records: Sequence[ApiKey]) -> list[dict[str, Any]]:
        """Records as JSON, with their status now and their last use."""
        return [info.json() for info in await self.manager.describe(records)]

    async def create(self, request: Request) -> Response:
        async def handle() -> Response:
            actor = _actor(request)
            data = await _json_object(request, required=True)
            created = await self.manager.create(
                data, actor=actor, by=_by(request), project=actor.project
            )
            logger.info(
                "admin: %s created key %s",
                _caller(request),
                created.key.id,
                extra=_logged("admin.created", request, created.key.id),
            )
            body = {"key": self._new(created.key), "secret": created.secret.get_secret_value()}
            return JSONResponse(body, status_code=201, headers=_NO_STORE)

        return await self._answer(request, handle)

    async def list(self, request: Request) -> Response:
        async def handle() -> Response:
            params = request.query_params
            errors: list[FieldError] = []
            given: dict[str, str] = {}
            metadata: dict[str, str] = {}
            for name in dict.fromkeys(params.keys()):
                values = params.getlist(name)
                if len(values) > 1:
                    errors.append(FieldError(name, "give this parameter once"))
                elif name.startswith("meta.") and len(name) > len("meta."):
                    metadata[name.removeprefix("meta.")] = values[0]
                elif name in _LIST_PARAMETERS:
                    given[name] = values[0]
                else:
                    errors.append(
                        FieldError(
                            name,
                            "unknown parameter (known: type, status, meta.<name>, limit, cursor)",
                        )
                    )
            limit = DEFAULT_PAGE_SIZE
            if "limit" in given:
                text = given["limit"]
                if text.isascii() and text.isdigit() and len(text) <= 6:
                    limit = int(text)
                else:
                    errors.append(FieldError("limit", "must be a whole number, 1 to 1000"))
            if errors:
                return invalid_response(errors)
            page = await self.manager.list(
                project=_project(request),
                type=given.get("type"),
                status=given.get("status"),
                metadata=metadata,
                cursor=given.get("cursor"),
                limit=limit,
            )
            return JSONResponse({"keys": await self._records(page.keys), "next": page.next})

        return await self._answer(request, handle)

    async def get(self, request: Request) -> Response:
        async def handle() -> Response:
            record = await self.manager.get(_key_id(request), project=_project(request))
            return JSONResponse({"key": (await self._records([record]))[0]})

        return await self._answer(request, handle)

    async def update(self, request: Request) -> Response:
        async def handle() -> Response:
            key_id, actor = _key_id(request), _actor(request)
            data = await _json_object(request, required=True)
            record = await self.manager.update(
                key_id, data, actor=actor, by=_by(request), project=actor.project
            )
            logger.info(
                "admin: %s updated key %s",
                _caller(request),
                key_id,
                extra=_logged("admin.updated", request, key_id),
            )
            return JSONResponse({"key": (await self._records([record]))[0]})

        return await self._answer(request, handle)

    async def revoke(self, request: Request) -> Response:
        async def handle() -> Response:
            key_id = _key_id(request)
            record = await self.manager.revoke(key_id, by=_by(request), project=_project(request))
            logger.info(
                "admin: %s revoked key %s",
                _caller(request),
                key_id,
                extra=_logged("admin.revoked", request, key_id),
            )
            return JSONResponse({"key": (await self._records([record]))[0]})

        return await self._answer(request, handle)

    async def rotate(self, request: Request) -> Response:
        async def handle() -> Response:
            key_id, actor = _key_id(request), _actor(request)
            data = await _json_object(request, required=False)
            unknown = [
                FieldError(name, "unknown field (known: grace_seconds)")
                for name in data
                if name != "grace_seconds"
            ]
            if unknown:
                raise KeyValidationError(unknown)
            grace = data.get("grace_seconds", 86_400)
            if isinstance(grace, bool) or not isinstance(grace, int):
                raise KeyValidationError.single("grace_seconds", "must be a whole number")
            try:
                rotated = await self.manager.rotate(
                    key_id, grace=grace, actor=actor, by=_by(request), project=actor.project
                )
            except KeyValidationError as exc:
                # The manager calls it "grace"; this API calls it "grace_seconds".
                raise KeyValidationError(
                    [
                        FieldError("grace_seconds", e.message) if e.field == "grace" else e
                        for e in exc.errors
                    ]
                ) from None
            logger.info(
                "admin: %s rotated key %s to %s",
                _caller(request),
                key_id,
                rotated.key.id,
                extra=_logged("admin.rotated", request, key_id),
            )
            body = {
                "key": self._new(rotated.key),
                "secret": rotated.secret.get_secret_value(),
                "previous": (await self._records([rotated.previous]))[0],
            }
            return JSONResponse(body, status_code=201, headers=_NO_STORE)

        return await self._answer(request, handle)

    # -- the caller's project and alert rules ----------------------------------------------

    async def project(self, request: Request) -> Response:
        """``GET /project``: the calling key's project (its id as its name if unnamed)."""

        async def handle() -> Response:
            info = await self.manager.project_info(_project(request))
            return JSONResponse({"project": info.model_dump(mode="json")})

        return await self._answer(request, handle)

    async def update_project(self, request: Request) -> Response:
        """``PATCH /project``: rename the calling key's project, or change its description."""

        async def handle() -> Response:
            data = await _json_object(request, required=True)
            info = await self.manager.update_project(_project(request), data, by=_by(request))
            logger.info(
                "admin: %s changed project %s",
                _caller(request),
                info.id,
                extra=_logged("admin.project_updated", request, _caller(request)),
            )
            return JSONResponse({"project": info.model_dump(mode="json")})

        return await self._answer(request, handle)

    async def alert_rules(self, request: Request) -> Response:
        """``GET|PUT|PATCH|DELETE /alert-rules`` (the project's) and ``/{key_id}/alert-rules``
        (a key's overrides): PUT replaces what the level sets, PATCH changes the fields
        given, DELETE removes them all."""

        async def handle() -> Response:
            key_id = request.path_params.get("key_id")
            project, by = _project(request), _by(request)
            data: dict[str, Any] = {}
            if request.method in ("PUT", "PATCH"):
                data = await _json_object(request, required=True)
            replace = request.method == "PUT"
            answer: BaseModel
            if key_id is None:
                if request.method == "DELETE":
                    answer = await self.manager.clear_alert_rules(project=project, by=by)
                elif data or replace:
                    answer = await self.manager.set_alert_rules(
                        data, project=project, replace=replace, by=by
                    )
                else:
                    answer = await self.manager.alert_rules(project)
            elif request.method == "DELETE":
                answer = await self.manager.clear_key_alert_rules(key_id, project=project, by=by)
            elif data or replace:
                answer = await self.manager.set_key_alert_rules(
                    key_id, data, project=project, replace=replace, by=by
                )
            else:
                answer = await self.manager.key_alert_rules(key_id, project=project)
            if request.method != "GET":
                logger.info(
                    "admin: %s set the alert rules of %s",
                    _caller(request),
                    key_id or f"project {project}",
                    extra=_logged("admin.alert_rules", request, key_id or _caller(request)),
                )
            return JSONResponse({"alert_rules": answer.model_dump(mode="json")})

        return await self._answer(request, handle)

    async def audit(self, request: Request) -> Response:
        async def handle() -> Response:
            return await audit_answer(self.manager, request)

        return await self._answer(request, handle)

    async def usage(self, request: Request) -> Response:
        async def handle() -> Response:
            key_id = request.path_params.get("key_id")
            params = request.query_params
            errors = [
                FieldError(name, "unknown query parameter")
                for name in params
                if name not in ("granularity", "start", "end") or key_id is None
            ]
            granularity = params.get("granularity", "minute")
            if granularity not in ("minute", "day"):
                errors.append(FieldError("granularity", "must be 'minute' or 'day'"))
            start, end = _time_param(params, "start", errors), _time_param(params, "end", errors)
            if errors:
                raise KeyValidationError(errors)
            report = await self.manager.usage(
                key_id,
                project=_project(request),
                start=start,
                end=end,
                granularity="day" if granularity == "day" else "minute",
            )
            return JSONResponse(report.model_dump(mode="json"))

        return await self._answer(request, handle)


_AUDIT_PARAMETERS = ("key_id", "action", "outcome", "actor", "limit", "cursor")


async def audit_answer(manager: KeyManager, request: Request) -> Response:
    """``GET /audit``: the audit trail, filtered and paged."""
    params = request.query_params
    errors = [
        FieldError(name, f"unknown parameter (known: {', '.join(_AUDIT_PARAMETERS)})")
        for name in params
        if name not in _AUDIT_PARAMETERS
    ]
    limit_text = params.get("limit", "100")
    if not (limit_text.isascii() and limit_text.isdigit() and len(limit_text) <= 6):
        errors.append(FieldError("limit", "must be a whole number, 1 to 1000"))
    if errors:
        raise KeyValidationError(errors)
    page = await manager.history(
        project=_project(request),
        key_id=params.get("key_id"),
        action=params.get("action"),
        outcome=params.get("outcome"),
        actor=params.get("actor"),
        cursor=params.get("cursor"),
        limit=int(limit_text),
    )
    events = [event.model_dump(mode="json") for event in page.events]
    return JSONResponse({"events": events, "next": page.next})


def _time_param(params: Mapping[str, str], name: str, errors: list[FieldError]) -> datetime | None:
    """An ISO 8601 time with a zone from the query string, or None when absent."""
    text = params.get(name)
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        errors.append(FieldError(name, "must be an ISO 8601 time such as 2027-01-01T00:00:00Z"))
        return None
    if moment.tzinfo is None:
        errors.append(FieldError(name, "needs a time zone, such as Z"))
        return None
    return moment
