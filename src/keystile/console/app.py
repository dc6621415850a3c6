"""The console's pages and what they do: a thin surface over the gate's
:class:`~keystile.manager.KeyManager`, the same calls the admin REST API makes, as the
signed-in admin key and within its project."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from keystile.alerts import Alert
from keystile.audit import ACTIONS
from keystile.console import forms, pages, search, views
from keystile.console.access import Access
from keystile.console.pages import e
from keystile.console.rules import RulePages
from keystile.console.session import COOKIE, Session, SessionSigner
from keystile.console.slots import SecretSlots
from keystile.console.web import (
    SECURITY_HEADERS,
    STATIC_TYPES,
    Context,
    Refused,
    base_of,
    cookie_values,
    read_form,
    secured,
)
from keystile.exceptions import (
    FieldError,
    KeyConflict,
    KeyFormatError,
    KeyNotFound,
    KeyValidationError,
    RotationRefused,
    ScopeRefused,
    StoreError,
)
from keystile.gate import Keystile
from keystile.keys import parse_key
from keystile.logs import fields
from keystile.models import ApiKey
from keystile.records import KeyStatus
from keystile.usage import UsageReport

__all__ = ["SECURITY_HEADERS", "Console"]

logger = logging.getLogger("keystile.console")

_GRACES = {"0": "At once", "3600": "1 hour", "86400": "24 hours", "604800": "7 days"}


class Console(RulePages):
    """The console of one gate. :func:`keystile.console.console_app` builds its app."""

    def __init__(
        self,
        gate: Keystile,
        *,
        recent_alerts: int = 1000,
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.gate = gate
        self.manager = gate.manager
        self.catalogue = gate.policy.catalogue
        self.access = Access(self.catalogue, self.manager.now, trusted_proxies)
        self.signer = SessionSigner(gate.hasher)
        self.slots = SecretSlots()
        #: Alerts raised in this process (bounded), newest last; shown on each key's page.
        self.alerts: deque[Alert] = deque(maxlen=recent_alerts)
        gate.alerts.subscribe(self.alerts.append)
        folder = resources.files("keystile.console").joinpath("static")
        self._static = {name: folder.joinpath(name).read_bytes() for name in STATIC_TYPES}

    # -- the app --------------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        page = self._page
        return [
            Route("/", self.home, methods=["GET"]),
            Route("/signin", self.signin, methods=["GET", "POST"]),
            Route("/signout", page(self.signout, write=True), methods=["POST"]),
            Route("/static/{name}", self.static, methods=["GET"]),
            Route("/keys", page(self.keys), methods=["GET"]),
            Route("/keys/new", page(self.new_key), methods=["GET"]),
            Route("/keys/new", page(self.create_key, write=True), methods=["POST"]),
            Route("/created/{slot}", page(self.created), methods=["GET"]),
            Route("/audit", page(self.audit), methods=["GET"]),
            Route("/keys/{key_id}", page(self.key_page), methods=["GET"]),
            Route("/keys/{key_id}/edit", page(self.edit_key), methods=["GET"]),
            Route("/keys/{key_id}/edit", page(self.update_key, write=True), methods=["POST"]),
            Route("/keys/{key_id}/rotate", page(self.rotate_form), methods=["GET"]),
            Route("/keys/{key_id}/rotate", page(self.rotate_key, write=True), methods=["POST"]),
            Route("/keys/{key_id}/revoke", page(self.revoke_form), methods=["GET"]),
            Route("/keys/{key_id}/revoke", page(self.revoke_key, write=True), methods=["POST"]),
            *self.rule_routes(page),
        ]

    def app(self) -> ASGIApp:
        """The console as an ASGI app to mount (it authenticates by its own session)."""
        app = Starlette(routes=self.routes(), exception_handlers={HTTPException: self._http})
        return secured(app)

    async def _http(self, request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):
            raise exc
        titles = {404: "Not found", 405: "Method not allowed"}
        title = titles.get(exc.status_code, "Bad request")
        return self._plain(request, exc.status_code, title, str(exc.detail))

    def _plain(self, request: Request, status: int, title: str, message: str) -> HTMLResponse:
        """A page saying what went wrong, with a way back."""
        base = base_of(request)
        main = f'<p class="notice bad">{e(message)}</p><p><a href="{e(base)}/keys">Keys</a></p>'
        return HTMLResponse(pages.layout(title=title, base=base, main=main), status_code=status)

    def _html(self, ctx: Context, title: str, main: str, current: str = "") -> HTMLResponse:
        nav = pages.nav(ctx.base, ctx.csrf, current)
        project = getattr(ctx.request.state, "project_name", ctx.project)
        return HTMLResponse(
            pages.layout(title=title, base=ctx.base, main=main, project=project, nav=nav)
        )

    # -- sessions -------------------------------------------------------------------------

    async def _admin(self, request: Request) -> tuple[Session, ApiKey] | None:
        """The session and its admin key, read again now; ``None`` when there is none or
        the key may no longer sign in (revoked, expired, no admin scope)."""
        values = cookie_values(request, COOKIE)
        if len(values) > 1:  # one was tossed in by another site of the domain: trust neither
            return None
        session = self.signer.load(values[0] if values else None, self.gate.clock())
        if session is None:
            return None
        record = await self.gate.store.get(session.key_id)
        if record is None or self.access.refusal(request, record) is not None:
            return None
        return session, record

    def _signed_out(self, request: Request, why: str = "") -> Response:
        base = base_of(request)
        target = f"{base}/signin" + (f"?{urlencode({'why': why})}" if why else "")
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(COOKIE, path=base or "/")
        return response

    def _set_cookie(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.signer.dump(session),
            max_age=max(session.expires - int(self.gate.clock()), 1),
            path=base_of(request) or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def _page(
        self, handler: Callable[[Context], Awaitable[Response]], *, write: bool = False
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` for a signed-in admin only; a write also needs the session's CSRF
        token and an Origin (when sent) of this server. The session's expiry moves on."""

        async def endpoint(request: Request) -> Response:
            try:
                found = await self._admin(request)
            except StoreError:
                return self._plain(request, 503, "Unavailable", "The key store cannot be reached.")
            if found is None:
                if write:
                    return self._plain(
                        request, 403, "Signed out", "Your session has ended: sign in again."
                    )
                cookies = len(cookie_values(request, COOKIE))
                why = "signin" if not cookies else "cookies" if cookies > 1 else ""
                return self._signed_out(request, why)
            session, admin = found
            try:
                form: dict[str, list[str]] = {}
                if write:
                    form = await read_form(request)
                    if not self.signer.csrf_ok(session, (form.get("csrf") or [""])[0]):
                        raise Refused(
                            403,
                            "Refused",
                            "The form's security token is missing or wrong: reload the "
                            "page and try again.",
                        )
                csrf = self.signer.csrf(session)
                address = self.access.address(request)
                ctx = Context(request, admin, session, csrf, base_of(request), form, address)
                request.state.project_name = await self.project_name(ctx.project)
                response = await handler(ctx)
            except Refused as refused:
                response = self._plain(request, refused.status, refused.title, refused.message)
            except KeyNotFound:
                response = self._plain(request, 404, "Not found", "There is no key with this id.")
            except ScopeRefused as exc:
                response = self._plain(request, 403, "Refused", str(exc))
            except RotationRefused as exc:
                response = self._plain(request, 409, "Cannot rotate", str(exc))
            except KeyConflict as exc:
                response = self._plain(request, 409, "Conflict", str(exc))
            except KeyValidationError as exc:
                message = "; ".join(str(x) for x in exc.errors)
                response = self._plain(request, 400, "Bad request", message)
            except StoreError:
                response = self._plain(
                    request, 503, "Unavailable", "The key store cannot be reached; try again."
                )
            if request.url.path.endswith("/signout"):
                return response
            self._set_cookie(request, response, self.signer.refreshed(session, self.gate.clock()))
            return response

        endpoint.__name__ = f"console_{handler.__name__}"
        return endpoint

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{base_of(request)}/keys", status_code=303)

    async def signin(self, request: Request) -> Response:
        base = base_of(request)
        message = ""
        status = 200
        if request.method == "POST":
            try:
                form = await read_form(request)
            except Refused as refused:
                return self._plain(request, refused.status, refused.title, refused.message)
            token = (form.get("key") or [""])[0].strip()
            try:
                parse_key(token, self.gate.policy.prefixes)
                record = await self.gate.store.find(self.gate.hasher.digest(token))
            except KeyFormatError:
                record = None
            except StoreError:
                return self._plain(request, 503, "Unavailable", "The key store cannot be reached.")
            why = (
                "This is not a valid key."
                if record is None
                else self.access.refusal(request, record)
            )
            client = self.access.address(request)
            shown = record.id if record is not None else "(no key)"
            if record is not None and why is None:
                logger.info(
                    "console: %s signed in from %s",
                    shown,
                    client,
                    extra=fields("console.signed_in", key_id=shown, client_ip=client),
                )
                session = self.signer.new(record.id, self.gate.clock())
                response = RedirectResponse(f"{base}/keys", status_code=303)
                self._set_cookie(request, response, session)
                return response
            self.access.log_refused(shown, client, why or "")
            message, status = why or "", 401
        elif request.query_params.get("why") == "signin":
            message = "Sign in to continue."
        elif request.query_params.get("why") == "cookies":
            message = (
                "Two console cookies reached the server: another site of this domain may have "
                "set one. Clear this site's cookies in the browser, then sign in."
            )
        main = views.signin_form(base, message)
        page = pages.layout(title="Sign in", base=base, main=main)
        return HTMLResponse(page, status_code=status)

    async def signout(self, ctx: Context) -> Response:
        return self._signed_out(ctx.request)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._static:
            return self._plain(request, 404, "Not found", "No such file.")
        return Response(self._static[name], media_type=STATIC_TYPES[name])

    # -- keys -----------------------------------------------------------------------------

    async def keys(self, ctx: Context) -> Response:
        params = ctx.request.query_params
        errors = []
        kind, status = params.get("type") or None, params.get("status") or None
        query = (params.get("q") or "").strip()
        names = self.manager.policy.names
        if kind is not None and kind not in names:
            errors.append(f"type must be one of {', '.join(names)}")
        if status is not None and status not in set(KeyStatus):
            errors.append("status must be one of active, rotated, revoked, expired")
        if len(query) > 200:
            errors.append("the search is longer than 200 characters")
        if errors:
            raise Refused(400, "Bad request", "; ".join(errors))
        shown, after = await search.find(
            self.manager, ctx.project, kind, status, query.casefold(), params.get("cursor") or None
        )
        rows = await self.manager.describe(shown)

        fields = (
            '<div><label for="q">Name</label>'
            f'<input type="search" id="q" name="q" value="{e(query)}"></div>'
            '<div><label for="type">Type</label><select id="type" name="type">'
            f"{forms.options(('', *names), kind)}</select></div>"
            '<div><label for="status">Status</label><select id="status" name="status">'
            f"{forms.options(('', *KeyStatus), status)}</select></div>"
        )
        filters = forms.filters(f"{ctx.base}/keys", fields)
        pager = ""
        if after is not None:
            more = {"q": query, "type": kind or "", "status": status or "", "cursor": after}
            pager = (
                f'<nav class="pager" aria-label="Pages"><a href="{e(ctx.base)}/keys?'
                f'{e(urlencode(more))}" rel="next">Next page</a></nav>'
            )
        main = (
            f'<p><a class="button" href="{e(ctx.base)}/keys/new">Create key</a></p>'
            f"{filters}{pages.keys_table(ctx.base, rows)}{pager}"
        )
        return self._html(ctx, "Keys", main, "keys")

    async def new_key(self, ctx: Context) -> Response:
        form = forms.key_form(
            self.catalogue,
            ctx.csrf,
            f"{ctx.base}/keys/new",
            {},
            {},
            new=True,
            policy=self.manager.policy,
        )
        return self._html(ctx, "Create key", form, "keys/new")

    async def create_key(self, ctx: Context) -> Response:
        errors: list[FieldError] = []
        settings = forms.settings(ctx.form, errors)
        settings["type"] = ctx.one("type")
        try:
            if errors:
                raise KeyValidationError(errors)
            created = await self.manager.create(
                settings, actor=ctx.admin, by=ctx.by(), project=ctx.project
            )
        except (KeyValidationError, ScopeRefused) as exc:
            grouped = (
                pages.field_errors(exc.errors)
                if isinstance(exc, KeyValidationError)
                else {"scopes": [str(exc)]}
            )
            form = forms.key_form(
                self.catalogue,
                ctx.csrf,
                f"{ctx.base}/keys/new",
                forms.values_of_form(ctx.form),
                grouped,
                new=True,
                policy=self.manager.policy,
            )
            response = self._html(ctx, "Create key", form, "keys/new")
            response.status_code = 422
            return response
        slot = self.slots.keep(ctx.session.sid, created.key, created.secret.get_secret_value())
        return RedirectResponse(f"{ctx.base}/created/{slot}", status_code=303)

    async def created(self, ctx: Context) -> Response:
        # A HEAD (a link checker, a prefetcher) gets no body: it must not use the secret up.
        keep = ctx.request.method == "HEAD"
        slot = self.slots.take(ctx.request.path_params["slot"], ctx.session.sid, keep=keep)
        if slot is None:
            response = self._html(ctx, "Key already shown", views.shown_already(ctx.base))
            response.status_code = 410
            return response
        return self._html(ctx, "Your new key", views.secret_once(ctx.base, slot))

    # -- one key --------------------------------------------------------------------------

    async def _key(self, ctx: Context) -> ApiKey:
        key_id = ctx.request.path_params["key_id"]
        return await self.manager.get(key_id, project=ctx.project)

    async def edit_key(self, ctx: Context) -> Response:
        key = await self._key(ctx)
        return self._edit_page(ctx, key, forms.values_of_key(key), {})

    def _edit_page(
        self, ctx: Context, key: ApiKey, values: dict[str, Any], errors: dict[str, list[str]]
    ) -> HTMLResponse:
        values = {**values, "type": key.type}
        action = f"{ctx.base}/keys/{key.id}/edit"
        head = f"<p>{e(key.type)} key <code>{e(key.hint)}</code> (<code>{e(key.id)}</code>)</p>"
        form = forms.key_form(self.catalogue, ctx.csrf, action, values, errors, new=False)
        response = self._html(ctx, f"Edit {key.name}", head + form)
        if errors:
            response.status_code = 422
        return response

    async def update_key(self, ctx: Context) -> Response:
        key = await self._key(ctx)
        errors: list[FieldError] = []
        asked = forms.settings(ctx.form, errors)
        before = forms.values_of_key(key)
        changes: dict[str, Any] = {}
        if asked["name"] != key.name:
            changes["name"] = asked["name"]
        if self.catalogue.expand(asked["scopes"]) != self.catalogue.expand(key.scopes):
            changes["scopes"] = asked["scopes"]
        if ctx.one("expires_at").strip() != before["expires_at"]:
            changes["expires_at"] = asked["expires_at"]
        for name in ("allowed_origins", "allowed_ips"):
            if name in asked and asked[name] != list(getattr(key, name)):
                changes[name] = asked[name]
        try:
            if errors:
                raise KeyValidationError(errors)
            updated = await self.manager.update(
                key.id, changes, actor=ctx.admin, by=ctx.by(), project=ctx.project
            )
        except (KeyValidationError, ScopeRefused) as exc:
            grouped = (
                pages.field_errors(exc.errors)
                if isinstance(exc, KeyValidationError)
                else {"body": [str(exc)]}
            )
            return self._edit_page(ctx, key, forms.values_of_form(ctx.form), grouped)
        return RedirectResponse(f"{ctx.base}/keys/{updated.id}?saved=1", status_code=303)

    async def rotate_form(self, ctx: Context) -> Response:
        key = await self._key(ctx)
        main = views.rotate_form(ctx.base, ctx.csrf, key, _GRACES)
        return self._html(ctx, f"Rotate {key.name}", main)

    async def rotate_key(self, ctx: Context) -> Response:
        key = await self._key(ctx)
        grace = ctx.one("grace")
        if grace not in _GRACES:
            raise KeyValidationError.single("grace", f"must be one of {', '.join(_GRACES)}")
        rotated = await self.manager.rotate(
            key.id, grace=int(grace), actor=ctx.admin, by=ctx.by(), project=ctx.project
        )
        slot = self.slots.keep(ctx.session.sid, rotated.key, rotated.secret.get_secret_value())
        return RedirectResponse(f"{ctx.base}/created/{slot}", status_code=303)

    async def revoke_form(self, ctx: Context) -> Response:
        key = await self._key(ctx)
        main = views.revoke_form(ctx.base, ctx.csrf, key)
        return self._html(ctx, f"Revoke {key.name}?", main)

    async def revoke_key(self, ctx: Context) -> Response:
        key = await self._key(ctx)
        await self.manager.revoke(key.id, by=ctx.by(), project=ctx.project)
        return RedirectResponse(f"{ctx.base}/keys/{key.id}?revoked=1", status_code=303)

    async def key_page(self, ctx: Context) -> Response:
        key = await self._key(ctx)
        [info] = await self.manager.describe([key])
        hour = await self.manager.usage(key.id, project=ctx.project, granularity="minute")
        month = await self.manager.usage(key.id, project=ctx.project, granularity="day")
        if not isinstance(hour, UsageReport) or not isinstance(month, UsageReport):
            raise TypeError("a key's usage came back as an overview")  # never: a key id given
        params = ctx.request.query_params
        notice = ""
        if params.get("saved"):
            notice = '<p class="notice" role="status">Saved.</p>'
        elif params.get("revoked"):
            notice = '<p class="notice" role="status">The key is revoked.</p>'
        main = [notice, *views.key_usage(ctx.base, key, info, hour, month, self.manager.policy)]
        main.append(await self.alerts_section(ctx, key))
        return self._html(ctx, key.name, "".join(main))

    async def alerts_section(self, ctx: Context, key: ApiKey) -> str:
        """The alerts raised for ``key`` in this process, and the rules in force for it
        (its overrides, its project's, the default) with a link to edit them."""
        raised = [a for a in reversed(self.alerts) if a.key_id == key.id][:20]
        return views.alerts_section(raised, await self.rules_summary(ctx, key))

    # -- the audit trail ------------------------------------------------------------------

    async def audit(self, ctx: Context) -> Response:
        params = ctx.request.query_params
        wanted = {
            name: params.get(name) or None for name in ("key_id", "action", "outcome", "cursor")
        }
        page = await self.manager.history(project=ctx.project, limit=search.PAGE_SIZE, **wanted)

        fields = (
            '<div><label for="key_id">Key id</label><input type="text" id="key_id" '
            f'name="key_id" value="{e(wanted["key_id"] or "")}"></div>'
            '<div><label for="action">Action</label><select id="action" name="action">'
            f"{forms.options(('', *ACTIONS), wanted['action'])}</select></div>"
            '<div><label for="outcome">Outcome</label><select id="outcome" name="outcome">'
            f"{forms.options(('', 'ok', 'refused'), wanted['outcome'])}</select></div>"
        )
        table = views.audit_table(page.events)
        pager = ""
        if page.next is not None:
            more = {k: v for k, v in wanted.items() if v and k != "cursor"}
            more["cursor"] = page.next
            pager = (
                f'<nav class="pager" aria-label="Pages"><a href="{e(ctx.base)}/audit?'
                f'{e(urlencode(more))}" rel="next">Older events</a></nav>'
            )
        main = forms.filters(f"{ctx.base}/audit", fields) + table + pager
        return self._html(ctx, "Audit trail", main, "audit")
