"""A keystile server in its own process, for the browser, CORS and network tests.

Two ways to run it, both printing the secrets of the keys it was asked to create as one
line ``KEYSTILE-TEST-KEYS ["<secret>", ...]`` on standard output:

- ``python -m uvicorn --factory gate_server:create_app --app-dir tests/browser ...``: the
  demo API on a :class:`~keystile.gate.Keystile` configured from the environment
  (``KEYSTILE_REDIS_URL``, ``KEYSTILE_SECRET``, ``KEYSTILE_NAMESPACE``), under the real
  uvicorn command line and whatever flags the test gives it (``--no-proxy-headers``...).
  The keys are created when the app starts (lifespan), in the server's event loop.
- ``python tests/browser/gate_server.py demo PORT``: ``keystile demo`` itself
  (:func:`keystile.cli.main`), with its uvicorn configured exactly as the command line
  configures it; the requested keys are created next to the demo's own.

The keys to create are a JSON list of key settings in ``KEYSTILE_TEST_SEED``.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from keystile.gate import Keystile

MARKER = "KEYSTILE-TEST-KEYS"


async def _seed(gate: Keystile) -> None:
    """Create the keys ``KEYSTILE_TEST_SEED`` asks for and print their secrets."""
    wanted = json.loads(os.environ.get("KEYSTILE_TEST_SEED") or "[]")
    secrets = [(await gate.manager.create(s)).secret.get_secret_value() for s in wanted]
    print(MARKER, json.dumps(secrets), flush=True)


def _seeding(app: ASGIApp, seed: Callable[[], Awaitable[None]]) -> ASGIApp:
    """``app``, creating the keys just before it starts."""

    async def seeding_app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await app(scope, receive, send)
            return

        async def receive_seeding() -> Message:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await seed()
            return message

        await app(scope, receive_seeding, send)

    return seeding_app


def create_app() -> ASGIApp:
    """The demo API on a gate configured from the environment (a uvicorn factory)."""
    from keystile.demo import build_demo_app

    gate = Keystile()
    return _seeding(build_demo_app(gate), lambda: _seed(gate))


def run_demo(port: int) -> int:
    """``keystile demo --port PORT``, creating the requested keys with the demo's own."""
    import keystile.cli
    import keystile.demo

    original = keystile.demo.seed_demo_keys

    async def seed_demo_keys(gate: Keystile) -> Any:
        keys = await original(gate)
        await _seed(gate)
        return keys

    # cli._demo imports seed_demo_keys from keystile.demo when it runs.
    keystile.demo.seed_demo_keys = seed_demo_keys  # type: ignore[assignment]
    return keystile.cli.main(["demo", "--host", "127.0.0.1", "--port", str(port)])


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "demo":
        sys.exit("usage: gate_server.py demo PORT")
    sys.exit(run_demo(int(sys.argv[2])))
