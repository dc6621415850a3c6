"""The README's FastAPI app (tests/servers_app.py) under each server people deploy with:
uvicorn (asyncio/h11 and uvloop/httptools), gunicorn with uvicorn's worker (two workers) and
hypercorn (its asyncio and uvloop workers, two each), all on the shared Redis in a namespace
of their own. Under each: a client key's 100/minute is exact over HTTP, a key revoked from
the command line is refused, and SIGTERM stops the server cleanly with every request
counted in the usage store (flushed by the lifespan shutdown, nothing before it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from conftest import REDIS_URL, SECRET
from faults.server import Server, child_env, serve_command
from keystile import KeystileSettings, RedisStore
from keystile.gate import Keystile

pytestmark = [pytest.mark.slow, pytest.mark.redis]

TESTS = Path(__file__).resolve().parent
APP = "servers_app:app"
ORIGIN = "https://app.example.com"
PATH = "/cloud/vec/databases"
LIMITED = 130  # requests with the client key, whose limit is 100/minute


def uvicorn(loop: str, http: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "uvicorn", APP, "--app-dir", str(TESTS)),
            *("--host", "127.0.0.1", "--port", str(port), "--loop", loop, "--http", http),
            "--no-access-log",
        ]

    return argv


def gunicorn(port: int) -> list[str]:
    return [
        *(sys.executable, "-m", "gunicorn", APP, "--pythonpath", str(TESTS)),
        *("--worker-class", "uvicorn_worker.UvicornWorker", "--workers", "2"),
        *("--bind", f"127.0.0.1:{port}", "--graceful-timeout", "20"),
    ]


def hypercorn(worker: str) -> Callable[[int], list[str]]:
    def argv(port: int) -> list[str]:
        return [
            *(sys.executable, "-m", "hypercorn", APP, "--worker-class", worker),
            *("--workers", "2", "--bind", f"127.0.0.1:{port}", "--graceful-timeout", "20"),
        ]

    return argv


class Hypercorn(Server):
    """Hypercorn says nothing of the lifespan: each worker logs "Running on" once its
    startup is complete and it listens."""

    def started(self, line: str) -> bool:
        return "Running on http://127.0.0.1:" in line


# name -> (command, Server class, workers)
SERVERS: dict[str, tuple[Callable[[int], list[str]], type[Server], int]] = {
    "uvicorn-asyncio-h11": (uvicorn("asyncio", "h11"), Server, 1),
    "uvicorn-uvloop-httptools": (uvicorn("uvloop", "httptools"), Server, 1),
    "gunicorn-uvicorn-worker": (gunicorn, Server, 2),
    "hypercorn-asyncio": (hypercorn("asyncio"), Hypercorn, 2),
    "hypercorn-uvloop": (hypercorn("uvloop"), Hypercorn, 2),
}


@pytest.fixture
async def parent_gate(redis_namespace: str) -> AsyncIterator[Keystile]:
    """The test's own gate on the shared Redis, in the servers' namespace."""
    gate = Keystile(
        store=RedisStore.from_url(REDIS_URL, namespace=redis_namespace, timeout=5.0),
        secret=SECRET,
        settings=KeystileSettings(),
    )
    yield gate
    await gate.aclose()


def keystile_env(namespace: str) -> dict[str, str]:
    """What a deployed app (and the command line) is configured with; usage is flushed
    every hour, so what the store holds after the stop was flushed by the shutdown."""
    return child_env(
        KEYSTILE_REDIS_URL=REDIS_URL,
        KEYSTILE_SECRET=SECRET,
        KEYSTILE_NAMESPACE=namespace,
        KEYSTILE_USAGE_FLUSH_INTERVAL="3600",
        # Two workers and the client share two cores with whatever else runs.
        KEYSTILE_RATE_LIMIT_TIMEOUT="5",
        KEYSTILE_REDIS_TIMEOUT="5",
        PYTHONPATH=str(TESTS),  # hypercorn has no --app-dir
    )


def code(answer: httpx.Response) -> str:
    """``"200"``, or the status and the error code of a refusal."""
    if answer.status_code == 200:
        return "200"
    return f"{answer.status_code} {answer.json()['error']['code']}"


@pytest.mark.parametrize("name", list(SERVERS))
async def test_a_readme_app_under_each_server(
    name: str, parent_gate: Keystile, redis_namespace: str
) -> None:
    """130 sequential requests with one client key (100/minute): exactly 100 answered 200
    and 30 answered 429 rate_limited; a production key revoked with ``keystile keys
    revoke`` is refused 401 revoked_api_key; SIGTERM stops the server cleanly, and
    only then does the usage store hold every request (counted, rate-limited, refused)."""
    command, kind, workers = SERVERS[name]
    env = keystile_env(redis_namespace)
    client_key = await parent_gate.manager.create(
        {
            "name": "browser",
            "type": "client",
            "scopes": ["vec:read"],
            "allowed_origins": [ORIGIN],
            # The key's own 100/minute is the subject: one address may spend all of it.
            "address_rate_limit": "100/minute",
        }
    )
    prod_key = await parent_gate.manager.create(
        {"name": "service", "type": "prod", "scopes": ["vec:read"]}
    )
    browser = {"Authorization": f"Bearer {client_key.secret.get_secret_value()}", "Origin": ORIGIN}
    service = {"Authorization": f"Bearer {prod_key.secret.get_secret_value()}"}
    # A new connection for every request, so that every worker takes its share.
    limits = httpx.Limits(max_keepalive_connections=0)
    with serve_command(command, env, kind=kind, workers=workers) as server:
        async with httpx.AsyncClient(
            base_url=server.base_url, limits=limits, timeout=10.0
        ) as http:
            answers = [await http.get(PATH, headers=browser) for _ in range(LIMITED)]
            assert Counter(code(a) for a in answers) == {"200": 100, "429 rate_limited": 30}
            assert [code(a) for a in answers[:100]] == ["200"] * 100
            assert answers[0].json() == {"databases": [], "caller": "browser"}
            assert all(a.headers["retry-after"].isdigit() for a in answers[100:])

            assert code(await http.get(PATH, headers=service)) == "200"
            revoke = subprocess.run(
                [sys.executable, "-m", "keystile.cli", "keys", "revoke", prod_key.key.id],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert revoke.returncode == 0, revoke.stderr
            # Every worker hears of the revocation (pub/sub): wait, within a bound, for the
            # first refusal, then every request is refused.
            deadline = time.monotonic() + 10.0
            attempts = 1
            while code(await http.get(PATH, headers=service)) == "200":
                attempts += 1
                assert time.monotonic() < deadline, "the revoked key is still admitted"
            after = [code(await http.get(PATH, headers=service)) for _ in range(10)]
            assert after == ["401 revoked_api_key"] * 10

        # Nothing flushed yet (the interval is an hour): the shutdown must do it.
        before = await parent_gate.usage.report(client_key.key.id)
        assert before.all_time.requests == 0
        assert server.process is not None
        server.stop()
        # Exit code 0, or (uvicorn, after its shutdown is complete) the SIGTERM re-raised.
        assert server.process.returncode in (0, -signal.SIGTERM), server.output
    assert "Traceback" not in server.output, server.output
    counted = (await parent_gate.usage.report(client_key.key.id)).all_time
    assert (counted.requests, counted.rate_limited, counted.errors_4xx) == (130, 30, 30), (
        server.output
    )
    refused = (await parent_gate.usage.report(prod_key.key.id)).all_time
    assert (refused.requests, refused.inactive_attempts) == (1, attempts + 10), server.output
