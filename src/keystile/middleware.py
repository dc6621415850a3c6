"""KeystileMiddleware: the pure-ASGI gate in front of an app.

Each HTTP request or websocket passes, in order: a CORS preflight, answered before any
key is asked for; the ``Authorization`` credential, resolved to its key's
:class:`~keystile.principal.Principal`; a revoked or expired key, refused; the key's own
origin and address lists; the route's scopes; the key's rate limits; then the app, whose
response gets the rate-limit and CORS headers and whose use (or refusal) is recorded
once. Lifespan passes through, starting and stopping the gate; anything else passes
straight through. A credential seen moments ago costs no I/O: one dict lookup and a few
comparisons.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Iterable
from typing import Any

from starlette.authentication import AuthCredentials, UnauthenticatedUser
from starlette.types import ASGIApp, Receive, Scope, Send

from keystile import tracing
from keystile.appdocs import AppDocs
from keystile.checks import check_routes
from keystile.cors import CorsPolicy
from keystile.exceptions import KeyFormatError, StoreError, StoreUnavailable
from keystile.fallback import failure_cause, redis_address
from keystile.gate import Keystile
from keystile.keys import parse_key
from keystile.lifespan import gate_lifespan
from keystile.logs import fields
from keystile.meter import Meter
from keystile.network import ClientAddress, allowed, single_header
from keystile.origins import Origin, parse_origin
from keystile.principal import PRINCIPAL, REFUSALS, Principal
from keystile.ratelimit import LimitSet
from keystile.responses import Headers, Refusal, Refusals
from keystile.routing import Rule, RuleTable, route_path
from keystile.stores.cache import CacheEntry
from keystile.telemetry import perf_counter_ns
from keystile.tracing import SPAN

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
        public_docs: bool = True,
        metrics: bool = True,
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
        self.docs = AppDocs(public=public_docs)
        # Decisions counted for keystile.metrics (``metrics=False``: not even counted).
        self.telemetry = self.gate.telemetry if metrics else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and kind != "websocket":
            if kind == "lifespan":
                receive, send = gate_lifespan(
                    scope, receive, send, startup=self._startup, shutdown=self.gate.shutdown
                )
            await self.app(scope, receive, send)
            return
        started = perf_counter_ns()
        if tracing.state.tracer is not None:
            tracing.start(scope)
        if (
            scope.get("method") == "OPTIONS"
            and self.preflight
            and kind == "http"
            and await self._preflight(scope, send)
        ):
            tracing.end(scope, "preflight")
            return
        rule = None
        if self._has_rules:
            rule = self.rules.match(scope.get("method", "GET"), route_path(scope))
        scope[REFUSALS] = self.refusals  # for refusals raised below: scopes, quotas, admin
        if rule is not None and rule.public:
            await self._pass_anonymously(scope, receive, send)
            return
        # Who asks: the one Authorization header (scanned here: a call costs as much as the
        # scan), and the key it names. The hot path recalls the cache entry those exact
        # bytes resolved to moments ago (alive and fresh, or nothing): only an admitted
        # key's canonical ``Bearer <key>`` is ever remembered (_resolve).
        credential = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                if credential is not None:
                    await self._refuse(scope, send, self.refusals.malformed)  # sent twice
                    return
                credential = value
        if credential is None:
            if self.docs.asked(scope):
                await self._pass_anonymously(scope, receive, send)
                return
            await self._refuse(scope, send, self.refusals.missing)
            return
        entry = self._cache.recall(credential)
        if entry is None:
            with tracing.child(scope, "keystile.key_lookup"):
                resolved = await self._resolve(credential)
            if isinstance(resolved, Refusal):
                await self._refuse(scope, send, resolved)
                return
            entry = resolved
        principal = entry.principal or self.gate.principal(entry)
        now = self._clock()
        if principal.revoked or now >= principal.expires:
            await self._refuse_inactive(scope, send, principal, credential)
            return
        # What it may do: from where, on this route, how often. Refusals from here on
        # count in the key's usage.
        origin = None  # the Origin the key's own list admitted: answers carry CORS headers
        if principal.restricted:
            origin, refusal = self._check_origin_and_address(scope, principal)
            if refusal is not None:
                await self._refuse_use(scope, send, refusal, principal, origin, self._cors(origin))
                return
        if rule is not None or self.deny_unmatched:
            refusal = self._check_scopes(principal, rule)
            if refusal is not None:
                await self._refuse_use(scope, send, refusal, principal, origin, self._cors(origin))
                return
        scope["auth"] = principal.auth
        scope["user"] = principal.user
        scope[PRINCIPAL] = principal
        if principal.limits is None:
            self._admitted(scope, principal, started)
            headers = _NO_HEADERS if origin is None else self.cors.response_headers(origin)
        else:
            limited = await self._limit(scope, send, principal, principal.limits, origin)
            if limited is None:
                return
            headers = limited
            self._admitted(scope, principal, started)
        # The app, metered (HTTP): its response gets the headers, and its use is recorded
        # when it ends. A websocket's use is recorded as it is let through.
        meter = None
        usage = self._usage
        if kind == "http":
            if usage is not None or headers:
                meter = Meter()  # made in C, its slots set here: this runs on every request
                meter._receive, meter._send, meter.headers = receive, send, headers
                meter.bytes_in = meter.bytes_out = meter.status = 0
                send = meter.send
                if usage is not None:
                    receive = meter.receive
        else:
            self._record(scope, principal, 101, 0, 0, origin, now)
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
            if meter is not None and usage is not None:  # usage.record's work, without a call
                client = scope.get("client")
                ip = self._ip(scope) if self._proxied else client[0] if client else None
                used_from = None if origin is None else origin.decode("latin-1")
                pending = usage.pending
                pending.append(
                    (principal.key_id, meter.status, meter.bytes_in, meter.bytes_out, ip,
                     used_from, principal.ip_mode, now, False)
                )  # fmt: skip
                if len(pending) >= usage.due:
                    usage.settle()

    def _admitted(self, scope: Scope, principal: Principal, started: int) -> None:
        # The key's project, as request.state.keystile_project: a copy of the state, never
        # the server's own dict (a server that shares it across requests would mix them).
        scope["state"] = {**scope.get("state", {}), "keystile_project": principal.project}
        if self.telemetry is not None:
            self.telemetry.admit(principal.type_name, started)
        if SPAN in scope:
            tracing.end(scope, "admitted", principal)

    async def _pass_anonymously(self, scope: Scope, receive: Receive, send: Send) -> None:
        if SPAN in scope:
            tracing.end(scope, "public")
        scope["auth"] = _ANONYMOUS_AUTH
        scope["user"] = _ANONYMOUS_USER
        await self.app(scope, receive, send)

    async def _startup(self, app: Any) -> None:
        """When the app starts: every route's scopes exist (or start-up stops, see
        :func:`keystile.checks.check_routes`), the docs pages are known, the gate ready."""
        check_routes(app, self.gate.policy.catalogue, self.rules.rules)
        self.docs.discover(app)
        await self.gate.startup()

    async def _preflight(self, scope: Scope, send: Send) -> bool:
        """Answer a CORS preflight, if this ``OPTIONS`` is one (it has an ``Origin`` and an
        ``Access-Control-Request-Method``); whether it was. A preflight never carries the
        key: it is answered before authentication, from the union of the keys' origins."""
        origin_value = single_header(scope, b"origin")
        method = single_header(scope, b"access-control-request-method")
        if origin_value is None or method is None:
            return False
        origin = parse_origin(origin_value)
        asked = single_header(scope, b"access-control-request-headers") or b""
        try:
            ok = origin is not None and await self.cors.preflight_allows(origin, method, asked)
        except StoreError:
            ok = False  # the policy cannot be read: refuse, the browser will retry later
        if not ok:
            await self.refusals.preflight_refused.send(send)
            return True
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": self.cors.preflight_headers(origin_value),
            }
        )
        await send({"type": "http.response.body", "body": b""})
        return True

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
                self._lookup_failed(f"timed out after {self.gate.lookup_timeout:g} s")
                return self.refusals.unavailable
            try:
                entry = lookup.result()
            except StoreError as exc:
                self._lookup_failed(failure_cause(exc))
                return self.refusals.unavailable
            if entry is None:
                return self.refusals.invalid
        if entry.record.type not in self.gate.policy.types:  # a type no longer declared
            self.gate.undeclared_type(entry.record)
            return self.refusals.invalid
        if scheme == b"Bearer" and len(value) == len(token) + 7:
            self._remember_if_admitted(value, entry)
        return entry

    def _lookup_failed(self, why: str) -> None:
        """Log failed key lookups at most once every 10 seconds (an outage is thousands)."""
        self._lookup_failures += 1
        if self.telemetry is not None:
            self.telemetry.lookup_errors += 1
        now = time.monotonic()
        if now - self._lookup_logged >= 10.0:
            where = redis_address(getattr(self._cache.store, "client", None))
            logger.warning(
                "key lookups failing%s (%s): %d refused with 503 since the last report",
                f" at {where}" if where else "",
                why,
                self._lookup_failures,
                extra=fields("auth.lookups_failing", code="auth_unavailable", store=where or None),
            )
            self._lookup_logged, self._lookup_failures = now, 0

    def _remember_if_admitted(self, value: bytes, entry: CacheEntry) -> None:
        """Remember a canonical ``Bearer <key>`` header for an active key. A revoked or
        expired key, like an unknown one, leaves nothing behind."""
        principal = entry.principal or self.gate.principal(entry)
        if not principal.revoked and self._clock() < principal.expires:
            self._cache.remember(value, entry)

    async def _refuse_inactive(
        self, scope: Scope, send: Send, principal: Principal, credential: bytes
    ) -> None:
        """Refuse a revoked or expired key: counted apart from requests, as an attempt
        (who still uses an old key), and no longer recalled by its credential."""
        self._cache.forget(credential)  # expired since it was remembered
        if self._usage is not None:
            self._usage.record_refusal(principal.key_id, "inactive")
        refusal = self.refusals.revoked if principal.revoked else self.refusals.expired
        tracing.identify(scope, principal)
        await self._refuse(scope, send, refusal, key_type=principal.type_name)

    def _check_origin_and_address(
        self, scope: Scope, principal: Principal
    ) -> tuple[bytes | None, Refusal | None]:
        """For a key restricted to origins or addresses: the request's origin if the key's
        list admitted it (``None`` if none was sent, or it was refused), and the refusal of
        a request from elsewhere (or ``None``)."""
        origin = None
        if principal.origins:
            # The key's own list decides; the app is never called otherwise.
            origins = [v for k, v in scope["headers"] if k == b"origin"]
            if origins:
                if len(origins) > 1 or not principal.origin_ok(origins[0]):
                    return None, self.refusals.origin_not_allowed
                origin = origins[0]
            elif self.cors.require_origin:
                return None, self.refusals.origin_not_allowed
        if principal.networks and not allowed(self.client_address(scope), principal.networks):
            return origin, self.refusals.ip_not_allowed
        return origin, None

    def _check_scopes(self, principal: Principal, rule: Rule | None) -> Refusal | None:
        """The refusal of a key lacking the scopes the route's rule requires, or of a route
        no rule covers (``deny_unmatched``); ``None`` if the key may go on."""
        if rule is None:
            return self.refusals.unmatched if self.deny_unmatched else None
        missing = principal.missing(rule.scopes) if rule.scopes else ()
        return self.refusals.insufficient_scope(missing) if missing else None

    async def _limit(
        self,
        scope: Scope,
        send: Send,
        principal: Principal,
        limits: LimitSet,
        origin: bytes | None,
    ) -> Headers | None:
        """Ask the limiter about ``principal``'s ``limits`` (and, for a window that counts
        each client address apart, this address's share); refuse (and return None) or
        return the headers the response carries: rate limits, and CORS."""
        extra = self._cors(origin)
        address = ""
        if limits.per_address:
            client = self.client_address.read(scope)
            if client is None:  # no address to share the budget by (a Unix socket)
                if principal.key_limits is None:
                    return extra
                limits = principal.key_limits
            else:
                address = client[1]  # the name of its share: see keystile.network
        try:
            with tracing.child(scope, "keystile.rate_limit") as span:
                decision = await self._limiter.hit(principal.key_id, limits, address=address)
                if span is not None:
                    span.set_attribute("keystile.allowed", decision.allowed)
        except StoreUnavailable:  # failure="deny", and the limiter could not decide
            refusal = self.refusals.limiter_unavailable
            await self._refuse_use(scope, send, refusal, principal, origin, extra)
            return None
        if self.telemetry is not None:
            verdict = (
                "degraded" if decision.degraded else "allowed" if decision.allowed else "refused"
            )
            self.telemetry.limits[verdict] += 1
        headers = decision.headers(limits) + extra
        if self.legacy_rate_limit_headers:
            headers += decision.legacy_headers(limits)
        if not decision.allowed:
            refusal = self.refusals.rate_limited_by(decision.refused_by)
            await self._refuse_use(scope, send, refusal, principal, origin, headers)
            return None
        return headers

    def _cors(self, origin: bytes | None) -> Headers:
        """The CORS headers of an answer to ``origin``, one the key's own list admitted."""
        return _NO_HEADERS if origin is None else self.cors.response_headers(origin)

    def _record(
        self,
        scope: Scope,
        principal: Principal,
        status: int,
        bytes_in: int,
        bytes_out: int,
        origin: bytes | None,
        now: float | None,
        rate_limited: bool = False,
    ) -> None:
        """Count one request of ``principal``'s in its usage: let through as a websocket,
        or refused (an app's answer is counted in ``__call__``, which inlines this)."""
        if self._usage is not None:
            used_from = None if origin is None else origin.decode("latin-1")
            ip, mode = self._ip(scope), principal.ip_mode
            key_id = principal.key_id
            self._usage.record(
                key_id, status, bytes_in, bytes_out, ip, used_from, mode, now, rate_limited
            )

    def _ip(self, scope: Scope) -> str | None:
        if self._proxied:
            address = self.client_address(scope)
            return None if address is None else str(address)
        client = scope.get("client")
        return str(client[0]) if client else None

    async def _refuse_use(
        self,
        scope: Scope,
        send: Send,
        refusal: Refusal,
        principal: Principal,
        origin: bytes | None,
        headers: Headers,
    ) -> None:
        """Refuse a request of an active key's, with ``headers``: it counts in the key's
        usage, as from ``origin`` (the one its list admitted, if any)."""
        rate_limited = refusal.code == "rate_limited"
        tracing.identify(scope, principal)
        self._record(
            scope, principal, refusal.status, 0, len(refusal.body), origin, None, rate_limited
        )
        await self._refuse(scope, send, refusal, headers, principal.type_name)

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        refusal: Refusal,
        headers: Headers | None = None,
        key_type: str = "none",
    ) -> None:
        """Send a refusal. ``headers=None`` (refusals before the key is known): a browser
        origin the preflight policy allows gets the CORS headers, so it can read why."""
        if self.telemetry is not None:
            self.telemetry.refuse(refusal.code, key_type)
        if SPAN in scope:
            tracing.end(scope, refusal.code)
        if scope["type"] == "websocket":
            # Closing before accepting refuses the handshake; 1008 = policy violation.
            await send({"type": "websocket.close", "code": 1008, "reason": refusal.code})
            return
        if headers is None:
            headers = []
            value = single_header(scope, b"origin")
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


_NO_HEADERS: Headers = []
