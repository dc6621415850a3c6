"""What alerts remember between flushes: the cool-downs each alert claims, and the addresses
each watched key has used (for the ``new_ip`` rule) — in process, or in Redis across
processes (:class:`RedisAlertState`, the names of :mod:`keystile.redis.schema`)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from keystile.clock import Clock
from keystile.redis.connect import RedisClient, is_cluster
from keystile.redis.errors import translated
from keystile.redis.schema import RedisSchema
from keystile.redis.scripts import lua

__all__ = ["AlertState", "MemoryAlertState", "RedisAlertState"]

_NOTE_CHUNK = 200  # keys whose addresses one pipeline notes (a millisecond or two of work)
_MAX_KNOWN = 10_000  # addresses remembered per key; past that, no new-IP alerts
_KNOWN_TTL = 90 * 86_400  # a key's addresses are forgotten 90 days after its last use
# How long a process trusts what it learnt of a key's set of addresses (each address it
# holds is one the set holds; a set it found full stays full) before asking Redis again —
# which also renews the set's TTL, far longer. Bounded: addresses remembered in all.
_RECHECK = 3600.0
_LOCAL_ADDRESSES = 100_000
_LOCAL_PER_KEY = 16

# Notes the addresses a key was seen using, up to a cap; which are new (what it takes and
# returns: the script's file).
_NOTE_ADDRESSES = lua("seen_addresses")


class AlertState(Protocol):
    """Cool-downs and the addresses each production key has used."""

    @property
    def shared(self) -> bool:
        """Whether other processes share this state (so a claim costs a round trip)."""

    async def claim(self, name: str, cooldown: float) -> bool:
        """True for the first caller per ``name`` in each ``cooldown`` window."""

    async def claim_many(self, names: list[str], cooldown: float) -> list[bool]:
        """:meth:`claim` for several names at once."""

    async def new_addresses(self, seen: dict[str, set[str]]) -> dict[str, list[str]]:
        """Note the addresses each key was seen using; for each key, those that are new.
        The addresses of a key's very first batch are its baseline, never "new". A key
        remembers at most ``max_known`` addresses; past that, new ones are not noted nor
        returned."""


class MemoryAlertState:
    """Alert state in this process (bounded)."""

    shared = False

    def __init__(
        self,
        *,
        clock: Clock = time.monotonic,
        max_entries: int = 100_000,
        max_known: int = _MAX_KNOWN,
    ) -> None:
        self._clock = clock
        self._max = max_entries
        self.max_known = max_known
        self._until: dict[str, float] = {}
        self._seen: dict[str, set[str]] = {}

    async def claim(self, name: str, cooldown: float) -> bool:
        now = self._clock()
        if self._until.get(name, -1.0) > now:
            return False
        if len(self._until) >= self._max:
            self._until = {k: v for k, v in self._until.items() if v > now}
        self._until[name] = now + cooldown
        return True

    async def claim_many(self, names: list[str], cooldown: float) -> list[bool]:
        return [await self.claim(name, cooldown) for name in names]

    def knowing(self) -> Callable[[str, str | set[str]], bool]:
        """Whether a key's addresses are all known already (so :meth:`new_addresses` would
        note nothing new for it): a flush leaves those out."""
        known = self._seen

        def knows(key_id: str, ips: str | set[str]) -> bool:
            held = known.get(key_id)
            if held is None:
                return False
            return ips in held if isinstance(ips, str) else ips <= held

        return knows

    async def new_addresses(self, seen: dict[str, set[str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for key_id, ips in seen.items():
            known = self._seen.get(key_id)
            if known is None:
                if len(self._seen) >= self._max:
                    continue
                self._seen[key_id] = set(sorted(ips)[: self.max_known])  # the baseline
                continue
            room = self.max_known - len(known)
            fresh = sorted(ip for ip in ips if ip not in known)[: max(0, room)]
            if fresh:
                known.update(fresh)
                out[key_id] = fresh
        return out


class RedisAlertState:
    """Alert state in Redis, shared by every process (hash-tagged by key id, with TTLs)."""

    shared = True

    def __init__(
        self,
        client: RedisClient,
        *,
        namespace: str = "keystile",
        max_known: int = _MAX_KNOWN,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.namespace = namespace
        self.names = RedisSchema(namespace)
        self.max_known = max_known
        self._note = client.register_script(_NOTE_ADDRESSES)
        self._cluster = is_cluster(client)
        self._monotonic = monotonic
        # key id -> (ask Redis again after, the addresses its set is known to hold, or None:
        # the set is known full). A flush asks Redis only about keys with an address not in
        # here: a key used from its usual addresses costs no round trip.
        self._learnt: dict[str, tuple[float, frozenset[str] | None]] = {}
        self._learnt_size = 0

    def _name(self, name: str) -> str:
        key_id, _, rule = name.partition("|")
        return self.names.alert(key_id, rule)

    async def claim(self, name: str, cooldown: float) -> bool:
        return (await self.claim_many([name], cooldown))[0]

    @translated("claiming an alert")
    async def claim_many(self, names: list[str], cooldown: float) -> list[bool]:
        async with self.client.pipeline(transaction=False) as pipe:  # one round trip
            for name in names:
                pipe.set(self._name(name), b"1", nx=True, px=max(1, int(cooldown * 1000)))
            return [bool(r) for r in await pipe.execute()]

    def knowing(self) -> Callable[[str, str | set[str]], bool]:
        """Whether this process has learnt, lately, that a key's set holds these addresses
        (so :meth:`new_addresses` would neither ask Redis about it nor report anything):
        a flush leaves those keys out."""
        now = self._monotonic()
        learnt = self._learnt

        def knows(key_id: str, ips: str | set[str]) -> bool:
            entry = learnt.get(key_id)
            if entry is None or entry[0] <= now:
                return False
            held = entry[1]
            if held is None:  # full
                return True
            return ips in held if isinstance(ips, str) else ips <= held

        return knows

    @translated("noting the addresses a key used")
    async def new_addresses(self, seen: dict[str, set[str]]) -> dict[str, list[str]]:
        if not seen:
            return {}
        now = self._monotonic()
        plan: list[tuple[str, list[str]]] = []
        for n, (key_id, ips) in enumerate(seen.items(), 1):
            if n % _NOTE_CHUNK == 0:
                await asyncio.sleep(0)
            learnt = self._learnt.get(key_id)
            if learnt is not None and learnt[0] > now and (learnt[1] is None or ips <= learnt[1]):
                continue  # nothing new to note, nothing to report
            plan.append((key_id, sorted(ips)))
        replies: list[Any] = []
        for start in range(0, len(plan), _NOTE_CHUNK):
            # A pipeline (and SCRIPT EXISTS) per 200 keys: the event loop runs between them.
            async with self.client.pipeline(transaction=False) as pipe:
                for key_id, sent in plan[start : start + _NOTE_CHUNK]:
                    name = self.names.seen_addresses(key_id)
                    args: list[Any] = [self.max_known, _KNOWN_TTL, *sent]
                    if self._cluster:  # a cluster pipeline refuses EVALSHA: EVAL, on one slot
                        pipe.eval(_NOTE_ADDRESSES, 1, name, *args)
                    else:
                        await self._note(keys=[name], args=args, client=cast(Any, pipe))
                replies += await pipe.execute()
        out: dict[str, list[str]] = {}
        for n, ((key_id, noted), reply) in enumerate(zip(plan, replies, strict=True), 1):
            if n % _NOTE_CHUNK == 0:
                await asyncio.sleep(0)
            before, added = int(reply[0]), reply[1:]
            fresh = [ip.decode() if isinstance(ip, bytes) else ip for ip in added]
            if before and fresh:  # the first batch of a key is its baseline
                out[key_id] = fresh
            full = min(before, self.max_known) + len(fresh) >= self.max_known
            # Not full: the set holds every address of the batch (added now or before).
            self._learn(key_id, None if full else noted, now)
        return out

    def _learn(self, key_id: str, ips: list[str] | None, now: float) -> None:
        """Remember what the set of ``key_id`` holds (``None``: it is full) until
        :data:`_RECHECK` seconds from ``now``, within the bounds."""
        old = self._learnt.pop(key_id, None)
        if old is not None and old[1] is not None:
            self._learnt_size -= len(old[1])
        known: frozenset[str] | None = None
        if ips is not None:
            held = set(ips)
            if old is not None and old[1] is not None and old[0] > now:
                held |= old[1]
            known = frozenset(sorted(held)[:_LOCAL_PER_KEY])
            if self._learnt_size + len(known) > _LOCAL_ADDRESSES:
                self._learnt = {k: v for k, v in self._learnt.items() if v[0] > now}
                self._learnt_size = sum(len(v[1] or ()) for v in self._learnt.values())
                if self._learnt_size + len(known) > _LOCAL_ADDRESSES:
                    return  # full of live entries: this key asks Redis each flush
            self._learnt_size += len(known)
        self._learnt[key_id] = (now + _RECHECK, known)
