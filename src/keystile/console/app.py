"""The console's pages and what they do: a thin surface over the gate's
:class:`~keystile.manager.KeyManager`, the same calls the admin REST API makes, as the
signed-in admin key and within its project."""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystile.alerts import Alert
from keystile.audit import ACTIONS, Actor
from keystile.clock import to_datetime
from keystile.console import pages
from keystile.console.charts import Bucket, bar_chart
from keystile.console.pages import e, when
from keystile.console.session import COOKIE, Session, SessionSigner
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
from keystile.manager import MAX_PAGE_SIZE
from keystile.models import ApiKey, KeyType
from keystile.records import KeyStatus, encode_cursor
from keystile.usage import DAY, MINUTE, UsageReport

__all__ = ["SECURITY_HEADERS", "Console"]

MANAGE_KEYS = "admin:manage_keys"
PAGE_SIZE = 50
_SCAN_BUDGET = 5000  # records a keys page reads at most (the cursor goes on)
_MAX_FORM = 64 * 1024
_SLOTS = 256  # secrets waiting to be shown once
_SLOT_SECONDS = 600
_GRACES = {"0": "At once", "3600": "1 hour", "86400": "24 hours", "604800": "7 days"}

#: Sent with every console answer. No inline script or style anywhere; images are the
#: inline SVG charts (part of the document, not fetched).
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; "
        "object-src 'none'"
    ),
    "x-content-type-options": "nosniff",
    # "no-referrer" would make Chromium send "Origin: null" with the console's own forms.
    "referrer-policy": "same-origin",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
}
_STATIC_TYPES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript"}


class _Page(Exception):
    """Raised in a handler to answer at once with ``response``."""

    def __init__(self, response: Response) -> None:
        self.response = response


def _secured(app: ASGIApp) -> ASGIApp:
    """``app`` with :data:`SECURITY_HEADERS` on every answer, and ``no-store`` on every
    page (they show keys, and one shows a secret): only the static assets may be cached."""

    async def secured(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        static = scope["path"].endswith(("/static/console.css", "/static/console.js"))

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [
                    (k, v)
                    for k, v in message.get("headers", [])
                    if k.decode("latin-1").lower() not in SECURITY_HEADERS
                    and k.lower() != b"cache-control"
                ]
                headers += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                cache = b"public, max-age=300" if static else b"no-store"
                headers.append((b"cache-control", cache))
                message = {**message, "headers": headers}
            await send(message)

        await app(scope, receive, send_secured)

    return secured


@dataclass(frozen=True, slots=True)
class _Context:
    """A signed-in request: the admin key (read again just now), its session, the form."""

    request: Request
    admin: ApiKey
    session: Session
    csrf: str
    base: str
    form: dict[str, list[str]]

    @property
    def project(self) -> str:
        return self.admin.project

    def by(self) -> Actor:
        client = self.request.client
        return Actor.of_key(self.admin, client.host if client else None)

    def one(self, name: str) -> str:
        values = self.form.get(name) or [""]
        return values[0]


@dataclass(slots=True)
class _Slot:
    sid: str
    until: float
    key_id: str
    name: str
    secret: str


def _base(request: Request) -> str:
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.replace(",", "\n").splitlines() if line.strip()]


def _expiry(text: str, errors: list[FieldError]) -> datetime | None:
    if not text.strip():
        return None
    try:
        day = date.fromisoformat(text.strip())
    except ValueError:
        errors.append(FieldError("expires_at", "must be a date such as 2027-01-31"))
        return None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


class Console:
    """The console of one gate. :func:`keystile.console.console_app` builds its app."""

    def __init__(self, gate: Keystile, *, recent_alerts: int = 1000) -> None:
        self.gate = gate
        self.manager = gate.manager
        self.catalogue = gate.policy.catalogue
        self.signer = SessionSigner(gate.hasher)
        self._slots: OrderedDict[str, _Slot] = OrderedDict()
        #: Alerts raised in this process (bounded), newest last; shown on each key's page.
        self.alerts: deque[Alert] = deque(maxlen=recent_alerts)
        gate.alerts.subscribe(self.alerts.append)
        folder = resources.files("keystile.console").joinpath("static")
        self._static = {name: folder.joinpath(name).read_bytes() for name in _STATIC_TYPES}

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
        ]

    def app(self) -> ASGIApp:
        """The console as an ASGI app to mount (it authenticates by its own session)."""
        app = Starlette(routes=self.routes(), exception_handlers={HTTPException: self._http})
        return _secured(app)

    async def _http(self, request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):
            raise exc
        titles = {404: "Not found", 405: "Method not allowed"}
        title = titles.get(exc.status_code, "Bad request")
        return self._plain(request, exc.status_code, title, str(exc.detail))

    def _plain(self, request: Request, status: int, title: str, message: str) -> HTMLResponse:
        """A page saying what went wrong, with a way back."""
        base = _base(request)
        main = f'<p class="notice bad">{e(message)}</p><p><a href="{e(base)}/keys">Keys</a></p>'
        return HTMLResponse(pages.layout(title=title, base=base, main=main), status_code=status)

    def _html(self, ctx: _Context, title: str, main: str, current: str = "") -> HTMLResponse:
        nav = pages.nav(ctx.base, ctx.csrf, current)
        return HTMLResponse(
            pages.layout(title=title, base=ctx.base, main=main, project=ctx.project, nav=nav)
        )

    # -- sessions -------------------------------------------------------------------------

    async def _admin(self, request: Request) -> tuple[Session, ApiKey] | None:
        """The session and its admin key, read again now; ``None`` when there is none or
        the key may no longer sign in (revoked, expired, no admin scope)."""
        session = self.signer.load(request.cookies.get(COOKIE), self.gate.clock())
        if session is None:
            return None
        record = await self.gate.store.get(session.key_id)
        if record is None or self._refusal(record) is not None:
            return None
        return session, record

    def _refusal(self, record: ApiKey) -> str | None:
        """Why this key cannot use the console, or ``None``."""
        if not record.active(self.manager.now()):
            return "This key is revoked or expired."
        if not self.catalogue.grants(record.scopes, MANAGE_KEYS):
            return f"This key does not hold {MANAGE_KEYS}: sign in with an admin key."
        return None

    def _signed_out(self, request: Request, why: str = "") -> Response:
        base = _base(request)
        target = f"{base}/signin" + (f"?{urlencode({'why': why})}" if why else "")
        response = RedirectResponse(target, status_code=303)
        response.delete_cookie(COOKIE, path=base or "/")
        return response

    def _set_cookie(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.signer.dump(session),
            max_age=max(session.expires - int(self.gate.clock()), 1),
            path=_base(request) or "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def _page(
        self, handler: Callable[[_Context], Awaitable[Response]], *, write: bool = False
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
                return self._signed_out(request, "signin" if COOKIE not in request.cookies else "")
            session, admin = found
            try:
                form: dict[str, list[str]] = {}
                if write:
                    self._same_origin(request)
                    form = await self._form(request)
                    if not self.signer.csrf_ok(session, (form.get("csrf") or [""])[0]):
                        raise _Page(
                            self._plain(
                                request,
                                403,
                                "Refused",
                                "The form's security token is missing or wrong: reload the "
                                "page and try again.",
                            )
                        )
                ctx = _Context(
                    request, admin, session, self.signer.csrf(session), _base(request), form
                )
                response = await handler(ctx)
            except _Page as page:
                response = page.response
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

    def _same_origin(self, request: Request) -> None:
        origin = request.headers.get("origin")
        if origin is None:  # SameSite=Strict and the CSRF token still stand
            return
        own = f"{request.url.scheme}://{request.url.netloc}"
        if origin != own:
            raise _Page(self._plain(request, 403, "Refused", "A form from another site."))

    async def _form(self, request: Request) -> dict[str, list[str]]:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/x-www-form-urlencoded":
            raise _Page(self._plain(request, 415, "Bad request", "Send the console's forms."))
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > _MAX_FORM:
                raise _Page(self._plain(request, 413, "Too large", "The form is too large."))
        try:
            pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000)
        except (UnicodeDecodeError, ValueError):
            raise _Page(
                self._plain(request, 400, "Bad request", "The form could not be read.")
            ) from None
        form: dict[str, list[str]] = {}
        for name, value in pairs:
            form.setdefault(name, []).append(value)
        return form

    async def home(self, request: Request) -> Response:
        return RedirectResponse(f"{_base(request)}/keys", status_code=303)

    async def signin(self, request: Request) -> Response:
        base = _base(request)
        message = ""
        status = 200
        if request.method == "POST":
            try:
                self._same_origin(request)
                form = await self._form(request)
            except _Page as refused:
                return refused.response
            token = (form.get("key") or [""])[0].strip()
            try:
                parse_key(token, self.gate.policy.prefixes)
                record = await self.gate.store.find(self.gate.hasher.digest(token))
            except KeyFormatError:
                record = None
            except StoreError:
                return self._plain(request, 503, "Unavailable", "The key store cannot be reached.")
            why = "This is not a valid key." if record is None else self._refusal(record)
            if record is not None and why is None:
                session = self.signer.new(record.id, self.gate.clock())
                response = RedirectResponse(f"{base}/keys", status_code=303)
                self._set_cookie(request, response, session)
                return response
            message, status = why or "", 401
        elif request.query_params.get("why") == "signin":
            message = "Sign in to continue."
        if message:
            notice = f'<p class="notice bad" role="alert" id="signin-error">{e(message)}</p>'
        else:
            notice = ""
        described = ' aria-describedby="signin-error"' if message else ""
        main = (
            f'{notice}<form method="post" action="{e(base)}/signin">'
            '<div class="field"><label for="key">Admin key</label>'
            f'<input type="password" id="key" name="key" class="wide" '
            f"required autofocus{described}>"
            '<p class="hint">A key holding admin:manage_keys. It is checked once and not kept: '
            "the browser gets a session of 30 minutes, renewed while you use the console.</p>"
            '</div><button type="submit">Sign in</button></form>'
        )
        page = pages.layout(title="Sign in", base=base, main=main)
        return HTMLResponse(page, status_code=status)

    async def signout(self, ctx: _Context) -> Response:
        return self._signed_out(ctx.request)

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self._static:
            return self._plain(request, 404, "Not found", "No such file.")
        return Response(self._static[name], media_type=_STATIC_TYPES[name])

    # -- keys -----------------------------------------------------------------------------

    async def keys(self, ctx: _Context) -> Response:
        params = ctx.request.query_params
        errors = []
        kind, status = params.get("type") or None, params.get("status") or None
        query = (params.get("q") or "").strip()
        if kind is not None and kind not in set(KeyType):
            errors.append("type must be one of dev, prod, client")
        if status is not None and status not in set(KeyStatus):
            errors.append("status must be one of active, rotated, revoked, expired")
        if len(query) > 200:
            errors.append("the search is longer than 200 characters")
        if errors:
            raise _Page(self._plain(ctx.request, 400, "Bad request", "; ".join(errors)))
        shown, after = await self._find(
            ctx.project, kind, status, query.casefold(), params.get("cursor") or None
        )
        rows = await self.manager.describe(shown)

        def option(value: str, current: str | None) -> str:
            mark = " selected" if value == current else ""
            return f'<option value="{e(value)}"{mark}>{e(value or "any")}</option>'

        filters = (
            f'<form class="filters" method="get" action="{e(ctx.base)}/keys" role="search">'
            '<div><label for="q">Name</label>'
            f'<input type="search" id="q" name="q" value="{e(query)}"></div>'
            '<div><label for="type">Type</label><select id="type" name="type">'
            + "".join(option(v, kind) for v in ("", *KeyType))
            + '</select></div><div><label for="status">Status</label>'
            '<select id="status" name="status">'
            + "".join(option(v, status) for v in ("", *KeyStatus))
            + '</select></div><button type="submit" class="secondary">Filter</button></form>'
        )
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

    async def _find(
        self,
        project: str,
        kind: str | None,
        status: str | None,
        query: str,
        cursor: str | None,
    ) -> tuple[list[ApiKey], str | None]:
        """A page of the project's keys matching the filters, and the cursor after it;
        reading at most :data:`_SCAN_BUDGET` records."""
        if not query:  # the manager's own paging: it reads no more than it needs
            page = await self.manager.list(
                project=project, type=kind, status=status, cursor=cursor, limit=PAGE_SIZE
            )
            return list(page.keys), page.next
        found: list[ApiKey] = []
        scanned = 0
        while True:
            page = await self.manager.list(
                project=project, type=kind, status=status, cursor=cursor, limit=MAX_PAGE_SIZE
            )
            for record in page.keys:
                if query and query not in record.name.casefold():
                    continue
                if len(found) == PAGE_SIZE:
                    return found, encode_cursor(found[-1].id)
                found.append(record)
            scanned += len(page.keys)
            cursor = page.next
            if cursor is None or scanned >= _SCAN_BUDGET:
                return found, cursor

    def _key_form(
        self,
        ctx: _Context,
        action: str,
        values: Mapping[str, Any],
        errors: Mapping[str, list[str]],
        *,
        new: bool,
    ) -> str:
        """The create and edit form (the type only when creating)."""
        known = ["name", "type", "scopes", "expires_at", "allowed_origins", "allowed_ips"]
        parts = [pages.other_errors(errors, known)]
        parts.append(f'<form method="post" action="{e(action)}" novalidate>')
        parts.append(f'<input type="hidden" name="csrf" value="{e(ctx.csrf)}">')
        message, described = pages.errors_for(errors, "name")
        parts.append(
            '<div class="field"><label for="name">Name</label>'
            f'<input type="text" id="name" name="name" class="wide" maxlength="200" required '
            f'value="{e(values.get("name", ""))}"{described}>{message}</div>'
        )
        if new:
            message, described = pages.errors_for(errors, "type")
            chosen = values.get("type", "dev")
            radios = "".join(
                f'<label for="type-{t}"><input type="radio" id="type-{t}" name="type" '
                f'value="{t}"{" checked" if chosen == t else ""}> {label}</label>'
                for t, label in (
                    ("dev", "Development"),
                    ("prod", "Production"),
                    ("client", "Client (browser)"),
                )
            )
            parts.append(
                f'<fieldset class="field" id="type"{described}><legend>Type</legend>'
                f"{radios}{message}</fieldset>"
            )
        parts.append(pages.permission_tree(self.catalogue, values.get("scopes", ()), errors))
        message, described = pages.errors_for(errors, "expires_at", "expires-hint")
        parts.append(
            '<div class="field"><label for="expires_at">Expires (optional)</label>'
            f'<input type="date" id="expires_at" name="expires_at" '
            f'value="{e(values.get("expires_at", ""))}"{described}>'
            '<p class="hint" id="expires-hint">The key stops working at the start of this day '
            f"(UTC). Empty: no expiry.</p>{message}</div>"
        )
        kind = values.get("type")
        for name, label, hint, types in (
            (
                "allowed_origins",
                "Allowed origins",
                "Client keys: the sites that may use the key from a browser, one per line "
                "(https://app.example.com, https://*.example.com).",
                "client",
            ),
            (
                "allowed_ips",
                "IP allowlist (optional)",
                "Production keys: the addresses or networks the key may be used from, one per "
                "line (203.0.113.7, 10.0.0.0/8). Empty: any address.",
                "prod",
            ),
        ):
            if not new and kind != types and not values.get(name):
                continue
            message, described = pages.errors_for(errors, name, f"{name}-hint")
            parts.append(
                f'<fieldset data-for-type="{types}"><legend>{label}</legend>'
                f'<div class="field"><label for="{name}">{label}, one per line</label>'
                f'<textarea id="{name}" name="{name}"{described}>'
                f"{e(values.get(name, ''))}</textarea>"
                f'<p class="hint" id="{name}-hint">{e(hint)}</p>{message}</div></fieldset>'
            )
        submit = "Create key" if new else "Save changes"
        parts.append(f'<button type="submit" id="save">{submit}</button></form>')
        return "".join(parts)

    def _settings(self, ctx: _Context, errors: list[FieldError]) -> dict[str, Any]:
        """The form's fields as key settings (what the manager validates)."""
        settings: dict[str, Any] = {
            "name": ctx.one("name"),
            "scopes": ctx.form.get("scopes", []),
            "expires_at": _expiry(ctx.one("expires_at"), errors),
        }
        for name in ("allowed_origins", "allowed_ips"):
            if name in ctx.form:
                settings[name] = _lines(ctx.one(name))
        return settings

    def _form_values(self, ctx: _Context) -> dict[str, Any]:
        values: dict[str, Any] = {k: ctx.one(k) for k in ctx.form if k != "scopes"}
        values["scopes"] = ctx.form.get("scopes", [])
        return values

    async def new_key(self, ctx: _Context) -> Response:
        form = self._key_form(ctx, f"{ctx.base}/keys/new", {"type": "dev"}, {}, new=True)
        return self._html(ctx, "Create key", form, "keys/new")

    async def create_key(self, ctx: _Context) -> Response:
        errors: list[FieldError] = []
        settings = self._settings(ctx, errors)
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
            form = self._key_form(
                ctx, f"{ctx.base}/keys/new", self._form_values(ctx), grouped, new=True
            )
            response = self._html(ctx, "Create key", form, "keys/new")
            response.status_code = 422
            return response
        slot = self._keep(ctx.session, created.key, created.secret.get_secret_value())
        return RedirectResponse(f"{ctx.base}/created/{slot}", status_code=303)

    def _keep(self, session: Session, key: ApiKey, secret: str) -> str:
        """Keep a new secret for the one page that shows it; the slot's id."""
        now = time.monotonic()
        for ident in [i for i, s in self._slots.items() if s.until <= now]:
            del self._slots[ident]
        while len(self._slots) >= _SLOTS:
            self._slots.popitem(last=False)
        ident = secrets.token_urlsafe(16)
        self._slots[ident] = _Slot(session.sid, now + _SLOT_SECONDS, key.id, key.name, secret)
        return ident

    async def created(self, ctx: _Context) -> Response:
        ident = ctx.request.path_params["slot"]
        slot = self._slots.get(ident)
        if slot is None or slot.sid != ctx.session.sid or slot.until <= time.monotonic():
            main = (
                '<p class="notice warning" role="status">This key was shown once and cannot be '
                "shown again. If it was not copied, rotate the key to get a new one.</p>"
                f'<p><a href="{e(ctx.base)}/keys">Back to the keys</a></p>'
            )
            response = self._html(ctx, "Key already shown", main)
            response.status_code = 410
            return response
        del self._slots[ident]
        main = (
            '<div class="notice warning" role="alert"><p><strong>Copy it now, it will only be '
            "shown once.</strong> keystile keeps only a digest of it: nobody can show it to you "
            "again.</p></div>"
            f'<div class="field"><label for="secret">The key {e(slot.name)}</label>'
            f'<input type="text" id="secret" class="secret" readonly value="{e(slot.secret)}">'
            "</div>"
            '<p><button type="button" data-copy="secret" data-status="copy-status" hidden>'
            'Copy the key</button> <span id="copy-status" role="status"></span></p>'
            f'<p><a href="{e(ctx.base)}/keys/{e(slot.key_id)}">Go to the key</a> · '
            f'<a href="{e(ctx.base)}/keys">Back to the keys</a></p>'
        )
        return self._html(ctx, "Your new key", main)

    # -- one key --------------------------------------------------------------------------

    async def _key(self, ctx: _Context) -> ApiKey:
        key_id = ctx.request.path_params["key_id"]
        return await self.manager.get(key_id, project=ctx.project)

    async def edit_key(self, ctx: _Context) -> Response:
        key = await self._key(ctx)
        return self._edit_page(ctx, key, self._values(key), {})

    def _values(self, key: ApiKey) -> dict[str, Any]:
        return {
            "name": key.name,
            "type": key.type.value,
            "scopes": key.scopes,
            "expires_at": "" if key.expires_at is None else key.expires_at.date().isoformat(),
            "allowed_origins": "\n".join(key.allowed_origins),
            "allowed_ips": "\n".join(key.allowed_ips),
        }

    def _edit_page(
        self, ctx: _Context, key: ApiKey, values: dict[str, Any], errors: dict[str, list[str]]
    ) -> HTMLResponse:
        values = {**values, "type": key.type.value}
        action = f"{ctx.base}/keys/{key.id}/edit"
        head = (
            f"<p>{e(key.type.value)} key <code>{e(key.hint)}</code> (<code>{e(key.id)}</code>)</p>"
        )
        form = self._key_form(ctx, action, values, errors, new=False)
        response = self._html(ctx, f"Edit {key.name}", head + form)
        if errors:
            response.status_code = 422
        return response

    async def update_key(self, ctx: _Context) -> Response:
        key = await self._key(ctx)
        errors: list[FieldError] = []
        asked = self._settings(ctx, errors)
        before = self._values(key)
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
            return self._edit_page(ctx, key, self._form_values(ctx), grouped)
        return RedirectResponse(f"{ctx.base}/keys/{updated.id}?saved=1", status_code=303)

    async def rotate_form(self, ctx: _Context) -> Response:
        key = await self._key(ctx)
        options = "".join(
            f'<option value="{v}"{" selected" if v == "86400" else ""}>{label}</option>'
            for v, label in _GRACES.items()
        )
        main = (
            f"<p>Rotating <strong>{e(key.name)}</strong> (<code>{e(key.hint)}</code>) issues a "
            "new key with the same settings. The old one keeps working for the grace period, "
            "then is refused.</p>"
            f'<form method="post" action="{e(ctx.base)}/keys/{e(key.id)}/rotate">'
            f'<input type="hidden" name="csrf" value="{e(ctx.csrf)}">'
            '<div class="field"><label for="grace">Grace period of the old key</label>'
            f'<select id="grace" name="grace">{options}</select></div>'
            '<button type="submit">Rotate</button> '
            f'<a class="button secondary" href="{e(ctx.base)}/keys">Cancel</a></form>'
        )
        return self._html(ctx, f"Rotate {key.name}", main)

    async def rotate_key(self, ctx: _Context) -> Response:
        key = await self._key(ctx)
        grace = ctx.one("grace")
        if grace not in _GRACES:
            raise KeyValidationError.single("grace", f"must be one of {', '.join(_GRACES)}")
        rotated = await self.manager.rotate(
            key.id, grace=int(grace), actor=ctx.admin, by=ctx.by(), project=ctx.project
        )
        slot = self._keep(ctx.session, rotated.key, rotated.secret.get_secret_value())
        return RedirectResponse(f"{ctx.base}/created/{slot}", status_code=303)

    async def revoke_form(self, ctx: _Context) -> Response:
        key = await self._key(ctx)
        main = (
            f'<div class="notice bad"><p>Revoke <strong>{e(key.name)}</strong> '
            f"(<code>{e(key.hint)}</code>)? Every request with it is refused at once, "
            "everywhere. A revocation cannot be undone.</p></div>"
            f'<form method="post" action="{e(ctx.base)}/keys/{e(key.id)}/revoke">'
            f'<input type="hidden" name="csrf" value="{e(ctx.csrf)}">'
            '<button type="submit" class="danger" id="confirm-revoke">Revoke the key</button> '
            f'<a class="button secondary" href="{e(ctx.base)}/keys">Cancel</a></form>'
        )
        return self._html(ctx, f"Revoke {key.name}?", main)

    async def revoke_key(self, ctx: _Context) -> Response:
        key = await self._key(ctx)
        await self.manager.revoke(key.id, by=ctx.by(), project=ctx.project)
        return RedirectResponse(f"{ctx.base}/keys/{key.id}?revoked=1", status_code=303)

    async def key_page(self, ctx: _Context) -> Response:
        key = await self._key(ctx)
        [info] = await self.manager.describe([key])
        hour = await self.manager.usage(key.id, project=ctx.project, granularity="minute")
        month = await self.manager.usage(key.id, project=ctx.project, granularity="day")
        assert isinstance(hour, UsageReport) and isinstance(month, UsageReport)
        params = ctx.request.query_params
        notice = ""
        if params.get("saved"):
            notice = '<p class="notice" role="status">Saved.</p>'
        elif params.get("revoked"):
            notice = '<p class="notice" role="status">The key is revoked.</p>'
        last = hour.last_use
        used_from = f" from {e(last.ip)}" if last.ip else ""
        used_from += f" ({e(last.origin)})" if last.origin else ""
        facts: list[tuple[str, str]] = [
            ("Type", e(key.type.value)),
            ("Hint", f"<code>{e(key.hint)}</code>"),
            ("Status", pages.status_badge(info.status.value)),
            ("Scopes", f'<span class="scopes">{pages.scope_list(key.scopes)}</span>'),
            ("Created", when(key.created_at)),
            ("Last used", when(hour.last_use.at or info.last_used_at) + used_from),
            ("Expires", when(key.expires_at, "no expiry")),
        ]
        if key.allowed_origins:
            facts.append(("Allowed origins", e(", ".join(key.allowed_origins))))
        if key.allowed_ips:
            facts.append(("IP allowlist", e(", ".join(key.allowed_ips))))
        rows = "".join(f'<tr><th scope="row">{k}</th><td>{v}</td></tr>' for k, v in facts)
        legend = (
            '<p class="legend" aria-hidden="true"><span class="swatch req"></span>requests'
            '<span class="swatch err"></span>errors</p>'
        )
        main = [
            notice,
            f"<p>{pages.key_menu(ctx.base, key, info.status.value)} <code>{e(key.id)}</code></p>",
            f'<table class="facts">{rows}</table>',
            '<section aria-labelledby="hour-heading"><h2 id="hour-heading">Last hour</h2>',
            pages.totals_cards("hour", hour.totals),
            bar_chart(
                "chart-hour",
                "Requests per minute, last hour",
                self._buckets(hour, MINUTE),
                daily=False,
            ),
            legend,
            "</section>",
            '<section aria-labelledby="month-heading"><h2 id="month-heading">Last 30 days</h2>',
            pages.totals_cards("month", month.totals),
            bar_chart(
                "chart-month",
                "Requests per day, last 30 days",
                self._buckets(month, DAY),
                daily=True,
            ),
            legend,
            "</section>",
        ]
        if key.type is KeyType.CLIENT or hour.top_ips or hour.top_origins:
            main += [
                '<section aria-labelledby="busiest"><h2 id="busiest">Busiest clients</h2>',
                pages.ranking("IP address", "top-ips", hour.top_ips),
                pages.ranking("Origin", "top-origins", hour.top_origins),
                "</section>",
            ]
        main.append(self.alerts_section(ctx, key))
        return self._html(ctx, key.name, "".join(main))

    @staticmethod
    def _buckets(report: UsageReport, size: int) -> list[Bucket]:
        """The report's series with every bucket of its range, empty ones too."""
        counts = {p.start: p.counts for p in report.series}
        start = report.start.timestamp()
        out = []
        for index in range(int((report.end.timestamp() - start) // size)):
            moment = to_datetime(start + index * size)
            got = counts.get(moment)
            if got is None:
                out.append(Bucket(moment, 0, 0))
            else:
                out.append(Bucket(moment, got.requests, got.errors_4xx + got.errors_5xx))
        return out

    def alerts_section(self, ctx: _Context, key: ApiKey) -> str:
        """The alerts raised for ``key`` in this process, and the rules in force.

        The rules are the gate's (``Keystile(alert_rules=...)``), shown read-only: a
        subclass may override this method to show and edit per-project rules."""
        raised = [a for a in reversed(self.alerts) if a.key_id == key.id][:20]
        if raised:
            items = "".join(
                f"<tr><td>{when(a.at)}</td><td>{e(a.rule)}</td><td>{e(a.message)}</td></tr>"
                for a in raised
            )
            listing = (
                '<table id="alerts"><thead><tr><th scope="col">When</th><th scope="col">Rule'
                f'</th><th scope="col">Alert</th></tr></thead><tbody>{items}</tbody></table>'
            )
        else:
            listing = "<p>No alert raised for this key since the server started.</p>"
        rules = self.gate.alerts.rules.model_dump()
        rule_rows = "".join(
            f'<tr><th scope="row">{e(name.replace("_", " "))}</th><td>{e(value)}</td></tr>'
            for name, value in rules.items()
        )
        return (
            '<section aria-labelledby="alerts-heading"><h2 id="alerts-heading">Alerts</h2>'
            f"{listing}<h3>Alert rules</h3>"
            f'<table id="alert-rules"><tbody>{rule_rows}</tbody></table></section>'
        )

    # -- the audit trail ------------------------------------------------------------------

    async def audit(self, ctx: _Context) -> Response:
        params = ctx.request.query_params
        wanted = {
            name: params.get(name) or None for name in ("key_id", "action", "outcome", "cursor")
        }
        page = await self.manager.history(project=ctx.project, limit=PAGE_SIZE, **wanted)

        def option(value: str, current: str | None) -> str:
            mark = " selected" if value == (current or "") else ""
            return f'<option value="{e(value)}"{mark}>{e(value or "any")}</option>'

        filters = (
            f'<form class="filters" method="get" action="{e(ctx.base)}/audit" role="search">'
            '<div><label for="key_id">Key id</label><input type="text" id="key_id" '
            f'name="key_id" value="{e(wanted["key_id"] or "")}"></div>'
            '<div><label for="action">Action</label><select id="action" name="action">'
            + "".join(option(v, wanted["action"]) for v in ("", *ACTIONS))
            + '</select></div><div><label for="outcome">Outcome</label>'
            '<select id="outcome" name="outcome">'
            + "".join(option(v, wanted["outcome"]) for v in ("", "ok", "refused"))
            + '</select></div><button type="submit" class="secondary">Filter</button></form>'
        )
        rows = "".join(
            f"<tr><td>{when(ev.at)}</td><td>{e(ev.action)}</td><td>{e(ev.outcome)}</td>"
            f"<td>{e(ev.actor)}</td><td><code>{e(ev.key_id or '')}</code></td>"
            f"<td>{e(', '.join(sorted(ev.changes)) or ev.reason or '')}</td></tr>"
            for ev in page.events
        )
        head = "".join(
            f'<th scope="col">{h}</th>'
            for h in ("When", "Action", "Outcome", "By", "Key", "Changes or reason")
        )
        table = (
            f'<table id="audit"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>'
            if rows
            else '<p class="notice">No events match.</p>'
        )
        pager = ""
        if page.next is not None:
            more = {k: v for k, v in wanted.items() if v and k != "cursor"}
            more["cursor"] = page.next
            pager = (
                f'<nav class="pager" aria-label="Pages"><a href="{e(ctx.base)}/audit?'
                f'{e(urlencode(more))}" rel="next">Older events</a></nav>'
            )
        return self._html(ctx, "Audit trail", filters + table + pager, "audit")
