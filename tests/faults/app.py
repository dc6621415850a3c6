"""The app the fault tests put keystile in front of, in process or under uvicorn.

``GET /health`` is public (a ``public()`` rule); ``GET|POST /x`` needs a key and answers
``{"id": <key id>, "pid": <process id>, "passes": <limiter passes so far>}`` so a test can
tell which key was admitted, by which worker, and whether the limiter decided.

Under uvicorn: ``uvicorn --factory faults.app:create_app --app-dir tests ...``, configured
by the environment: ``KEYSTILE_REDIS_URL``, ``KEYSTILE_SECRET``, ``KEYSTILE_NAMESPACE`` and any
other ``KEYSTILE_*`` setting; ``KS_LOOKUP_TIMEOUT`` (seconds) and ``KS_TRUSTED_PROXIES``
(comma-separated) for what is not a setting.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from keystile.gate import Keystile
from keystile.middleware import KeystileMiddleware
from keystile.routing import Rule, public

RULES = (
    public("/health"),
    Rule("GET|POST", "/x", ["kev:read"]),
)


def build_app(
    gate: Keystile, *, trusted_proxies: Iterable[str] = (), cors_origins: Iterable[str] = ()
) -> Starlette:
    """``/health`` and ``/x`` behind KeystileMiddleware (unmatched routes refused)."""

    async def health(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def x(request: Request) -> Response:
        await request.body()
        passes = getattr(gate.limiter, "passes", 0)
        return JSONResponse({"id": request.user.identity, "pid": os.getpid(), "passes": passes})

    return Starlette(
        routes=[Route("/health", health), Route("/x", x, methods=["GET", "POST"])],
        middleware=[
            Middleware(
                KeystileMiddleware,
                gate=gate,
                rules=RULES,
                deny_unmatched=True,
                trusted_proxies=trusted_proxies,
                cors_origins=cors_origins,
            )
        ],
    )


def create_app() -> Starlette:
    """A uvicorn factory: the app on a gate configured from the environment."""
    gate = Keystile(lookup_timeout=float(os.environ.get("KS_LOOKUP_TIMEOUT", "1.0")))
    proxies = [p for p in os.environ.get("KS_TRUSTED_PROXIES", "").split(",") if p]
    return build_app(gate, trusted_proxies=proxies)
