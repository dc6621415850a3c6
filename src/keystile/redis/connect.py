"""The one place keystile builds Redis connections.

- :func:`open_redis` — a ``redis.asyncio`` client from a URL, on a pool that *waits* for a
  free connection (``BlockingConnectionPool``) instead of failing with "Too many
  connections" under bursts, with a timeout on every command and connection attempt.
- :func:`lean_connection` — the rate limiter's own connection
  (:class:`keystile.redis.lean.LeanRedis`) to the server a client talks to, when it can
  stand in for that client.
"""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from keystile.redis.lean import LeanRedis

__all__ = ["lean_connection", "open_redis"]


def open_redis(
    url: str,
    *,
    pool_size: int = 50,
    pool_timeout: float = 1.0,
    timeout: float = 0.5,
    client_name: str | None = None,
) -> aioredis.Redis:
    """A client on a fresh pool of at most ``pool_size`` connections that waits up to
    ``pool_timeout`` for a free one, with ``timeout`` seconds per command and connection
    attempt."""
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
    return aioredis.Redis.from_pool(pool)


def lean_connection(client: aioredis.Redis, *, timeout: float = 0.25) -> LeanRedis | None:
    """A lean connection to the server ``client`` talks to, or ``None`` when it cannot
    stand in for it (TLS, a credential provider, a cluster, or a fake). It is named after
    the client's connections, with ``-lean`` added."""
    pool = getattr(client, "connection_pool", None)
    if pool is None:
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
