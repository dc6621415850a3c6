"""The app that test_usage, test_alerts and their worker processes meter: a few endpoints
behind KeystileMiddleware, an HTTP client over ASGI from a chosen client address, and a
driver for the ASGI lifespan (startup on enter, shutdown on exit)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from keystile.gate import Keystile
from keystile.middleware import KeystileMiddleware

CHUNK = 100  # bytes per chunk of /stream/{chunks}


def build_app(gate: Keystile) -> Starlette:
    """Endpoints whose answers a test can predict byte for byte.

    ``GET /bytes/{n}`` answers ``n`` bytes; ``POST /echo`` answers the length of the body it
    read; ``GET /stream/{chunks}`` streams ``chunks`` × 100 bytes; ``GET /fail/{status}``
    answers ``status`` with ``b"failed"``; ``GET /boom`` raises; ``POST /infer/{tokens}``
    reserves ``tokens`` of the key's AI token quota (429 ``quota_exceeded`` when they do not
    fit). Any other path is a 404.
    """

    async def sized(request: Request) -> Response:
        return Response(b"a" * request.path_params["n"], media_type="application/octet-stream")

    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(str(len(body)).encode(), media_type="text/plain")

    async def stream(request: Request) -> StreamingResponse:
        chunks: int = request.path_params["chunks"]

        async def produce() -> AsyncIterator[bytes]:
            for _ in range(chunks):
                yield b"s" * CHUNK

        return StreamingResponse(produce(), media_type="application/octet-stream")

    async def fail(request: Request) -> Response:
        return Response(b"failed", status_code=request.path_params["status"])

    async def boom(request: Request) -> Response:
        raise RuntimeError("the endpoint failed")

    async def infer(request: Request) -> Response:
        await gate.quotas.reserve(request, request.path_params["tokens"])
        return Response(b"ok", media_type="text/plain")

    routes = [
        Route("/bytes/{n:int}", sized),
        Route("/echo", echo, methods=["POST"]),
        Route("/stream/{chunks:int}", stream),
        Route("/fail/{status:int}", fail),
        Route("/boom", boom),
        Route("/infer/{tokens:int}", infer, methods=["POST"]),
    ]
    return Starlette(routes=routes, middleware=[Middleware(KeystileMiddleware, gate=gate)])


@asynccontextmanager
async def http(app: Any, ip: str = "198.51.100.7") -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client calling ``app`` in process, as if from ``ip`` (the ASGI ``client``);
    an exception in the app becomes the 500 the app's error middleware sends."""
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(ip, 40_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://api.test") as client:
        yield client


@asynccontextmanager
async def lifespan(app: Any, timeout: float = 10.0) -> AsyncIterator[list[str]]:
    """Send the ASGI lifespan startup to ``app`` on enter and the shutdown on exit; yields
    the types of the messages the app answered with."""
    inbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    answered: list[str] = []
    started = asyncio.Event()
    stopped = asyncio.Event()

    async def receive() -> dict[str, Any]:
        return await inbox.get()

    async def send(message: dict[str, Any]) -> None:
        answered.append(message["type"])
        if message["type"].startswith("lifespan.startup."):
            started.set()
        elif message["type"].startswith("lifespan.shutdown."):
            stopped.set()

    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
    task = asyncio.create_task(app(scope, receive, send))
    await inbox.put({"type": "lifespan.startup"})
    await asyncio.wait_for(started.wait(), timeout)
    try:
        yield answered
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(stopped.wait(), timeout)
        await asyncio.wait_for(task, timeout)
