"""The one place keystile builds Redis connections.

- :func:`open_redis` — a ``redis.asyncio`` client from a URL, on a pool that *waits* for a
  free connection (``BlockingConnectionPool``) instead of failing with "Too many
  connections" under bursts, with a timeout on every command and connection attempt.
- :func:`lean_connection` — the rate limiter's own connection
  (:class:`keystile.redis.lean.LeanRedis`) to the server a client talks to, when it can
  stand in for that client.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from keystile.redis.lean import LeanRedis

__all__ = ["lean_connection", "open_redis", "redacted_url"]


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
) -> aioredis.Redis:
    """A client on a fresh pool of at most ``pool_size`` connections that waits up to
    ``pool_timeout`` for a free one, with ``timeout`` seconds per command and connection
    attempt."""
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
