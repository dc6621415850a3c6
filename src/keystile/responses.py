"""The HTTP refusals, rendered as raw ASGI messages.

Every refusal is JSON ``{"error": {"code": ..., "message": ...}}`` with the status and
headers documented in the README; authentication refusals carry ``WWW-Authenticate`` as RFC 6750 §3
spells it. Static refusals are built once and sent as prebuilt bytes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import NoReturn

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import Message, Send
from starlette.websockets import WebSocket

from keystile.exceptions import KeystileError

__all__ = ["Refusal", "Refusals", "raise_refusal", "refusal_handler"]

Headers = list[tuple[bytes, bytes]]


class Refusal(HTTPException, KeystileError):
    """An HTTP refusal, with the library's body and headers.

    The middleware sends refusals as raw ASGI. Code below it (the FastAPI dependency, an
    endpoint) raises one with :func:`raise_refusal`: as an ``HTTPException`` it is answered
    by whichever Starlette or FastAPI app is nearest — a mounted sub-app included — and
    :func:`raise_refusal` makes sure that app answers it with :func:`refusal_handler`.
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
    ) -> None:
        extra = list(headers)
        super().__init__(status, message, {k.decode(): v.decode() for k, v in extra})
        self.status = status
        self.code = code
        self.message = message
        self.body = json.dumps(
            {"error": {"code": code, "message": message}}, separators=(",", ":")
        ).encode()
        self.raw_headers: Headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(self.body)).encode()),
            *extra,
        ]

    def response(self) -> Response:
        """This refusal as a Starlette response."""
        response = Response(self.body, status_code=self.status)
        response.raw_headers = list(self.raw_headers)
        return response

    def start_message(self, extra: Headers | None = None) -> Message:
        headers = self.raw_headers if not extra else [*self.raw_headers, *extra]
        return {"type": "http.response.start", "status": self.status, "headers": headers}

    def body_message(self) -> Message:
        return {"type": "http.response.body", "body": self.body}

    async def send(self, send: Send, extra: Headers | None = None) -> None:
        """Send this refusal as the whole HTTP response."""
        await send(self.start_message(extra))
        await send(self.body_message())

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def __repr__(self) -> str:
        return f"Refusal({self.status}, {self.code!r})"


async def refusal_handler(conn: HTTPConnection, exc: Exception) -> Response | None:
    """A Starlette/FastAPI exception handler answering a :class:`Refusal`:
    the response, or for a websocket the handshake closed with 1008 (policy violation).

    ``app.add_exception_handler(Refusal, refusal_handler)`` registers it up front;
    :func:`raise_refusal` registers it on first use.
    """
    if not isinstance(exc, Refusal):  # registered for another exception: not ours
        raise exc
    if isinstance(conn, WebSocket):
        await conn.close(code=1008, reason=exc.code)
        return None
    return exc.response()


# Set by Starlette's ExceptionMiddleware (and so FastAPI's) on every request: the live
# handler tables that the app nearest to the endpoint looks exceptions up in.
_HANDLERS = "starlette.exception_handlers"


def raise_refusal(conn: HTTPConnection, refusal: Refusal) -> NoReturn:
    """Raise ``refusal`` from an endpoint or dependency, so that the nearest app answers it
    with the library's body and headers — not with its generic ``{"detail": ...}``."""
    tables = conn.scope.get(_HANDLERS)
    if tables is not None and Refusal not in tables[0]:
        tables[0][Refusal] = refusal_handler
    raise refusal


def _quoted(value: str) -> str:
    # RFC 7235 quoted-string: escape backslash and double quote.
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class Refusals:
    """The refusals of one middleware instance (its realm is part of the headers)."""

    def __init__(self, realm: str, retry_after: int = 1) -> None:
        self.realm = realm
        self._bearer = f"Bearer realm={_quoted(realm)}"
        # RFC 6750 §3.1: no error code when the request carried no credentials.
        self.missing = Refusal(
            401,
            "missing_api_key",
            "An API key is required: send it as 'Authorization: Bearer <key>'.",
            [(b"www-authenticate", self._bearer.encode())],
        )
        self.malformed = Refusal(
            400,
            "invalid_request",
            "The Authorization header must be 'Bearer <key>', sent once.",
            [self.challenge("invalid_request")],
        )
        self.invalid = Refusal(
            401, "invalid_api_key", "The API key is not valid.", [self.challenge("invalid_token")]
        )
        self.expired = Refusal(
            401, "expired_api_key", "The API key has expired.", [self.challenge("invalid_token")]
        )
        self.revoked = Refusal(
            401,
            "revoked_api_key",
            "The API key has been revoked.",
            [self.challenge("invalid_token")],
        )
        self.unavailable = Refusal(
            503,
            "auth_unavailable",
            "The key store cannot be reached; try again shortly.",
            [(b"retry-after", str(retry_after).encode())],
        )
        self._rate_limited: dict[str, Refusal] = {}
        self.rate_limited = self.rate_limited_by(())
        self.quota_exceeded = Refusal(
            429, "quota_exceeded", "The API key has used its AI token quota; see Retry-After."
        )
        self.limiter_unavailable = Refusal(
            503,
            "rate_limit_unavailable",
            "The rate limiter cannot be reached; try again shortly.",
            [(b"retry-after", str(retry_after).encode())],
        )
        self.quota_unavailable = Refusal(
            503,
            "quota_unavailable",
            "The AI token quota store cannot be reached; try again shortly.",
            [(b"retry-after", str(retry_after).encode())],
        )
        self.origin_not_allowed = Refusal(
            403, "origin_not_allowed", "The API key may not be used from this origin."
        )
        self.ip_not_allowed = Refusal(
            403, "ip_not_allowed", "The API key may not be used from this address."
        )
        self.preflight_refused = Refusal(
            403, "origin_not_allowed", "Cross-origin requests from this origin are not allowed."
        )
        self.unmatched = Refusal(
            403,
            "insufficient_scope",
            "No rule grants access to this route.",
            [self.challenge("insufficient_scope")],
        )

    def challenge(self, error: str, scope: str | None = None) -> tuple[bytes, bytes]:
        value = f"{self._bearer}, error={_quoted(error)}"
        if scope is not None:
            value += f", scope={_quoted(scope)}"
        return (b"www-authenticate", value.encode())

    def rate_limited_by(self, policies: Sequence[str]) -> Refusal:
        """The 429 of a request that ``policies`` (``RateLimit-Policy`` names) refused: the
        body names them, so a client can tell its own address's share (``"client-ip"``)
        from the key's whole budget (``"client"``)."""
        names = ", ".join(f'"{p}"' for p in policies)
        refusal = self._rate_limited.get(names)
        if refusal is None:
            refusal = Refusal(
                429,
                "rate_limited",
                f"The API key is over its rate limit (policy {names}); see Retry-After."
                if names
                else "The API key is over its rate limit; see Retry-After.",
            )
            if len(self._rate_limited) < 256:  # bounded: policy names come from key types
                self._rate_limited[names] = refusal
        return refusal

    def insufficient_scope(self, missing: Iterable[str], message: str | None = None) -> Refusal:
        """403 ``insufficient_scope`` naming ``missing`` in the challenge (and, unless
        ``message`` says more, in the message)."""
        scopes = " ".join(missing)
        return Refusal(
            403,
            "insufficient_scope",
            message or f"The API key lacks the scope {scopes}.",
            [self.challenge("insufficient_scope", scopes)],
        )
