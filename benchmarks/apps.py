"""The apps the benchmarks drive: one small route, bare or behind one middleware.

``bench_middleware.py`` builds its contenders from here; ``bench_server.py`` serves these
with uvicorn (``--app-dir benchmarks``):

    uvicorn --app-dir benchmarks apps:bare_app
    KSBENCH_TOKEN_FILE=/tmp/token uvicorn --app-dir benchmarks --factory apps:keystile_app
    KSBENCH_TOKEN_FILE=/tmp/token uvicorn --app-dir benchmarks --factory apps:authmw_app

The factories issue a ``prod_`` key when their lifespan starts (keystile: through its
manager, memory store; the do-it-yourself app: a token of the same format in a dict) and
write it to the file named by ``KSBENCH_TOKEN_FILE``: the file appears once the app is
about to serve. With ``KSBENCH_KEYS=N`` they issue N keys (one per line in the file);
``KSBENCH_REDIS_URL`` and ``KSBENCH_NAMESPACE`` put keystile's keys in Redis instead of
memory, and ``KSBENCH_USAGE=off`` turns its usage recording off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    SimpleUser,
)
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from keystile import generate_key
from keystile.gate import Keystile
from keystile.middleware import KeystileMiddleware

PATH = "/cloud/vec/databases"
SECRET = "benchmark-secret-0123456789"
TOKEN_FILE_ENV = "KSBENCH_TOKEN_FILE"
KEYS_ENV = "KSBENCH_KEYS"
REDIS_ENV = "KSBENCH_REDIS_URL"
NAMESPACE_ENV = "KSBENCH_NAMESPACE"
USAGE_ENV = "KSBENCH_USAGE"
SCOPES = ("vec:read",)
KEY_SETTINGS = {"name": "bench", "type": "prod", "scopes": list(SCOPES)}

_DATABASES = {"databases": [{"id": "db_1", "name": "products", "dimensions": 768}]}


async def list_databases(request: Request) -> JSONResponse:
    return JSONResponse(_DATABASES)


def routes() -> list[Route]:
    return [Route(PATH, list_databases, methods=["GET"])]


def make_app(middleware: list[Middleware] | None = None, **kwargs: object) -> Starlette:
    """The benchmark app; every contender is this app plus one middleware."""
    return Starlette(routes=routes(), middleware=middleware, **kwargs)  # type: ignore[arg-type]


def memory_gate() -> Keystile:
    # An explicit memory:// store, whatever KEYSTILE_REDIS_URL says.
    return Keystile(store="memory://", secret=SECRET)


# -- the do-it-yourself baseline: AuthenticationMiddleware and a dict ---------------------------


@dataclass(frozen=True)
class DictKey:
    name: str
    scopes: tuple[str, ...]


class DictBackend(AuthenticationBackend):
    """``Authorization: Bearer <token>`` looked up in a dict: the baseline people write."""

    def __init__(self, tokens: dict[str, DictKey]) -> None:
        self.tokens = tokens

    async def authenticate(
        self, conn: HTTPConnection
    ) -> tuple[AuthCredentials, SimpleUser] | None:
        header = conn.headers.get("authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise AuthenticationError("Invalid authorization scheme")
        key = self.tokens.get(token.strip())
        if key is None:
            raise AuthenticationError("Invalid API key")
        return AuthCredentials(list(key.scopes)), SimpleUser(key.name)


# -- what uvicorn serves --------------------------------------------------------------------------

bare_app = make_app()


def write_tokens(path: str, tokens: list[str]) -> None:
    partial = path + ".partial"
    with open(partial, "w", encoding="ascii") as out:
        out.write("\n".join(tokens))
    os.replace(partial, path)  # the file appears whole, once the app is about to serve


def key_count() -> int:
    return max(1, int(os.environ.get(KEYS_ENV, "1")))


async def issue(gate: Keystile, count: int) -> list[str]:
    """``count`` keys through the manager, 50 at a time (the store pool's size)."""
    secrets: list[str] = []
    for start in range(0, count, 50):
        batch = [gate.manager.create(KEY_SETTINGS) for _ in range(min(50, count - start))]
        secrets += [created.secret.get_secret_value() for created in await asyncio.gather(*batch)]
    return secrets


def keystile_app() -> Starlette:
    """A uvicorn ``--factory``: the app behind keystile, with a memory store (or Redis)."""
    url = os.environ.get(REDIS_ENV)
    if url:
        gate = Keystile(
            store=url, secret=SECRET, namespace=os.environ.get(NAMESPACE_ENV, "ksbench")
        )
    else:
        gate = memory_gate()
    token_file = os.environ.get(TOKEN_FILE_ENV)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tokens = await issue(gate, key_count())
        if token_file:
            write_tokens(token_file, tokens)
        yield
        await gate.aclose()

    usage = os.environ.get(USAGE_ENV, "on") != "off"
    middleware = [Middleware(KeystileMiddleware, gate=gate, record_usage=usage)]
    return make_app(middleware, lifespan=lifespan)


def authmw_app() -> Starlette:
    """A uvicorn ``--factory``: the app behind AuthenticationMiddleware and a dict."""
    tokens: dict[str, DictKey] = {}
    token_file = os.environ.get(TOKEN_FILE_ENV)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        issued = [generate_key("prod_") for _ in range(key_count())]
        for token in issued:
            tokens[token] = DictKey("bench", SCOPES)
        if token_file:
            write_tokens(token_file, issued)
        yield

    backend = DictBackend(tokens)
    return make_app([Middleware(AuthenticationMiddleware, backend=backend)], lifespan=lifespan)
