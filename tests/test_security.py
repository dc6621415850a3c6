"""Security properties that hold across the code base (issue #18)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REDIS_URL, require_redis

SRC = Path(__file__).resolve().parent.parent / "src" / "keystile"


# -- item 0: no assert on a runtime condition, and nothing that only works on asyncio's loop --


def test_item0_no_assert_statement_in_the_library() -> None:
    """``python -O`` strips asserts, and an assert that fires is a 500 with a bare
    AssertionError (as uvloop's transports once caused): the library raises real errors."""
    modules = sorted(SRC.rglob("*.py"))
    assert len(modules) > 20
    found = [
        f"{path.relative_to(SRC.parent)}:{node.lineno}"
        for path in modules
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path)))
        if isinstance(node, ast.Assert)
    ]
    assert found == [], f"assert statements in src/keystile: {found}"


SHUTDOWN = """
import asyncio, sys
from redis.asyncio import Redis
from keystile import RedisStore
from keystile.stores.cache import CachedStore

async def main():
    client = Redis.from_url(sys.argv[2])
    store = RedisStore(client, namespace=sys.argv[3])
    assert await CachedStore(store).start()  # following key changes
    await client.aclose()  # the app forgets to close the store itself

factory = None
if sys.argv[1] == "uvloop":
    import uvloop
    factory = uvloop.new_event_loop
for _ in range(5):  # five rounds, in case the race goes the other way once
    with asyncio.Runner(loop_factory=factory) as runner:  # cancels what is left, then waits
        runner.run(main())
print("shut down")
"""


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_item0_a_store_left_open_does_not_hang_the_event_loops_shutdown(
    loop: str, redis_namespace: str
) -> None:
    """An app that stops with the store's change listener still running (its client closed
    under it): the event loop's shutdown cancels the listener, and it ends — on uvloop the
    cancel used to arrive as a lost connection, which the listener retried for ever."""
    require_redis()
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    code = textwrap.dedent(SHUTDOWN)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, loop, REDIS_URL, redis_namespace],
            capture_output=True,
            text=True,
            timeout=20,
            env={"PYTHONPATH": str(SRC.parent), "PATH": ""},
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the event loop ({loop}) never finished shutting down")
    assert done.returncode == 0 and done.stdout == "shut down\n", done.stderr[-2000:]
