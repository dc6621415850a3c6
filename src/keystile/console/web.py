"""The console's HTTP plumbing: the headers every answer carries, reading its forms, and
the checks a posted form passes before a handler sees it."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystile.audit import Actor
from keystile.console.session import Session
from keystile.models import ApiKey

__all__ = [
    "SECURITY_HEADERS",
    "STATIC_TYPES",
    "Context",
    "Refused",
    "base_of",
    "check_origin",
    "cookie_values",
    "read_form",
    "secured",
]

MAX_FORM = 64 * 1024

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
#: The assets the console serves from its package, and their media types.
STATIC_TYPES = {"console.css": "text/css; charset=utf-8", "console.js": "text/javascript"}


@dataclass(frozen=True, slots=True)
class Context:
    """A signed-in request: the admin key (read again just now), its session, the form,
    and the client's address (as the console reads it: behind trusted proxies too)."""

    request: Request
    admin: ApiKey
    session: Session
    csrf: str
    base: str
    form: dict[str, list[str]]
    address: str | None

    @property
    def project(self) -> str:
        return self.admin.project

    def by(self) -> Actor:
        return Actor.of_key(self.admin, self.address)

    def one(self, name: str) -> str:
        values = self.form.get(name) or [""]
        return values[0]


class Refused(Exception):
    """A request the console refuses: its status, a page title and what to say."""

    def __init__(self, status: int, title: str, message: str) -> None:
        self.status, self.title, self.message = status, title, message
        super().__init__(message)


def secured(app: ASGIApp) -> ASGIApp:
    """``app`` with :data:`SECURITY_HEADERS` on every answer, and ``no-store`` on every
    page (they show keys, and one shows a secret): only the static assets may be cached."""

    async def secured_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        static = scope["path"].endswith(tuple(f"/static/{name}" for name in STATIC_TYPES))

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

    return secured_app


def base_of(request: Request) -> str:
    """The console's own path prefix (its mount path, under any root path)."""
    root: str = request.scope.get("root_path", "")
    return root.rstrip("/")


def cookie_values(request: Request, name: str) -> list[str]:
    """Every value the request's ``Cookie`` headers give cookie ``name``, distinct, in
    order: more than one when a site sharing the domain set another (cookie tossing)."""
    values: dict[str, None] = {}
    for header in request.headers.getlist("cookie"):
        for pair in header.split(";"):
            key, equals, value = pair.partition("=")
            if equals and key.strip() == name:
                values[value.strip().strip('"')] = None
    return list(values)


def check_origin(request: Request) -> None:
    """Refuse a form posted from another site (when the browser says where from)."""
    origin = request.headers.get("origin")
    if origin is None:  # SameSite=Strict and the CSRF token still stand
        return
    if origin != f"{request.url.scheme}://{request.url.netloc}":
        raise Refused(403, "Refused", "A form from another site.")


async def read_form(request: Request) -> dict[str, list[str]]:
    """A posted form (URL-encoded, UTF-8, at most :data:`MAX_FORM` bytes): each field's
    values; :class:`Refused` for anything else."""
    check_origin(request)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Refused(415, "Bad request", "Send the console's forms.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM:
            raise Refused(413, "Too large", "The form is too large.")
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=2000)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "Bad request", "The form could not be read.") from None
    form: dict[str, list[str]] = {}
    for name, value in pairs:
        form.setdefault(name, []).append(value)
    return form
