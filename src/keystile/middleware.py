"""KeystileMiddleware: authenticate → authorize the route → app (SPEC §3, §4).

Pure ASGI (no ``BaseHTTPMiddleware``): lifespan and anything else that is not HTTP or a
websocket passes straight through. The cached path does no I/O: parse the header, check
the checksum, HMAC, one dict lookup, a few comparisons.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Iterable

from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystile.cors import CorsPolicy
from keystile.exceptions import KeyFormatError, StoreError, StoreUnavailable
from keystile.gate import Keystile, Principal
from keystile.keys import parse_key
from keystile.network import ClientAddress, allowed, budget_address
from keystile.origins import Origin, parse_origin
from keystile.ratelimit import LimitSet
from keystile.responses import Headers, Refusal, Refusals
from keystile.routing import MIDDLEWARE, PRINCIPAL, Rule, RuleTable, route_path
from keystile.stores.cache import CacheEntry

__all__ = ["KeystileMiddleware"]

logger = logging.getLogger("keystile")

# RFC 6750 §2.1: credentials = "Bearer" 1*SP b64token
_B64TOKEN = re.compile(rb"[A-Za-z0-9\-._~+/]+=*")
_ANONYMOUS_AUTH = AuthCredentials()
_ANONYMOUS_USER = UnauthenticatedUser()


class KeystileMiddleware:
    """Authenticates ``Authorization: Bearer`` API keys and enforces per-route scopes.

    ``app.add_middleware(KeystileMiddleware, gate=gate, rules=[...])``. Without a ``gate``,
    one is built from the environment (``KEYSTILE_REDIS_URL``, ``KEYSTILE_SECRET``, ...).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        gate: Keystile | None = None,
        rules: Iterable[Rule] = (),
        deny_unmatched: bool = False,
        realm: str = "api",
        retry_after: int = 1,
        legacy_rate_limit_headers: bool = False,
        preflight: bool = True,
        cors_origins: Iterable[str] = (),
        cors_methods: Iterable[str] = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"),
        cors_headers: Iterable[str] = ("Content-Type",),
        cors_max_age: int = 600,
        require_origin: bool = False,
        trusted_proxies: Iterable[str] = (),
        record_usage: bool = True,
    ) -> None:
        self.app = app
        self.gate = gate if gate is not None else Keystile()
        self.rules = RuleTable(rules)
        self._has_rules = bool(self.rules)
        self.deny_unmatched = deny_unmatched
        self.refusals = Refusals(realm, retry_after)
        self._prefixes = self.gate.policy.prefixes
        self._cache = self.gate.store
        self._digest = self.gate.hasher.digest
        self._clock = self.gate.clock
        self._limiter = self.gate.limiter
        self.legacy_rate_limit_headers = legacy_rate_limit_headers
        self.preflight = preflight
        self.cors = CorsPolicy(
            self.gate,
            origins=cors_origins,
            methods=cors_methods,
            headers=cors_headers,
            max_age=cors_max_age,
            require_origin=require_origin,
        )
        self.client_address = ClientAddress(trusted_proxies)
        self._proxied = bool(self.client_address.trusted)
        self._usage = self.gate.usage if record_usage else None
        self._lookup_failures = 0
        self._lookup_logged = -math.inf

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                receive = self._lifespan(receive)
            await self.app(scope, receive, send)
            return
        if scope.get("method") == "OPTIONS" and self.preflight and kind == "http":
            # A preflight never carries the key: answer it before authentication (SPEC §5).
            origin = _header(scope, b"origin")
            method = _header(scope, b"access-control-request-method")
            if origin is not None and method is not None:
                await self._answer_preflight(scope, send, origin, method)
                return
        rule = None
        if self._has_rules:
            rule = self.rules.match(scope.get("method", "GET"), route_path(scope))
        scope[MIDDLEWARE] = self
        if rule is not None and rule.public:
            scope["auth"] = _ANONYMOUS_AUTH
            scope["user"] = _ANONYMOUS_USER
            await self.app(scope, receive, send)
            return
        # The hot path, inline: find the one Authorization header, and recall the cache
        # entry those exact bytes resolved to moments ago (alive and fresh, or nothing):
        # only an admitted key's canonical ``Bearer <key>`` is ever remembered (_resolve).
        value = None
        for name, raw in scope["headers"]:
            if name == b"authorization":
                if value is not None:
                    await self._refuse(scope, send, self.refusals.malformed)  # sent twice
                    return
                value = raw
        if value is None:
            await self._refuse(scope, send, self.refusals.missing)
            return
        entry = self._cache.recall(value)
        if entry is None:
            resolved = await self._resolve(value)
            if isinstance(resolved, Refusal):
                await self._refuse(scope, send, resolved)
                return
            entry = resolved
        principal: Principal = entry.derived or self.gate.principal(entry)
        now = self._clock()
        if principal.key.revoked_at is not None or now >= principal.expires:
            self._cache.forget(value)  # expired since it was remembered
            if self._usage is not None:  # SPEC §7: who still uses an old key
                self._usage.record_refusal(principal.key_id, "inactive")
            revoked = principal.key.revoked_at is not None
            await self._refuse(
                scope, send, self.refusals.revoked if revoked else self.refusals.expired
            )
            return
        extra: Headers = _NO_HEADERS
        if principal.restricted:
            checked = await self._check_origin_and_address(scope, send, principal)
            if checked is None:
                return
            extra = checked
        if rule is not None:
            if rule.scopes:
                missing = principal.missing(rule.scopes)
                if missing:
                    refusal = self.refusals.insufficient_scope(missing)
                    await self._refuse(scope, send, refusal, extra, principal)
                    return
        elif self.deny_unmatched:
            await self._refuse(scope, send, self.refusals.unmatched, extra, principal)
            return
        scope["auth"] = principal.auth
        scope["user"] = principal.user
        scope[PRINCIPAL] = principal
        if principal.limits is not None:
            limited = await self._limit(scope, send, principal, principal.limits, extra)
            if limited is None:
                return
            send = limited
        elif extra and kind == "http":
            send = _adding_headers(send, extra)
        usage = self._usage
        if usage is not None and kind == "http":
            # No __init__ of its own to call: this runs on every request.
            meter = _Meter()
            meter._receive, meter._send = receive, send
            meter.bytes_in = meter.bytes_out = meter.status = 0
            receive, send = meter.receive, meter.send
        else:
            meter = None
            if usage is not None:  # a websocket: counted once, when it is let through
                used_from = extra[0][1].decode("latin-1") if extra else None  # CORS lead
                ip = self._ip(scope)
                usage.record(principal.key_id, 101, 0, 0, ip, used_from, principal.ip_mode, now)
        try:
            await self.app(scope, receive, send)
        except Refusal as refusal:
            # Raised by an app with no exception handling of its own (Starlette and FastAPI
            # apps answer it themselves, see keystile.responses.raise_refusal). Raise it
            # before the response starts.
            await self._refuse(scope, send, refusal)
        except BaseException:
            if meter is not None and not meter.status:
                meter.status = 500
            raise
        finally:
            if meter is not None and usage is not None:  # (a meter is made with usage)
                if self._proxied:
                    ip = self._ip(scope)
                else:
                    client = scope.get("client")
                    ip = client[0] if client else None
                usage.record(
                    principal.key_id,
                    meter.status,
                    meter.bytes_in,
                    meter.bytes_out,
                    ip,
                    extra[0][1].decode("latin-1") if extra else None,  # CORS headers lead
                    principal.ip_mode,
                    now,
                )

    def _lookup_failed(self, why: str) -> None:
        """Log failed key lookups at most once every 10 seconds (an outage is thousands)."""
        self._lookup_failures += 1
        now = time.monotonic()
        if now - self._lookup_logged >= 10.0:
            logger.warning(
                "key lookups failing (%s): %d refused with 503 since the last report",
                why,
                self._lookup_failures,
            )
            self._lookup_logged, self._lookup_failures = now, 0

    def _ip(self, scope: Scope) -> str | None:
        if self._proxied:
            address = self.client_address(scope)
            return None if address is None else str(address)
        client = scope.get("client")
        return str(client[0]) if client else None

    async def _check_origin_and_address(
        self, scope: Scope, send: Send, principal: Principal
    ) -> Headers | None:
        """A key restricted to origins or addresses: refuse (and return None), or return
        the CORS headers its answers carry."""
        extra = _NO_HEADERS
        if principal.origins:
            # The key's own list decides (SPEC §5); the app is never called otherwise.
            origins = [v for k, v in scope["headers"] if k == b"origin"]
            if origins:
                if len(origins) > 1 or not principal.origin_ok(origins[0]):
                    refusal = self.refusals.origin_not_allowed
                    await self._refuse(scope, send, refusal, [], principal)
                    return None
                extra = self.cors.response_headers(origins[0])
            elif self.cors.require_origin:
                await self._refuse(scope, send, self.refusals.origin_not_allowed, [], principal)
                return None
        if principal.networks and not allowed(self.client_address(scope), principal.networks):
            await self._refuse(scope, send, self.refusals.ip_not_allowed, extra, principal)
            return None
        return extra

    async def _limit(
        self, scope: Scope, send: Send, principal: Principal, limits: LimitSet, extra: Headers
    ) -> Send | None:
        """Ask the limiter about ``principal``'s ``limits`` (and, for a window that counts
        each client address apart, this address's share); refuse (and return None) or
        return a send that adds the rate-limit (and CORS) headers to the response."""
        address = ""
        if limits.per_address:
            client = self.client_address(scope)
            if client is None:  # no address to share the budget by (a Unix socket)
                if principal.key_limits is None:
                    return (
                        _adding_headers(send, extra) if extra and scope["type"] == "http" else send
                    )
                limits = principal.key_limits
            else:
                address = budget_address(client)
        try:
            decision = await self._limiter.hit(principal.key_id, limits, address=address)
        except StoreUnavailable:  # failure="deny", and the limiter could not decide
            refusal = self.refusals.limiter_unavailable
            await self._refuse(scope, send, refusal, extra, principal)
            return None
        headers = decision.headers(limits) + extra
        if self.legacy_rate_limit_headers:
            headers += decision.legacy_headers(limits)
        if not decision.allowed:
            refusal = self.refusals.rate_limited_by(decision.refused_by)
            await self._refuse(scope, send, refusal, headers, principal)
            return None
        if scope["type"] != "http":
            return send
        return _adding_headers(send, headers)

    def _lifespan(self, receive: Receive) -> Receive:
        """Pass lifespan through, preparing the gate when the app starts."""
        gate = self.gate

        async def receive_lifespan() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await gate.startup()
            elif message["type"] == "lifespan.shutdown":
                await gate.shutdown()  # flush usage: a graceful shutdown loses no count
            return message

        return receive_lifespan

    async def _resolve(self, value: bytes) -> CacheEntry | Refusal:
        """Parse the header, check the key's checksum, and look its digest up (the path of
        credentials not seen moments ago)."""
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
            # The lookup runs as a task the request waits on for at most lookup_timeout:
            # cancelling a redis-py call can be swallowed (CPython gh-86296 in wait_for),
            # which would hold the request past its budget. A late answer still fills the
            # cache for the next request.
            lookup = self._cache.lookup_task(digest)
            done, _ = await asyncio.wait({lookup}, timeout=self.gate.lookup_timeout)
            if not done:
                self._lookup_failed("timeout")
                return self.refusals.unavailable
            try:
                entry = lookup.result()
            except StoreError as exc:
                self._lookup_failed(type(exc).__name__)
                return self.refusals.unavailable
            if entry is None:
                return self.refusals.invalid
        if scheme == b"Bearer" and len(value) == len(token) + 7:
            self._remember_if_admitted(value, entry)
        return entry

    def _remember_if_admitted(self, value: bytes, entry: CacheEntry) -> None:
        """Remember a canonical ``Bearer <key>`` header for an active key. A revoked or
        expired key, like an unknown one, leaves nothing behind."""
        principal: Principal = entry.derived or self.gate.principal(entry)
        if principal.key.revoked_at is None and self._clock() < principal.expires:
            self._cache.remember(value, entry)

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        refusal: Refusal,
        headers: Headers | None = None,
        principal: Principal | None = None,
    ) -> None:
        """Send a refusal. ``headers=None`` (refusals before the key is known): a browser
        origin the preflight policy allows gets the CORS headers, so it can read why. With
        ``principal``, the refusal counts in the key's usage."""
        if principal is not None and self._usage is not None:
            used_from = next(
                (v.decode("latin-1") for k, v in headers or () if k == _ALLOW_ORIGIN), None
            )
            self._usage.record(
                principal.key_id,
                refusal.status,
                0,
                len(refusal.body),
                ip=self._ip(scope),
                origin=used_from,
                ip_mode=principal.ip_mode,
                rate_limited=refusal.code == "rate_limited",
            )
        if scope["type"] == "websocket":
            # Closing before accepting refuses the handshake; 1008 = policy violation.
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})
            return
        if headers is None:
            headers = []
            value = _header(scope, b"origin")
            if value is not None:
                origin = parse_origin(value)
                if origin is not None and await self._union_allows(origin):
                    headers = self.cors.response_headers(value)
        await refusal.send(send, headers)

    async def _union_allows(self, origin: Origin) -> bool:
        try:
            return await self.cors.union_allows(origin)
        except StoreError:
            return False

    async def _answer_preflight(
        self, scope: Scope, send: Send, origin_value: bytes, method: bytes
    ) -> None:
        origin = parse_origin(origin_value)
        asked = _header(scope, b"access-control-request-headers") or b""
        try:
            ok = origin is not None and await self.cors.preflight_allows(origin, method, asked)
        except StoreError:
            ok = False  # the policy cannot be read: refuse, the browser will retry later
        if not ok:
            await self.refusals.preflight_refused.send(send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": self.cors.preflight_headers(origin_value),
            }
        )
        await send({"type": "http.response.body", "body": b""})


_NO_HEADERS: Headers = []
_ALLOW_ORIGIN = b"access-control-allow-origin"


class _Meter:
    """Counts what passes through one request: body bytes in and out, and the status."""

    __slots__ = ("_receive", "_send", "bytes_in", "bytes_out", "status")

    _receive: Receive
    _send: Send
    bytes_in: int
    bytes_out: int
    status: int

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.bytes_in += len(message.get("body", b""))
        return message

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine: it counts, then hands back what the next send returns for the
        # app to await, so a message costs one plain call here rather than a coroutine.
        kind = message["type"]
        if kind == "http.response.body":
            self.bytes_out += len(message.get("body", b""))
        elif kind == "http.response.start":
            self.status = message["status"]
        send = self._send  # an attribute, then a call: 3.11 specializes a slot's LOAD_ATTR
        return send(message)


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The value of a header sent once; ``None`` if absent or repeated (ambiguous)."""
    found = None
    for key, value in scope["headers"]:
        if key == name:
            if found is not None:
                return None
            found = value
    return found


def _adding_headers(send: Send, headers: Headers) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return send_with_headers
