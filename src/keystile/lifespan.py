"""The middleware's part in the ASGI lifespan protocol: prepare the gate when the app
starts, flush usage when it stops — and never let an exception switch lifespan off.

A server that sees an exception escape the app before ``lifespan.startup.complete`` takes
it for an app without lifespan support (uvicorn's and hypercorn's default ``auto`` mode):
it says so at info level and serves on, and then ``shutdown`` never runs and the last
usage is lost. So:

- a mistake that must stop the app (:class:`~keystile.exceptions.ConfigurationError`: a
  route's unknown scope; :class:`~keystile.exceptions.StoreMisconfigured`) is answered with
  ``lifespan.startup.failed`` and its message, which every server logs before it exits;
- any other exception while preparing (the store's first check, the limiter's scripts) is
  logged with its traceback, and the app starts: everything the start-up prepares is also
  prepared on first use;
- an exception while shutting down is logged, and the app's own shutdown goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import Message, Receive, Scope, Send

from keystile.exceptions import ConfigurationError, StoreMisconfigured
from keystile.logs import fields

__all__ = ["gate_lifespan"]

logger = logging.getLogger("keystile")

_STOPPING = (ConfigurationError, StoreMisconfigured)


def gate_lifespan(
    scope: Scope,
    receive: Receive,
    send: Send,
    *,
    startup: Callable[[Any], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
) -> tuple[Receive, Send]:
    """``receive`` and ``send`` for the app behind the middleware: ``startup(app)`` runs
    when the server starts the app, ``shutdown()`` when it stops it."""
    failed = False

    async def receive_lifespan() -> Message:
        nonlocal failed
        message = await receive()
        kind = message["type"]
        if kind == "lifespan.startup":
            try:
                await startup(scope.get("app"))
            except _STOPPING as exc:
                failed = True
                await send({"type": "lifespan.startup.failed", "message": str(exc)})
                raise
            except Exception:
                logger.exception(
                    "keystile: preparing at start-up failed; starting anyway (what start-up "
                    "prepares is prepared on first use)",
                    extra=fields("lifespan.startup_failed"),
                )
        elif kind == "lifespan.shutdown":
            try:
                await shutdown()
            except Exception:
                logger.exception(
                    "keystile: shutting down failed (usage may be lost)",
                    extra=fields("lifespan.shutdown_failed"),
                )
        return message

    async def send_lifespan(message: Message) -> None:
        if failed and message["type"] == "lifespan.startup.failed":
            return  # the server was told, with the message that says why
        await send(message)

    return receive_lifespan, send_lifespan
