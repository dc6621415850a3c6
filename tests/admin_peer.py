"""A second app process for test_admin: an app behind KeystileMiddleware on a shared Redis.

Protocol on stdin/stdout, one line each: the parent sends ``watch <key>``; this process
sends a request with the key (admitted: the key is now cached here), answers ``watching``,
then repeats the request every half millisecond until it is refused, and answers
``refused <error code> <time.monotonic()>``. CLOCK_MONOTONIC is system-wide on Linux, so
the parent can compare the two clocks. The server secret comes from ``KEYSTILE_SECRET``.
"""

from __future__ import annotations

import asyncio
import sys
import time

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keystile import Keystile, KeystileMiddleware, KeystileSettings, RedisStore


async def endpoint(request: Request) -> JSONResponse:
    return JSONResponse({"key": request.user.identity})


async def main(url: str, namespace: str) -> None:
    gate = Keystile(
        store=RedisStore.from_url(url, namespace=namespace), settings=KeystileSettings()
    )
    if not await gate.store.start(timeout=5.0):
        print("not listening", flush=True)
        return
    app = Starlette(
        routes=[Route("/x", endpoint)], middleware=[Middleware(KeystileMiddleware, gate=gate)]
    )
    loop = asyncio.get_running_loop()
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://peer") as http:
        print("ready", flush=True)
        try:
            for line in sys.stdin:
                command, _, token = line.strip().partition(" ")
                if command != "watch":
                    break
                headers = {"Authorization": f"Bearer {token}"}
                response = await http.get("/x", headers=headers)
                assert response.status_code == 200, response.text
                print("watching", flush=True)
                deadline = loop.time() + 5.0
                while response.status_code == 200 and loop.time() < deadline:
                    await asyncio.sleep(0.0005)
                    response = await http.get("/x", headers=headers)
                code = response.json()["error"]["code"] if response.status_code != 200 else "-"
                print(f"refused {code} {time.monotonic()!r}", flush=True)
        finally:
            await gate.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
