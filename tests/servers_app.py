"""The README's FastAPI app, as a module the servers of tests/test_servers.py import.

    uvicorn servers_app:app --app-dir tests
    gunicorn servers_app:app --pythonpath tests -k uvicorn_worker.UvicornWorker
    hypercorn servers_app:app  (with tests on PYTHONPATH)

Configured by the environment, as a deployed app is: ``KEYSTILE_REDIS_URL``,
``KEYSTILE_SECRET``, ``KEYSTILE_NAMESPACE`` and any other ``KEYSTILE_*`` setting. ``/health``
is public (what the test harness polls); ``GET /cloud/vec/databases`` needs ``vec:read``.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Security

from keystile import ApiKey, Keystile, KeystileMiddleware, public
from keystile.fastapi import api_key

gate = Keystile()
app = FastAPI()
app.add_middleware(KeystileMiddleware, gate=gate, rules=[public("/health")])


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/cloud/vec/databases")
async def list_databases(
    key: ApiKey = Security(api_key, scopes=["vec:read"]),  # noqa: B008 (FastAPI's own idiom)
) -> dict[str, Any]:
    return {"databases": [], "caller": key.name}
