"""The one place keystile builds Redis connections.

- :func:`open_redis` — a ``redis.asyncio`` client from a URL, with a timeout on every
  command and connection attempt: ``redis://``, ``rediss://`` and ``unix://`` on a pool
  that *waits* for a free connection (``BlockingConnectionPool``) instead of failing with
  "Too many connections" under bursts; ``redis+sentinel://`` (``rediss+sentinel://``
  for TLS to the master), spelt as ``limits`` spells it —
  ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[?db=N]`` — to the
  master the sentinels name, followed through failovers. The credentials are the master's
  and the sentinels' alike.
- :func:`lean_connection` — the rate limiter's own connection
  (:class:`keystile.redis.lean.LeanRedis`) to the server a client talks to, when it can
  stand in for that client.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from keystile.redis.lean import LeanRedis

__all__ = [
    "SENTINEL_SCHEMES",
    "close_redis",
    "lean_connection",
    "open_redis",
    "redacted_url",
]

SENTINEL_SCHEMES = ("redis+sentinel", "rediss+sentinel")


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
    if urlsplit(url).scheme in SENTINEL_SCHEMES:
        return _sentinel_master(url, pool_size=pool_size, timeout=timeout, client_name=client_name)
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
    url: str, *, pool_size: int, timeout: float, client_name: str | None
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
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        locations,
        sentinel_kwargs={**auth, "socket_timeout": timeout, "socket_connect_timeout": timeout},
        **auth,
    )
    master: aioredis.Redis = sentinel.master_for(
        service,
        db=db,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 1),
        client_name=client_name,
        max_connections=pool_size,
        ssl=parts.scheme == "rediss+sentinel",
    )
    return master


async def close_redis(client: aioredis.Redis) -> None:
    """Close a client from :func:`open_redis`, with the sentinels' own connections when it
    reaches its master through them."""
    await client.aclose()
    manager = getattr(client.connection_pool, "sentinel_manager", None)
    for watcher in getattr(manager, "sentinels", ()):
        await watcher.aclose()


def _host_port(text: str, default: int) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        return text.strip(), default
    return host.strip("[]"), int(port)


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
