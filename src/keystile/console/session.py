"""The console's session: a signed cookie naming the admin key, never holding it.

The cookie is ``<payload>.<signature>``: the payload is the admin key's id, a random
session id and the session's expiry, in URL-safe base64 JSON; the signature is an
HMAC-SHA256 under a key derived from the server secret (the gate's hasher), so a cookie
cannot be made or changed without the secret. The key's secret is never in it: every page
reads the key's record again (:class:`~keystile.console.app.Console`), so revoking the key,
its expiry or losing the admin scope ends the session at the next request.

Each session has its CSRF token: an HMAC of the session id under the same derived key,
carried in every form and compared in constant time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass

from keystile.keys import KeyHasher

__all__ = ["COOKIE", "SESSION_SECONDS", "Session", "SessionSigner"]

COOKIE = "keystile_console"
SESSION_SECONDS = 30 * 60  # idle: each page refreshes it
MAX_SESSION_SECONDS = 12 * 3600  # from sign-in, however active
_MAX_COOKIE = 512


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in admin: the key's id, the session's id, when it started and ends."""

    key_id: str
    sid: str
    started: int
    expires: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Signs and checks session cookies and CSRF tokens under the gate's server secret."""

    __slots__ = ("_key",)

    def __init__(self, hasher: KeyHasher) -> None:
        # A key of the console's own, derived from the server secret: never the secret.
        self._key = bytes.fromhex(hasher.digest("keystile.console.session.v1"))

    def _sign(self, message: bytes) -> str:
        return _b64(hmac.new(self._key, message, hashlib.sha256).digest())

    def new(self, key_id: str, now: float) -> Session:
        """A new session for the admin key ``key_id``."""
        start = int(now)
        return Session(key_id, secrets.token_urlsafe(16), start, start + SESSION_SECONDS)

    def refreshed(self, session: Session, now: float) -> Session:
        """The session with its idle expiry moved on, never past its maximum age."""
        end = min(int(now) + SESSION_SECONDS, session.started + MAX_SESSION_SECONDS)
        return Session(session.key_id, session.sid, session.started, end)

    def dump(self, session: Session) -> str:
        """The cookie's value."""
        payload = json.dumps(
            [session.key_id, session.sid, session.started, session.expires],
            separators=(",", ":"),
        ).encode("ascii")
        body = _b64(payload)
        return f"{body}.{self._sign(body.encode('ascii'))}"

    def load(self, value: str | None, now: float) -> Session | None:
        """The session a cookie carries; ``None`` when absent, malformed, tampered with or
        expired."""
        if not value or len(value) > _MAX_COOKIE or value.count(".") != 1:
            return None
        body, signature = value.split(".")
        try:
            expected = self._sign(body.encode("ascii"))
            if not hmac.compare_digest(expected.encode("ascii"), signature.encode("ascii")):
                return None
            key_id, sid, started, expires = json.loads(_unb64(body))
        except (UnicodeError, binascii.Error, ValueError, TypeError):
            return None
        if not (
            isinstance(key_id, str)
            and isinstance(sid, str)
            and isinstance(started, int)
            and isinstance(expires, int)
        ):
            return None
        if now >= expires or expires > started + MAX_SESSION_SECONDS:
            return None
        return Session(key_id, sid, started, expires)

    def csrf(self, session: Session) -> str:
        """The session's CSRF token (the same for the whole session)."""
        return self._sign(f"csrf|{session.sid}".encode("ascii"))

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        """Whether ``given`` is this session's CSRF token (constant time)."""
        if not given or len(given) > 100:
            return False
        try:
            given_bytes = given.encode("ascii")
        except UnicodeError:
            return False
        return hmac.compare_digest(self.csrf(session).encode("ascii"), given_bytes)
