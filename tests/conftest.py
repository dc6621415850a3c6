"""Shared fixtures: every store behaviour runs against memory, fakeredis and real Redis."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import SimpleNamespace
from typing import Any

import fakeredis
import pytest
import redis
import redis.asyncio

from keystile import CreatedKey, KeyHasher, KeyManager, ManualClock, MemoryStore, RedisStore
from keystile.stores import CachedStore, KeyStore

REDIS_URL = os.environ.get("KEYSTILE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
# .ci/run sets this so that "no Redis" fails the run instead of skipping tests.
REDIS_REQUIRED = os.environ.get("KEYSTILE_TEST_REQUIRE_REDIS", "") not in ("", "0")
SECRET = "test-server-secret-0123456789abcdef"

_redis_problem: str | bool | None = False  # False: not probed yet


def redis_problem() -> str | None:
    """Why the real Redis cannot be used, or None when it answers."""
    global _redis_problem
    if _redis_problem is False:
        try:
            client = redis.Redis.from_url(REDIS_URL, socket_timeout=1, socket_connect_timeout=1)
            client.ping()
            client.close()
            _redis_problem = None
        except (redis.RedisError, OSError) as exc:
            _redis_problem = f"no Redis at {REDIS_URL} ({type(exc).__name__}: {exc})"
    assert _redis_problem is not False
    return _redis_problem


def require_redis() -> None:
    """Skip (or, when Redis is required, fail) unless the real Redis answers."""
    problem = redis_problem()
    if problem is None:
        return
    message = f"{problem}; set KEYSTILE_TEST_REDIS_URL to a reachable server"
    if REDIS_REQUIRED:
        pytest.fail(f"real Redis is required (KEYSTILE_TEST_REQUIRE_REDIS): {message}")
    pytest.skip(message)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is not None and {"redis", "cluster", "sentinel"} & set(callspec.id.split("-")):
            item.add_marker(pytest.mark.redis)


def new_namespace() -> str:
    return "kstest-" + secrets.token_hex(6)


def cleanup_namespace(namespace: str, url: str = REDIS_URL) -> None:
    """Delete what a test wrote under its own namespace; never flush the server."""
    client = redis.Redis.from_url(url)
    try:
        names = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        if names:
            client.delete(*names)
    finally:
        client.close()


@pytest.fixture
def redis_namespace() -> Iterator[str]:
    """A namespace on the real Redis, cleaned up afterwards."""
    require_redis()
    namespace = new_namespace()
    yield namespace
    cleanup_namespace(namespace)


class _FakeConnection(fakeredis.FakeAsyncRedisConnection):  # type: ignore[misc]
    """fakeredis's async connection, printable when it is given a server of the test's own.

    fakeredis (2.41.0, the newest release as of 2026-12) prints a connection as its
    ``server_key``, an attribute it sets only when it looks up a server by host and port
    itself, never when the client is given ``server=``. redis-py 8.2.0 prints the connection
    into a DEBUG record each time a write or read fails
    (``redis.asyncio.connection.add_debug_log_for_connection_failure``), so with that logger
    enabled for DEBUG (KEYSTILE_TEST_LEAK_CHECK=1 sets the root logger to DEBUG) a fakeredis
    server made to drop its connections (``server.connected = False``) raised AttributeError
    instead of redis.ConnectionError. redis-py 8.1 never printed the connection there.
    Drop this class once fakeredis prints such connections itself."""

    def __str__(self) -> str:
        key = getattr(self, "server_key", None)
        return key if isinstance(key, str) else f"fakeredis {self.host}:{self.port}"


def fake_redis(server: fakeredis.FakeServer | None = None) -> redis.asyncio.Redis:
    """A fakeredis asyncio client on ``server`` (a new FakeServer by default): every test
    builds its fakeredis clients given a server here (see _FakeConnection)."""
    return fakeredis.FakeAsyncRedis(
        server=fakeredis.FakeServer() if server is None else server,
        connection_class=_FakeConnection,
    )


async def _make_store(kind: str, namespace: str, **options: Any) -> RedisStore | MemoryStore:
    if kind == "memory":
        return MemoryStore()
    if kind == "fakeredis":
        return RedisStore(fake_redis(options.pop("server", None)), namespace=namespace, **options)
    if kind == "cluster":
        assert _cluster is not None, "the cluster backend needs the redis_cluster fixture"
        return RedisStore.from_url(_cluster.url, namespace=namespace, **options)
    if kind == "sentinel":
        assert _sentinel is not None, "the sentinel backend needs the redis_sentinel fixture"
        return RedisStore.from_url(_sentinel.store_url, namespace=namespace, **options)
    return RedisStore.from_url(REDIS_URL, namespace=namespace, **options)


# "cluster": a 3-primary Redis Cluster of the session's own (tests/faults/redis_cluster.py);
# "sentinel": a master of the session's own reached through a sentinel (redis+sentinel://).
BACKENDS = ["memory", "fakeredis", "redis", "cluster", "sentinel"]
_cluster: Any = None  # the session's faults.redis_cluster.RedisCluster, once started
_sentinel: Any = None  # the session's faults.redis_sentinel.Sentinel, once started


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[Any]:
    """A redis-server master and one sentinel watching it, on free loopback ports, made
    once per session and stopped (by pid) at its end."""
    global _sentinel
    from faults.redis_sentinel import Sentinel
    from faults.redis_server import RedisServer, need_redis_server

    need_redis_server()
    master = RedisServer()
    master.start()
    watcher = None
    try:
        watcher = Sentinel(master)
        _sentinel = watcher
        yield watcher
    finally:
        _sentinel = None
        if watcher is not None:
            watcher.close()
        master.close()


@pytest.fixture
def own_redis() -> Iterator[Any]:
    """A redis-server of the test's own on a free loopback port (to kill, slow or fill
    without touching the shared one), stopped by pid at teardown."""
    from faults.redis_server import RedisServer, need_redis_server

    need_redis_server()
    server = RedisServer()
    server.start()
    yield server
    server.close()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[Any]:
    """Three redis-server primaries in a Redis Cluster on free loopback ports, made once
    per session and stopped (by pid) at its end."""
    global _cluster
    from faults.redis_cluster import RedisCluster
    from faults.redis_server import need_redis_server

    need_redis_server()
    made = RedisCluster(primaries=3)
    try:
        made.start()
        _cluster = made
        yield made
    finally:
        _cluster = None
        made.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> Iterator[tuple[str, str]]:
    """A backend kind and a fresh namespace; real-Redis data is removed afterwards."""
    kind: str = request.param
    namespace = new_namespace()
    if kind == "redis":
        require_redis()
    cluster = request.getfixturevalue("redis_cluster") if kind == "cluster" else None
    sentinel = request.getfixturevalue("redis_sentinel") if kind == "sentinel" else None
    yield kind, namespace
    if kind == "redis":
        cleanup_namespace(namespace)
    if cluster is not None:
        cluster.cleanup(namespace)
    if sentinel is not None:
        sentinel.cleanup(namespace)


@pytest.fixture
async def store(backend: tuple[str, str]) -> AsyncIterator[KeyStore]:
    """A bare store of each backend."""
    kind, namespace = backend
    made = await _make_store(kind, namespace)
    yield made
    await made.close()


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def hasher() -> KeyHasher:
    return KeyHasher(SECRET)


@pytest.fixture
async def cached(store: KeyStore) -> AsyncIterator[CachedStore]:
    """The store of each backend behind a cache driven by a manual clock."""
    cache = CachedStore(store, ttl=10.0, negative_ttl=2.0, clock=ManualClock(0.0))
    return cache


@pytest.fixture
def manager(cached: CachedStore, hasher: KeyHasher, clock: ManualClock) -> KeyManager:
    return KeyManager(cached, hasher, clock=clock)


async def issue(manager: KeyManager, fields: dict[str, Any]) -> tuple[CreatedKey, str]:
    """Create a key; its creation result and digest."""
    created = await manager.create(fields)
    return created, manager.hasher.digest(created.secret.get_secret_value())


# Wall-clock budgets live only in tests marked `timing` (out of the default run); .ci/run
# runs them apart with KEYSTILE_TEST_TIME_SCALE=2, so a busy machine does not fail them.
TIME_SCALE = float(os.environ.get("KEYSTILE_TEST_TIME_SCALE", "1"))


def budget(seconds: float) -> float:
    """A wall-clock budget, scaled by ``KEYSTILE_TEST_TIME_SCALE``."""
    return seconds * TIME_SCALE


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds; fail if it has not within ``seconds``."""
    loop = asyncio.get_running_loop()
    seconds = budget(seconds)
    deadline = loop.time() + seconds
    while not await check():
        assert loop.time() < deadline, f"not within {seconds * 1000:.0f} ms"
        await asyncio.sleep(0.001)


@pytest.fixture
def unused_redis_url() -> str:
    """A Redis URL on a loopback port where nothing listens."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"


class Figures:
    """Measured figures a test reports; printed at the end of the run."""

    lines: list[str] = []  # noqa: RUF012 - one list for the session

    def add(self, line: str) -> None:
        self.lines.append(line)


@pytest.fixture
def figures() -> Figures:
    return Figures()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if Figures.lines:
        terminalreporter.section("keystile figures")
        for line in Figures.lines:
            terminalreporter.write_line(line)


# -- secret-leak watch (KEYSTILE_TEST_LEAK_CHECK=1; .ci/run sets it) -------------------------

LEAK_CHECK = os.environ.get("KEYSTILE_TEST_LEAK_CHECK", "") not in ("", "0")
_leak_watch: Any = None  # faults.leaks.LeakWatch while the session runs with the check on


def leak_watch() -> Any:
    """The session's LeakWatch, or None when the check is off."""
    return _leak_watch


def pytest_sessionstart(session: pytest.Session) -> None:
    """With the check on: log everything at DEBUG to the watch, and remember every secret
    keystile generates in this process (tests/faults/leaks.py)."""
    global _leak_watch
    if not LEAK_CHECK:
        return
    import logging

    from faults.leaks import LeakWatch, watch_generation

    _leak_watch = LeakWatch()
    root = logging.getLogger()
    root.addHandler(_leak_watch)
    root.setLevel(logging.DEBUG)
    watch_generation(_leak_watch)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With the check on: fail the run if any log record held part of a secret."""
    watch = _leak_watch
    if watch is None:
        return
    if watch.leaks:
        Figures.lines.append(f"SECRET LEAK CHECK FAILED: {len(watch.leaks)} log record(s)")
        Figures.lines.extend(f"  {leak}" for leak in watch.leaks)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    else:
        Figures.lines.append(
            f"secret leak check: {watch.secrets} generated secrets, {watch.records} log "
            "records at DEBUG and above, no 8-character piece of a secret in any of them"
        )


# -- lean Redis connections (keystile.redis.lean) must be closed by whoever opened them ---------

_lean_connections: Any = None  # weakref.WeakSet of every keystile.redis.lean connection made


def _track_lean_connections() -> Any:
    global _lean_connections
    if _lean_connections is None:
        import weakref

        from keystile.redis import lean

        made: weakref.WeakSet[Any] = weakref.WeakSet()
        opened = lean._Connection.__init__

        def tracked(self: Any, *args: Any, **kwargs: Any) -> None:
            opened(self, *args, **kwargs)
            made.add(self)

        lean._Connection.__init__ = tracked  # type: ignore[method-assign]
        _lean_connections = made
    return _lean_connections


@pytest.fixture(autouse=True)
def lean_connections_closed(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that leaves a rate limiter's own Redis connection open (close the
    gate, or the limiter): found later by the garbage collector, it would fail whichever
    test happened to be running then, with a ResourceWarning that names nobody."""
    made = _track_lean_connections()
    before = set(made)
    yield
    left = [c for c in made if c not in before and not c.closed.done()]
    for conn in left:
        conn.drop(ConnectionError("left open by the test"))
    assert not left, f"{len(left)} keystile.redis.lean connection(s) left open: close the gate"


@pytest.fixture
def monotonic(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The monotonic clock of keystile.fallback's back-off, set by the test (asyncio keeps
    its own): ``monotonic[0] += seconds``."""
    now = [1000.0]
    monkeypatch.setattr("keystile.fallback.time", SimpleNamespace(monotonic=lambda: now[0]))
    return now


# -- event loops: KEYSTILE_TEST_LOOP=uvloop runs every async test on uvloop (.ci/run) ---------

TEST_LOOP = os.environ.get("KEYSTILE_TEST_LOOP", "") or "asyncio"
if TEST_LOOP not in ("asyncio", "uvloop"):
    raise pytest.UsageError(f"KEYSTILE_TEST_LOOP is asyncio or uvloop, not {TEST_LOOP!r}")

if TEST_LOOP == "uvloop":
    import uvloop

    @pytest.hookimpl(optionalhook=True)
    def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item
    ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
        """pytest-asyncio (1.4 and later) runs every async test and fixture on uvloop."""
        return {"uvloop": uvloop.new_event_loop}
