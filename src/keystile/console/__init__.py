"""The web console: sign in with an admin key, then list, create, edit, rotate and revoke the
project's keys, read each key's usage as charts, its alerts, and the audit trail; rename the
project and edit its alert rules and each key's overrides.

A thin, server-rendered surface over the gate's :class:`~keystile.manager.KeyManager` (the
same calls the admin REST API makes, as the signed-in key and within its project). Its
templates, stylesheet and one small script ship in this package: no request leaves for
another host, and nothing needs building. Mount it beside the admin API, and let its paths
through the middleware without a key (:func:`console_rules`): it authenticates by its own
session cookie::

    app = Starlette(
        routes=[admin_mount(gate, "/cloud/keys"), console_mount(gate, "/console")],
        middleware=[Middleware(KeystileMiddleware, gate=gate, rules=console_rules("/console"))],
    )

A FastAPI app mounts it the same way: ``app.mount("/console", console_app(gate))``.

Sign-in exchanges an admin key (one holding ``admin:manage_keys``) for a session cookie
(HttpOnly, SameSite=Strict, Secure over https, 30 minutes renewed by use, at most 12 hours)
signed with a key derived from the server secret. The cookie names the key's id, never its
secret, and every page reads the key's record again: revoking the key, its expiry or losing
the scope signs the session out. Every form carries the session's CSRF token.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.routing import Mount
from starlette.types import ASGIApp

from keystile.console.app import SECURITY_HEADERS, Console
from keystile.gate import Keystile
from keystile.routing import Rule, public

__all__ = ["SECURITY_HEADERS", "Console", "console_app", "console_mount", "console_rules"]


def console_app(gate: Keystile, *, trusted_proxies: Iterable[str] = ()) -> ASGIApp:
    """The console as an ASGI app, for ``Mount(path, app=...)`` or FastAPI's
    ``app.mount(path, ...)``; its paths need :func:`console_rules` in the middleware.
    ``trusted_proxies``: the middleware's, so that an admin key's IP allowlist reads the
    same client address here."""
    return Console(gate, trusted_proxies=trusted_proxies).app()


def console_mount(
    gate: Keystile, path: str = "/console", *, trusted_proxies: Iterable[str] = ()
) -> Mount:
    """The console mounted at ``path``; add ``console_rules(path)`` to the middleware's
    rules so that browsers reach it without an API key."""
    return Mount(path, app=console_app(gate, trusted_proxies=trusted_proxies))


def console_rules(prefix: str = "/console") -> list[Rule]:
    """Rules letting every request under ``prefix`` through the middleware without a key:
    the console checks its own session on every page."""
    base = prefix.rstrip("/")
    return [public(base or "/"), public(f"{base}/{{path:path}}")]
