"""Raw ASGI calls with timings: what a fault test needs to know about every request.

No HTTP client in between, so hundreds of requests can be in flight in one event loop
and the start time recorded is the moment the app is entered.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

App = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def error_code(body: bytes) -> str | None:
    """``error.code`` of a JSON error envelope, if ``body`` is one."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        code = data["error"].get("code")
        return code if isinstance(code, str) else None
    return None


@dataclass(slots=True)
class Outcome:
    """One request: when it started (``time.monotonic()``), how long it took, what came
    back — or the exception the app raised, or ``hung`` when it outlived its budget."""

    label: str
    started: float
    elapsed: float = 0.0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None
    hung: bool = False

    @property
    def code(self) -> str | None:
        """``error.code`` of a JSON error envelope, if the body is one."""
        return error_code(self.body)


def scope_for(
    path: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    method: str = "GET",
    client: tuple[str, int] = ("127.0.0.1", 40000),
    query: bytes = b"",
) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": list(headers),
        "client": client,
        "server": ("test", 80),
    }


def bearer(secret: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {secret}".encode())]


async def call(
    app: App,
    path: str,
    headers: Iterable[tuple[bytes, bytes]] = (),
    *,
    label: str = "",
    budget: float = 10.0,
    method: str = "GET",
    body: bytes = b"",
    client: tuple[str, int] = ("127.0.0.1", 40000),
    query: bytes = b"",
) -> Outcome:
    """Call ``app`` once; never raises (an exception is recorded in the outcome)."""
    scope = scope_for(path, headers, method=method, client=client, query=query)
    outcome = Outcome(label, time.monotonic())
    parts: list[bytes] = []
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # a disconnect never comes: the budget ends the call
        raise AssertionError("unreachable")

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            outcome.status = message["status"]
            outcome.headers = {
                k.decode("latin-1").lower(): v.decode("latin-1")
                for k, v in message.get("headers", [])
            }
        elif message["type"] == "http.response.body":
            parts.append(message.get("body", b""))

    deadline = asyncio.timeout(budget)
    try:
        async with deadline:
            await app(scope, receive, send)
    except Exception as exc:
        if isinstance(exc, TimeoutError) and deadline.expired():
            outcome.hung = True
        else:
            outcome.error = f"{type(exc).__name__}: {exc}"
    outcome.elapsed = time.monotonic() - outcome.started
    outcome.body = b"".join(parts)
    return outcome
