"""Lean connections to a Redis Cluster: one :class:`~keystile.redis.lean.LeanRedis` per
primary, for the rate limiter's EVALSHAs.

A key's node comes from the cluster client's own slot map (redis-py's
``RedisCluster.get_node_from_key``), which redis-py keeps current: it follows ``MOVED``
and ``ASK`` and finds the nodes again after a connection error. So the routes need no map
of their own. When a lean connection's node answers ``MOVED``/``ASK`` or is gone, the
limiter makes that one decision over redis-py (which follows the redirect or finds the new
primary, updating the map) and the next decision goes where the slot is now. Concurrent
decisions for keys on one node go out together, in one write, as on a standalone Redis.
"""

from __future__ import annotations

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import Connection
from redis.exceptions import RedisClusterException, RedisError

from keystile.redis.lean import LeanRedis

__all__ = ["LeanRoutes", "lean_routes"]


class LeanRoutes:
    """One lean connection per primary of ``client``'s cluster, opened on first use (at most
    as many as the cluster has primaries, and those the slot map names)."""

    def __init__(
        self,
        client: RedisCluster,
        *,
        username: str | None,
        password: str | None,
        timeout: float,
        name: str | None,
    ) -> None:
        self.client = client
        self._username = username
        self._password = password
        self._timeout = timeout
        self._name = name
        self._nodes: dict[tuple[str, int], LeanRedis] = {}
        self._writes = 0  # of connections forgotten

    @property
    def writes(self) -> int:
        """Round trips over every lean connection so far."""
        return self._writes + sum(lean.writes for lean in self._nodes.values())

    def for_key(self, name: str) -> LeanRedis | None:
        """The lean connection to the primary serving ``name``'s slot; ``None`` while the
        slot map does not say (not loaded yet, or the slot is not covered)."""
        try:
            node = self.client.get_node_from_key(name)
        except (RedisClusterException, RedisError, LookupError):
            return None
        if node is None:
            return None
        where = (node.host, int(node.port))
        lean = self._nodes.get(where)
        if lean is None:
            if len(self._nodes) >= 1000:  # bounded: no cluster has more primaries
                return None
            lean = self._nodes[where] = LeanRedis(
                host=where[0],
                port=where[1],
                username=self._username,
                password=self._password,
                timeout=self._timeout,
                name=self._name,
            )
        return lean

    def forget(self, lean: LeanRedis) -> None:
        """Stop using ``lean`` (its node is gone, or serves other slots now)."""
        for where, known in list(self._nodes.items()):
            if known is lean:
                del self._nodes[where]
                self._writes += lean.writes
                lean.close()

    async def aclose(self) -> None:
        nodes, self._nodes = self._nodes, {}
        for lean in nodes.values():
            await lean.aclose()


def lean_routes(client: object, *, timeout: float = 0.25) -> LeanRoutes | None:
    """Lean routes to the primaries of a Redis Cluster client, or ``None`` when ``client``
    is none, or its connections are ones a lean connection cannot stand in for (TLS, a
    credential provider, remapped addresses). Named after the client's connections, with
    ``-lean`` added."""
    if not isinstance(client, RedisCluster):
        return None
    options = client.get_connection_kwargs()
    if options.get("connection_class", Connection) is not Connection:
        return None
    if getattr(client.nodes_manager, "address_remap", None) is not None:
        return None
    if options.get("ssl") or options.get("credential_provider") is not None:
        return None
    name = options.get("client_name")
    return LeanRoutes(
        client,
        username=options.get("username"),
        password=options.get("password"),
        timeout=timeout,
        name=f"{name}-lean" if name else None,
    )
