"""KeyGateMiddleware: authenticate → authorize the route → app (SPEC §3, §4).

Pure ASGI (no ``BaseHTTPMiddleware``): lifespan and anything else that is not HTTP or a
websocket passes straight through. The cached path does no I/O: parse the header, check
the checksum, HMAC, one dict lookup, a few comparisons.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable

from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keygate.exceptions import KeyFormatError, StoreError
from keygate.gate import KeyGate, Principal
from keygate.keys import parse_key
from keygate.responses import RAISED, Refusal, Refusals
from keygate.routing import PRINCIPAL, REFUSALS, Rule, RuleTable, route_path

__all__ = ["KeyGateMiddleware"]

logger = logging.getLogger("keygate")

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_ANONYMOUS_AUTH = AuthCredentials()
_ANONYMOUS_USER = UnauthenticatedUser()


class KeyGateMiddleware:
    """Authenticates ``Authorization: Bearer`` API keys and enforces per-route scopes.

    ``app.add_middleware(KeyGateMiddleware, gate=gate, rules=[...])``. Without a ``gate``,
    one is built from the environment (``KEYGATE_REDIS_URL``, ``KEYGATE_SECRET``, ...).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        gate: KeyGate | None = None,
        rules: Iterable[Rule] = (),
        deny_unmatched: bool = False,
        realm: str = "api",
        retry_after: int = 1,
    ) -> None:
        self.app = app
        self.gate = gate if gate is not None else KeyGate()
        self.rules = RuleTable(rules)
        self.deny_unmatched = deny_unmatched
        self.refusals = Refusals(realm, retry_after)
        self._prefixes = self.gate.policy.prefixes
        self._cache = self.gate.store
        self._digest = self.gate.hasher.digest
        self._clock = self.gate.clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            await self.app(scope, receive, send)
            return
        rule = (
            self.rules.match(scope.get("method", "GET"), route_path(scope)) if self.rules else None
        )
        scope[REFUSALS] = self.refusals
        if rule is not None and rule.public:
            scope["auth"] = _ANONYMOUS_AUTH
            scope["user"] = _ANONYMOUS_USER
            await self.app(scope, receive, send)
            return
        principal = await self._authenticate(scope)
        if isinstance(principal, Refusal):
            await self._refuse(scope, send, principal)
            return
        if rule is not None:
            if rule.scopes:
                missing = principal.missing(rule.scopes)
                if missing:
                    await self._refuse(scope, send, self.refusals.insufficient_scope(missing))
                    return
        elif self.deny_unmatched:
            await self._refuse(scope, send, self.refusals.unmatched)
            return
        scope["auth"] = principal.auth
        scope["user"] = principal.user
        scope[PRINCIPAL] = principal
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        started = False
        replacing = False

        async def send_wrapper(message: Message) -> None:
            nonlocal started, replacing
            if message["type"] == "http.response.start":
                started = True
                refusal = scope.get(RAISED)
                if refusal is not None:
                    # An app below answered a Refusal it caught; give it the SPEC's shape.
                    replacing = True
                    message = refusal.start_message()
            elif replacing:
                if message.get("more_body"):
                    return
                message = scope[RAISED].body_message()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        except Refusal as refusal:
            # Raised by a plain ASGI app with no exception handling of its own.
            if started:
                raise
            await self._refuse(scope, send, refusal)

    async def _authenticate(self, scope: Scope) -> Principal | Refusal:
        value = None
        for name, raw in scope["headers"]:
            if name == b"authorization":
                if value is not None:
                    return self.refusals.malformed  # sent twice: ambiguous
                value = raw
        if value is None:
            return self.refusals.missing
        scheme, space, token = value.partition(b" ")
        # The scheme is case-insensitive (RFC 7235 §2.1); the token is compared exactly.
        if not space or scheme.lower() != b"bearer":
            return self.refusals.malformed
        token = token.lstrip(b" ")
        if not _B64TOKEN.fullmatch(token):
            return self.refusals.malformed
        text = token.decode("ascii")
        try:
            parse_key(text, self._prefixes)
        except KeyFormatError:
            return self.refusals.invalid  # no store is consulted for a malformed key
        digest = self._digest(text)
        entry = self._cache.peek(digest)
        if entry is None:
            try:
                async with asyncio.timeout(self.gate.lookup_timeout):
                    entry = await self._cache.lookup(digest)
            except (StoreError, TimeoutError) as exc:
                logger.warning("key lookup failed: %s", type(exc).__name__)
                return self.refusals.unavailable
            if entry is None:
                return self.refusals.invalid
        principal: Principal = entry.derived or self.gate.principal(entry)
        if principal.key.revoked_at is not None:
            return self.refusals.revoked
        if self._clock() >= principal.expires:
            return self.refusals.expired
        return principal

    async def _refuse(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting refuses the handshake; 1008 = policy violation.
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})
            return
        await refusal.send(send)
