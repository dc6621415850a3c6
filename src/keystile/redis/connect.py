"""The one place keystile builds Redis connections.

- :func:`open_redis` — a ``redis.asyncio`` client from a URL, with a timeout on every
  command and connection attempt: ``redis://``, ``rediss://`` and ``unix://`` on a pool
  that *waits* for a free connection (``BlockingConnectionPool``) instead of failing with
  "Too many connections" under bursts; ``redis+sentinel://`` (``rediss+sentinel://``
  for TLS to the master), spelt as ``limits`` spells it —
  ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[?db=N]`` — to the
  master the sentinels name, followed through failovers. The credentials are the master's
  and the sentinels' alike; ``redis+cluster://`` (``rediss+cluster://`` for TLS), also
  spelt as ``limits`` spells it — ``redis+cluster://[[user]:password@]host:port[,host:port...]``
  — to a Redis Cluster (:class:`redis.asyncio.RedisCluster`) found from those startup
  nodes, which follows MOVED and ASK and keeps the slot map fresh.
- :func:`lean_connection` — the rate limiter's own connection
  (:class:`keystile.redis.lean.LeanRedis`) to the server a client talks to, when it can
  stand in for that client.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.exceptions import MaxConnectionsError
from redis.typing import EncodableT

from keystile.redis.lean import LeanRedis

__all__ = [
    "CLUSTER_SCHEMES",
    "SENTINEL_SCHEMES",
    "RedisClient",
    "close_redis",
    "is_cluster",
    "lean_connection",
    "open_redis",
    "redacted_url",
]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
# What keystile talks to: one server (standalone, or the master Sentinel names) or a cluster.
RedisClient = aioredis.Redis | RedisCluster


def is_cluster(client: object) -> bool:
    """Whether ``client`` is a Redis Cluster client (its commands routed per slot)."""
    return isinstance(client, RedisCluster)


def redacted_url(url: str) -> str:
    """The URL to show in messages: no password, no query string."""
    parts = urlsplit(url)
    user, at, host = parts.netloc.rpartition("@")
    if at and ":" in user:
        user = user.partition(":")[0] + ":***"
    return urlunsplit((parts.scheme, f"{user}{at}{host}", parts.path, "", ""))


def open_redis(
    url: str,
    *,
    pool_size: int = 50,
    pool_timeout: float = 1.0,
    timeout: float = 0.5,
    client_name: str | None = None,
) -> RedisClient:
    """A client on a fresh pool of at most ``pool_size`` connections (per node, on a
    cluster) that waits up to ``pool_timeout`` for a free one, with ``timeout`` seconds per
    command and connection attempt."""
    if urlsplit(url).scheme in CLUSTER_SCHEMES:
        return _cluster(
            url,
            pool_size=pool_size,
            pool_timeout=pool_timeout,
            timeout=timeout,
            client_name=client_name,
        )
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        return _sentinel_master(
            url,
            pool_size=pool_size,
            pool_timeout=pool_timeout,
            timeout=timeout,
            client_name=client_name,
        )
    try:
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=pool_timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            # One quick retry covers a connection the server closed while idle; more would
            # only stretch the time to an answer when Redis is really gone.
            retry=Retry(NoBackoff(), 1),
            client_name=client_name,
        )
        # Options from the query string reach a connection only when one is made: make
        # one now (no I/O until it is used), so a misspelt option fails here, plainly.
        pool.connection_class(**pool.connection_kwargs)
    except (TypeError, ValueError) as exc:  # an unknown query option arrives as a keyword
        problem = str(exc).partition("got ")[2] or type(exc).__name__
        raise ValueError(
            f"{redacted_url(url)} is not a Redis URL keystile can use ({problem})"
        ) from None
    return aioredis.Redis.from_pool(pool)


def _sentinel_master(
    url: str, *, pool_size: int, pool_timeout: float, timeout: float, client_name: str | None
) -> aioredis.Redis:
    """The master a Sentinel deployment names (see :func:`open_redis`)."""
    parts = urlsplit(url)
    shown = redacted_url(url)
    service = parts.path.strip("/")
    hosts = parts.netloc.rpartition("@")[2]
    try:
        locations = [_host_port(h, 26379) for h in hosts.split(",")] if hosts else []
        db = int(dict(parse_qsl(parts.query)).get("db", 0))
    except ValueError:
        locations, db = [], -1
    if not service or "/" in service or not locations or db < 0:
        raise ValueError(
            f"{shown} is not a Sentinel URL: use "
            "redis+sentinel://[[user]:password@]host:port[,host:port]/service[?db=N]"
        )
    auth = {"username": unquote(parts.username or "") or None}
    auth["password"] = unquote(parts.password) if parts.password is not None else None
    auth = {k: v for k, v in auth.items() if v is not None}
    # redis-py types Sentinel from 8.2 on, not before: called untyped on every version.
    make_sentinel: Any = Sentinel
    sentinel = make_sentinel(
        locations,
        sentinel_kwargs={**auth, "socket_timeout": timeout, "socket_connect_timeout": timeout},
        **auth,
    )
    master: WaitingRedis = sentinel.master_for(
        service,
        redis_class=WaitingRedis,
        db=db,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        client_name=client_name,
        max_connections=pool_size + _SPARE_CONNECTIONS,
        ssl=parts.scheme == "rediss+sentinel",
    )
    master._wait_for(pool_size, pool_timeout)
    return master


class _WaitsForConnections:
    """Commands that *wait* (up to ``pool_timeout``) while ``pool_size`` of them are in
    flight, as a ``BlockingConnectionPool`` makes a standalone client's, instead of failing
    with "Too many connections" under a burst. Pipelines and the events channel do not
    wait: the pool holds a few connections more for them."""

    _in_flight: asyncio.Semaphore
    _pool_timeout: float

    def _wait_for(self, pool_size: int, pool_timeout: float) -> None:
        self._in_flight = asyncio.Semaphore(pool_size)
        self._pool_timeout = pool_timeout

    async def execute_command(self, *args: EncodableT, **kwargs: Any) -> Any:
        try:
            async with asyncio.timeout(self._pool_timeout):
                await self._in_flight.acquire()
        except TimeoutError:
            raise MaxConnectionsError("no free connection to Redis in time") from None
        try:
            return await super().execute_command(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._in_flight.release()


class WaitingCluster(_WaitsForConnections, RedisCluster):  # type: ignore[misc]
    """A :class:`RedisCluster` whose commands wait for a free connection (see
    :class:`_WaitsForConnections`); each node may open a few connections more than
    ``pool_size``."""

    def __init__(self, *, pool_size: int, pool_timeout: float, **options: Any) -> None:
        super().__init__(max_connections=pool_size + _SPARE_CONNECTIONS, **options)
        self._wait_for(pool_size, pool_timeout)


class WaitingRedis(_WaitsForConnections, aioredis.Redis):  # type: ignore[misc]
    """The client of the master Sentinel names: its pool (Sentinel's) does not wait, so
    its commands do (see :class:`_WaitsForConnections`)."""


# Connections per node beyond the waiting commands': the events channel, pipelines.
_SPARE_CONNECTIONS = 8


def _cluster(
    url: str, *, pool_size: int, pool_timeout: float, timeout: float, client_name: str | None
) -> RedisCluster:
    """A Redis Cluster found from the startup nodes of a cluster URL (see :func:`open_redis`)."""
    parts = urlsplit(url)
    hosts = parts.netloc.rpartition("@")[2]
    try:
        nodes = [_host_port(h, 6379) for h in hosts.split(",")] if hosts else []
    except ValueError:
        nodes = []
    if not nodes or parts.path.strip("/") or parts.query or any(not h for h, _ in nodes):
        raise ValueError(
            f"{redacted_url(url)} is not a Redis Cluster URL: use "
            "redis+cluster://[[user]:password@]host:port[,host:port...]"
        )
    auth = {"username": unquote(parts.username or "") or None}
    auth["password"] = unquote(parts.password) if parts.password is not None else None
    return WaitingCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in nodes],
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        client_name=client_name,
        ssl=parts.scheme == "rediss+cluster",
        **{k: v for k, v in auth.items() if v is not None},
    )


async def close_redis(client: RedisClient) -> None:
    """Close a client from :func:`open_redis`, with the sentinels' own connections when it
    reaches its master through them."""
    await client.aclose()
    if isinstance(client, RedisCluster):
        return
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for watcher in getattr(manager, "sentinels", ()):
        await watcher.aclose()


def _host_port(text: str, default: int) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        return text.strip(), default
    return host.strip("[]"), int(port)


def lean_connection(client: RedisClient, *, timeout: float = 0.25) -> LeanRedis | None:
    """A lean connection to the server ``client`` talks to, or ``None`` when it cannot
    stand in for it (TLS, a credential provider, a cluster, or a fake). It is named after
    the client's connections, with ``-lean`` added."""
    pool = getattr(client, "connection_pool", None)
    if pool is None or is_cluster(client):
        return None
    kind = pool.connection_class
    options = pool.connection_kwargs
    if options.get("credential_provider") is not None:
        return None
    name = options.get("client_name")
    common = {
        "username": options.get("username"),
        "password": options.get("password"),
        "db": int(options.get("db") or 0),
        "timeout": timeout,
        "name": f"{name}-lean" if name else None,
    }
    if kind is Connection:
        return LeanRedis(
            host=options.get("host", "localhost"), port=int(options.get("port", 6379)), **common
        )
    if kind is UnixDomainSocketConnection:
        return LeanRedis(path=options["path"], **common)
    return None
