"""The console's server time per page with 1,000 keys in the project (and 100 other keys in
another project), on the memory store and on a ``redis-server`` of its own.

    python benchmarks/bench_console.py            # ~30 s
    python benchmarks/bench_console.py --rounds 5

Each page is requested in process (httpx's ASGI transport, no network), signed in, and
timed from the request to the end of the answer; the figure is the median and the worst
of ``--rounds`` requests per page, after one warm-up. The pages: the keys list (50 keys and
a next page), a name search that reads all 1,000, a key's usage page (after 200 requests
with the key), the create form, the edit form and the audit trail.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
from starlette.applications import Starlette
from starlette.middleware import Middleware

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from apps import SECRET  # noqa: E402
from bench_ratelimit import own_redis  # noqa: E402
from keystile import Keystile, KeystileMiddleware  # noqa: E402
from keystile.admin import admin_mount, admin_rules  # noqa: E402
from keystile.console import console_mount, console_rules  # noqa: E402
from keystile.demo import DEMO_RULES, build_demo_app  # noqa: E402

KEYS = 1000


@contextlib.asynccontextmanager
async def client_for(app: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40_000))  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://bench.test") as client:
        yield client


async def measure(store: str, rounds: int) -> dict[str, tuple[float, float]]:
    gate = Keystile(store=store, secret=SECRET, namespace="bench-console")
    app = Starlette(
        routes=[admin_mount(gate), console_mount(gate, "/console")],
        middleware=[
            Middleware(
                KeystileMiddleware,
                gate=gate,
                rules=[*admin_rules(), *console_rules("/console"), *DEMO_RULES],
            )
        ],
    )
    create = gate.manager.create
    admin = await create({"name": "admin", "type": "prod", "scopes": ["*"], "project": "main"})
    worker = await create(
        {"name": "worker", "type": "dev", "scopes": ["vec:read"], "project": "main"}
    )
    for start in range(0, KEYS - 2, 50):
        await asyncio.gather(
            *(
                create({"name": f"key {i:04}", "type": "dev", "project": "main"})
                for i in range(start, min(start + 50, KEYS - 2))
            )
        )
    for start in range(0, 100, 50):
        await asyncio.gather(
            *(
                create({"name": f"other {i}", "type": "dev", "project": "other"})
                for i in range(start, start + 50)
            )
        )
    demo = build_demo_app(gate)
    token = worker.secret.get_secret_value()
    async with client_for(demo) as api:
        for _ in range(200):
            await api.get("/cloud/vec/databases", headers={"Authorization": f"Bearer {token}"})
    pages = {
        "keys list": "/console/keys",
        "name search": "/console/keys?q=key+0999",
        "key usage": f"/console/keys/{worker.key.id}",
        "create form": "/console/keys/new",
        "edit form": f"/console/keys/{worker.key.id}/edit",
        "audit trail": "/console/audit",
        "alert rules": "/console/alert-rules",
        "a key's alert rules": f"/console/keys/{worker.key.id}/alert-rules",
        "project settings": "/console/project",
    }
    figures: dict[str, tuple[float, float]] = {}
    async with client_for(app) as client:
        signed = await client.post(
            "/console/signin", data={"key": admin.secret.get_secret_value()}
        )
        assert signed.status_code == 303, signed.text
        for name, path in pages.items():
            times = []
            for index in range(rounds + 1):
                started = time.perf_counter()
                answer = await client.get(path)
                elapsed = (time.perf_counter() - started) * 1000
                assert answer.status_code == 200, (path, answer.status_code)
                if index:
                    times.append(elapsed)
            if name == "keys list":
                assert len(re.findall(r'<details class="menu">', answer.text)) == 50
            figures[name] = (statistics.median(times), max(times))
    await gate.aclose()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    stores = [("memory", "memory://")]
    binary = shutil.which("redis-server")
    with contextlib.ExitStack() as stack:
        if binary:
            stores.append(("redis", stack.enter_context(own_redis(binary))))
        else:
            print("(no redis-server on PATH: the memory store only)")
        print(f"console pages, {KEYS} keys in the project, ms server time: median / worst")
        print("  (target: every page's median under 100 ms)")
        for label, url in stores:
            figures = asyncio.run(measure(url, args.rounds))
            for page, (median, worst) in figures.items():
                verdict = "PASS" if median < 100 else "FAIL"
                print(f"  {label:<7} {page:<20} {median:7.1f} / {worst:7.1f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
