"""Who may use the console, and from where: an active key holding ``admin:manage_keys``,
from an address its IP allowlist admits (read as the middleware reads it, behind the same
trusted proxies); and refused sign-ins logged without letting anyone flood the log."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from datetime import datetime
from time import monotonic

from starlette.requests import Request

from keystile.admin_handlers import MANAGE_KEYS
from keystile.logs import fields
from keystile.models import ApiKey
from keystile.network import ClientAddress, allowed, parse_ip_entry
from keystile.scopes import ScopeCatalogue

__all__ = ["REFUSALS_LOGGED_EVERY", "Access"]

logger = logging.getLogger("keystile.console")

#: Refused sign-ins are logged at most once in this many seconds (with a count).
REFUSALS_LOGGED_EVERY = 10.0


class Access:
    """The console's door: who may pass, from where, and the log of those refused."""

    def __init__(
        self,
        catalogue: ScopeCatalogue,
        now: Callable[[], datetime],
        trusted_proxies: Iterable[str] = (),
    ) -> None:
        self.catalogue = catalogue
        self.now = now
        #: Where a request comes from, for the admin key's IP allowlist (as the middleware
        #: reads it: give the same ``trusted_proxies``).
        self.client_address = ClientAddress(trusted_proxies)
        # Refused sign-ins: when one was last logged, and how many were not since.
        self._refusal_logged = -math.inf
        self._refused_since = 0

    def address(self, request: Request) -> str | None:
        """The client's address, as the middleware reads it (the same trusted proxies)."""
        address = self.client_address(request.scope)
        return None if address is None else str(address)

    def refusal(self, request: Request, record: ApiKey) -> str | None:
        """Why this key cannot use the console from where ``request`` comes, or ``None``."""
        if not record.active(self.now()):
            return "This key is revoked or expired."
        if record.allowed_ips and not allowed(
            self.client_address(request.scope), (parse_ip_entry(n) for n in record.allowed_ips)
        ):
            return "This key is not allowed from this address."
        if not self.catalogue.grants(record.scopes, MANAGE_KEYS):
            return f"This key does not hold {MANAGE_KEYS}: sign in with an admin key."
        return None

    def log_refused(self, shown: str, client: str | None, why: str) -> None:
        """Log a refused sign-in: at most one line every :data:`REFUSALS_LOGGED_EVERY`
        seconds, saying how many more were refused since (trying keys floods nothing)."""
        now = monotonic()
        if now - self._refusal_logged < REFUSALS_LOGGED_EVERY:
            self._refused_since += 1
            return
        more = self._refused_since
        self._refusal_logged, self._refused_since = now, 0
        logger.warning(
            "console: sign-in refused for %s from %s: %s%s",
            shown,
            client,
            why,
            f" ({more} more refused since the last report)" if more else "",
            extra=fields("console.sign_in_refused", key_id=shown, client_ip=client),
        )
