"""Moving windows in Redis: :class:`RedisLimiter`, exact across every process sharing one
Redis.

One Lua script (``keystile/redis/lua/moving_window.lua``) decides every window of a key
atomically on Redis' own clock (``TIME``) and returns the decision with the numbers for
the headers in the same round trip: one EVALSHA per decision. Over the lean connection
(:class:`keystile.redis.lean.LeanRedis`, the default) the EVALSHAs of requests that
arrive together go out together (16 to a write, Redis starting on the first while the
rest are prepared); over redis-py each is a command of its own. A key
known to be over its limit is refused locally until its next slot frees, without asking
Redis (which can only refuse more, never admit more).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import AskError, ClusterCrossSlotError, NoScriptError

from keystile.exceptions import StoreMisconfigured, StoreUnavailable
from keystile.fallback import FailureMode, Fallback, FallingBack, redis_address
from keystile.ratelimit.base import check_cost, retry_after, whole_seconds
from keystile.rates import Decision, LimitSet
from keystile.redis.connect import RedisClient, lean_connection
from keystile.redis.errors import translated
from keystile.redis.lean import ReplyError, encode
from keystile.redis.lean_cluster import lean_routes
from keystile.redis.schema import RedisSchema
from keystile.redis.scripts import lua
from keystile.telemetry import ROUND_TRIPS, perf_counter_ns

__all__ = ["RedisLimiter"]

logger = logging.getLogger("keystile.ratelimit")

_SCRIPT = lua("moving_window")
# What SCRIPT LOAD answers for it: the lean path's EVALSHA commands are built with it.
_SHA = hashlib.sha1(_SCRIPT.encode(), usedforsecurity=False).hexdigest()
# Replies of a cluster node asked for a key it does not serve (a plain connection to one
# node of a Redis Cluster): not an outage, so never a decision left to the failure mode.
_NOT_HERE = frozenset({"MOVED", "ASK", "CROSSSLOT"})
# The address of a request whose client address is unknown, in the name of a window that
# counts each address apart (the middleware decides such a request by the key's windows
# alone; a caller of hit() may not): never a budget address (see keystile.network).
_NO_ADDRESS = "-"


# How a decision's EVALSHA is put together (RedisLimiter._shape): the bytes before the
# window names, per name the text before the key id, between it and the address (None: no
# address) and after, and the bytes after the names.
_Shape = tuple[bytes, tuple[tuple[str, str | None, str], ...], bytes]


def _bulks(words: list[Any]) -> bytes:
    """``words`` as RESP bulk strings, one after another (a command's part, no header)."""
    encoded = encode(words)
    return encoded[encoded.index(b"\r\n") + 2 :]


def _not_here(code: str) -> StoreMisconfigured:
    """The error of a decision a cluster node would not make (MOVED, ASK, CROSSSLOT): the
    fallback refuses such a request whatever the failure mode."""
    return StoreMisconfigured(
        f"a Redis Cluster node answered {code}: reach the cluster with redis+cluster://"
    )


def _read_error(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()


class RedisLimiter(FallingBack):
    """Moving windows in Redis, exact across every process sharing it.

    ``failure`` says what happens when Redis cannot answer within ``timeout`` seconds:
    ``"allow"`` (the default) admits the request, counts it in :attr:`passes` and logs at
    most once per ``log_interval``; ``"deny"`` refuses it (the middleware answers 503).

    After ``trip_after`` failed decisions in a row, the limiter backs off: for
    ``backoff[0]`` seconds every decision follows ``failure`` at once, without waiting on
    Redis; then one request tries Redis again while the others keep skipping it. Each try
    that fails doubles the wait, up to ``backoff[1]``; the first answer from Redis ends it.
    An outage then costs each request no wait, and a struggling Redis no pile of commands;
    decisions skipped meanwhile are not counted in Redis' windows. (Both are
    :attr:`fallback`'s, a :class:`keystile.fallback.Fallback`, shared with token quotas.)

    With ``lean=True`` (the default) the decisions go over one connection of the
    limiter's own (:class:`keystile.redis.lean.LeanRedis`, to the server ``client`` talks to),
    which costs a fraction of redis-py's Python per round trip and sends the decisions of
    requests that arrive together in a few writes; ``client`` carries them, one EVALSHA each,
    when it cannot (TLS, a credential provider, fakeredis) or with ``lean=False``.

    ``monotonic`` is the clock of the local refusals and of the back-off.
    """

    #: At most this many keys (and addresses) are refused locally at once.
    max_blocked = 100_000

    def __init__(
        self,
        client: RedisClient,
        *,
        namespace: str = "keystile",
        timeout: float = 0.25,
        failure: FailureMode = "allow",
        log_interval: float = 60.0,
        local_refusals: bool = True,
        lean: bool = True,
        trip_after: int = 3,
        backoff: tuple[float, float] = (0.05, 1.0),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fallback = Fallback(
            "rate limiter",
            logger,
            failure=failure,
            log_interval=log_interval,
            trip_after=trip_after,
            backoff=backoff,
            where=redis_address(client),
            monotonic=monotonic,
        )
        self.client = client
        self.namespace = namespace
        self.timeout = timeout
        self.local_refusals = local_refusals
        self.monotonic = monotonic
        self.sha = ""  # set once the script is loaded
        self._schema = RedisSchema(namespace)
        self._round_trips = 0  # over `client`
        self._lean = lean_connection(client, timeout=timeout) if lean else None
        # On a Redis Cluster: a lean connection per primary, routed by redis-py's slot map.
        self._routes = lean_routes(client, timeout=timeout) if lean else None
        # (key, address, limit text, cost) -> the encoded EVALSHA of a decision on Redis' clock
        self._commands: dict[tuple[str, str, str, int], bytes] = {}
        # (limit text, cost) -> how such a command is put together (see _shape): a command
        # not in the cache above (more keys and addresses than it holds) costs a few joins.
        self._shapes: dict[tuple[str, int], _Shape] = {}
        self._loading: asyncio.Task[None] | None = None
        # (key, address, limit text) -> (refused until, monotonic; the decision; when; its cost)
        self._blocked: dict[tuple[str, str, str], tuple[float, Decision, float, int]] = {}
        self.blocked_prunes = 0  # how often the local refusals were pruned (tests count it)
        self.local_refused = 0  # requests refused without asking Redis (keystile.metrics)

    def window_key(self, key: str, limits: LimitSet, index: int, address: str = "") -> str:
        """The Redis list of one window; an address's share lives beside the key's, under
        the key's hash tag, so one script decides both."""
        window = limits.windows[index]
        if window.per_address:
            address = address or _NO_ADDRESS
            return self._schema.window(key, window.amount, window.seconds, address)
        return self._schema.window(key, window.amount, window.seconds)

    @property
    def round_trips(self) -> int:
        """Round trips to Redis so far (commands the lean connection writes together
        count once)."""
        lean, routes = self._lean, self._routes
        return (
            self._round_trips
            + (lean.writes if lean is not None else 0)
            + (routes.writes if routes is not None else 0)
        )

    @property
    def lean(self) -> bool:
        """Whether decisions go over the limiter's own lean connection (connections, one
        per primary, on a cluster)."""
        return self._lean is not None or self._routes is not None

    @translated("loading the rate-limit script")
    async def start(self) -> None:
        """Load the script, so no request pays for a NOSCRIPT retry (and, on the lean
        path, connect)."""
        if self._lean is not None:
            # As long as a connection attempt may take, not a request's timeout: at start-up
            # nobody waits on it (a worker booting beside others on a busy machine took
            # more than 250 ms), and a reload's callers wait within their own deadlines.
            deadline = asyncio.get_running_loop().time() + max(self.timeout, 1.0)
            loaded = await self._lean.execute("SCRIPT", "LOAD", _SCRIPT, deadline=deadline)
            if isinstance(loaded, ReplyError):
                raise StoreUnavailable(f"Redis refused the rate-limit script: {loaded.code}")
            if loaded != _SHA.encode():  # the EVALSHA commands are built with _SHA
                raise StoreUnavailable("Redis loaded the rate-limit script under another sha")
            self.sha = _SHA
        else:
            if self._routes is not None:
                await self.client.initialize()  # the slot map the routes follow
            self._round_trips += 1
            self.sha = await self.client.script_load(_SCRIPT)  # on every primary of a cluster

    async def close(self) -> None:
        self._blocked.clear()
        loading, self._loading = self._loading, None
        if loading is not None and not loading.done():
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                loading.cancel()
        if self._lean is not None:
            await self._lean.aclose()
        if self._routes is not None:
            await self._routes.aclose()

    async def hit(
        self, key: str, limits: LimitSet, cost: int = 1, *, address: str = ""
    ) -> Decision:
        return await self.hit_at(key, limits, cost, None, address=address)

    async def hit_at(
        self,
        key: str,
        limits: LimitSet,
        cost: int = 1,
        now_ms: int | None = None,
        *,
        address: str = "",
    ) -> Decision:
        """:meth:`hit` on a given Redis-side clock (for tests); ``None`` is Redis' own."""
        check_cost(cost)
        if not limits.per_address:
            address = ""  # one entry per key in the caches below, whoever calls
        blocked_as = (key, address, limits.text)
        if self.local_refusals and now_ms is None:
            blocked = self._blocked.get(blocked_as)
            if blocked is not None:
                until, refused, decided, refused_cost = blocked
                clock = self.monotonic()
                left = until - clock
                if left > 0 and cost >= refused_cost:
                    # Still over the limit: no slot can have freed yet. No round trip.
                    self.local_refused += 1
                    elapsed = clock - decided
                    frees = tuple(whole_seconds(t - elapsed) for t in refused.reset)
                    retry = retry_after(left - 0.001)
                    return Decision(
                        False, refused.remaining, frees, retry, refused_by=refused.refused_by
                    )
                if left <= 0:
                    del self._blocked[blocked_as]
        decide = (
            self._lean_decide
            if self._lean is not None
            else self._routed_decide
            if self._routes is not None
            else self._pooled_decide
        )
        if ROUND_TRIPS.on:  # keystile.metrics: each decision Redis is asked for, timed
            raw = await self.fallback.ask(self._timed, decide, key, limits, cost, now_ms, address)
        else:
            raw = await self.fallback.ask(decide, key, limits, cost, now_ms, address)
        if raw is None:  # undecided, and the failure mode is "allow"
            full = tuple(w.amount for w in limits.windows)
            return Decision(True, full, tuple(w.seconds for w in limits.windows), degraded=True)
        raw = raw.split() if isinstance(raw, (bytes, str)) else raw
        decision = self._decide(raw, limits)
        if not decision.allowed and self.local_refusals and now_ms is None:
            # Nothing can free a slot before the refusing entry leaves its window.
            if len(self._blocked) >= self.max_blocked:
                self._prune_blocked()
            clock = self.monotonic()
            until = clock + self._wait_ms(raw, limits) / 1000
            self._blocked[blocked_as] = (until, decision, clock, cost)
        return decision

    @staticmethod
    async def _timed(decide: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        started = perf_counter_ns()
        try:
            return await decide(*args)
        finally:
            ROUND_TRIPS.observe("rate limiter", started)

    def _prune_blocked(self) -> None:
        """Bound the local refusals at :attr:`max_blocked`: forget the ones already free;
        if more than half are still blocked, forget them all (Redis still refuses them, one
        round trip each). Either way the next prune is at least ``max_blocked / 2`` refusals
        away, so a flood of refused keys costs O(1) per refusal, amortised."""
        now = self.monotonic()
        blocked = {k: v for k, v in self._blocked.items() if v[0] > now}
        self._blocked = blocked if len(blocked) <= self.max_blocked // 2 else {}
        self.blocked_prunes += 1

    def _arguments(
        self, key: str, limits: LimitSet, cost: int, now_ms: int | None, address: str
    ) -> tuple[list[str], list[Any]]:
        keys = [self.window_key(key, limits, i, address) for i in range(len(limits.windows))]
        args: list[Any] = [cost, "" if now_ms is None else now_ms]
        for window in limits.windows:
            args += [window.amount, window.seconds * 1000]
        return keys, args

    async def _pooled_decide(
        self, key: str, limits: LimitSet, cost: int, now_ms: int | None, address: str
    ) -> Any:
        """One EVALSHA over ``client`` (after loading the script on NOSCRIPT), all within
        one ``timeout``."""
        keys, args = self._arguments(key, limits, cost, now_ms, address)
        async with asyncio.timeout(self.timeout):
            if not self.sha:
                await self.start()
            self._round_trips += 1
            try:
                try:
                    return await self.client.evalsha(self.sha, len(keys), *keys, *args)
                except NoScriptError:  # SCRIPT FLUSH, a restarted server, a new primary
                    await self.start()
                    self._round_trips += 1
                    return await self.client.evalsha(self.sha, len(keys), *keys, *args)
            except (AskError, ClusterCrossSlotError) as exc:  # MOVED is an AskError
                raise _not_here(type(exc).__name__) from exc

    async def _lean_decide(
        self, key: str, limits: LimitSet, cost: int, now_ms: int | None, address: str
    ) -> Any:
        """One EVALSHA over the lean connection (after loading the script on NOSCRIPT),
        all within one ``timeout``."""
        lean = self._lean
        if lean is None:  # only chosen when there is one (hit_at)
            raise RuntimeError("the rate limiter has no lean connection")
        cached = (key, address, limits.text, cost)
        command = self._commands.get(cached) if now_ms is None else None
        if command is None:
            command = self._command(cached, limits, now_ms)
        deadline = lean.deadline()
        if self.sha:
            reply = await lean.call(command, deadline)
            if type(reply) is not ReplyError:
                return reply
            if reply.code in _NOT_HERE:
                raise _not_here(reply.code)
            if reply.code != "NOSCRIPT":
                raise StoreUnavailable(f"Redis refused the rate-limit script: {reply.code}")
        # The script is not loaded (yet, or any more: SCRIPT FLUSH, a restarted server).
        await self._load(deadline)
        reply = await lean.call(command, deadline)
        if type(reply) is ReplyError:
            if reply.code in _NOT_HERE:
                raise _not_here(reply.code)
            raise StoreUnavailable(f"Redis refused the rate-limit script: {reply.code}")
        return reply

    async def _routed_decide(
        self, key: str, limits: LimitSet, cost: int, now_ms: int | None, address: str
    ) -> Any:
        """One EVALSHA over the lean connection to the primary serving the key (a cluster),
        loading the script there on NOSCRIPT. A decision its node cannot make here — the
        slot map is not known yet, the node answers MOVED or ASK, or it is gone — goes
        over redis-py, which follows the redirect or finds the new primary and updates the
        map that routes the next decisions."""
        routes = self._routes
        if routes is None:  # only chosen when there are routes
            raise RuntimeError("the rate limiter has no lean routes")
        lean = routes.for_key(self.window_key(key, limits, 0, address))
        if lean is None:
            return await self._pooled_decide(key, limits, cost, now_ms, address)
        cached = (key, address, limits.text, cost)
        command = self._commands.get(cached) if now_ms is None else None
        if command is None:
            command = self._command(cached, limits, now_ms)
        deadline = lean.deadline()
        try:
            reply = await lean.call(command, deadline)
            if type(reply) is ReplyError and reply.code == "NOSCRIPT":  # a new primary
                await lean.execute("SCRIPT", "LOAD", _SCRIPT, deadline=deadline)
                reply = await lean.call(command, deadline)
        except ConnectionError:  # the node is gone: a failover, perhaps
            routes.forget(lean)
            return await self._pooled_decide(key, limits, cost, now_ms, address)
        if type(reply) is not ReplyError:
            return reply
        if reply.code in ("MOVED", "ASK"):
            return await self._pooled_decide(key, limits, cost, now_ms, address)
        raise StoreUnavailable(f"Redis refused the rate-limit script: {reply.code}")

    def _command(
        self, cached: tuple[str, str, str, int], limits: LimitSet, now_ms: int | None
    ) -> bytes:
        key, address, text, cost = cached
        if now_ms is not None:  # a test's clock: built word by word, never cached
            keys, args = self._arguments(key, limits, cost, now_ms, address)
            return encode(["EVALSHA", _SHA, len(keys), *keys, *args])
        shape = self._shapes.get((text, cost))
        if shape is None:
            shape = self._shape(limits, cost)
        head, names, tail = shape
        parts = [head]
        for before, between, after in names:
            name = (
                f"{before}{key}{after}"
                if between is None
                else f"{before}{key}{between}{address or _NO_ADDRESS}{after}"
            ).encode()
            parts.append(b"$%d\r\n%b\r\n" % (len(name), name))
        parts.append(tail)
        command = b"".join(parts)
        if len(self._commands) >= 10_000:  # bounded: start again
            self._commands.clear()
        self._commands[cached] = command
        return command

    def _shape(self, limits: LimitSet, cost: int) -> _Shape:
        """How the EVALSHA of a decision on ``limits`` at ``cost`` is put together: its
        bytes before the window names, each name's text around the key id (and around the
        address, for a window that counts each address apart: ``between`` is then not
        None), and its bytes after the names — each name as :meth:`window_key` spells it."""
        _, args = self._arguments("", limits, cost, None, "")
        count = len(limits.windows)
        head = b"*%d\r\n" % (3 + count + len(args)) + _bulks(["EVALSHA", _SHA, count])
        names: list[tuple[str, str | None, str]] = []
        for window in limits.windows:
            # Marks where the key id and the address go, found from the right: the
            # namespace (before them) may hold any character, what follows them never does.
            if window.per_address:
                spelt = self._schema.window("\n", window.amount, window.seconds, "\r")
                rest, _, after = spelt.rpartition("\r")
                before, _, between = rest.rpartition("\n")
                names.append((before, between, after))
            else:
                spelt = self._schema.window("\n", window.amount, window.seconds)
                before, _, after = spelt.rpartition("\n")
                names.append((before, None, after))
        tail = _bulks(args)
        if len(self._shapes) >= 1_000:  # bounded (limit strings are few): start again
            self._shapes.clear()
        shape = self._shapes[(limits.text, cost)] = (head, tuple(names), tail)
        return shape

    async def _load(self, deadline: float) -> None:
        """SCRIPT LOAD, once for all the callers that found it missing together."""
        loop = asyncio.get_running_loop()
        loading = self._loading
        if loading is None or loading.done() or loading.get_loop() is not loop:
            loading = self._loading = loop.create_task(self._load_once())
            loading.add_done_callback(_read_error)  # read even if every caller gave up
        await asyncio.wait({loading}, timeout=max(0.0, deadline - loop.time()))
        if not loading.done():
            raise TimeoutError("Redis did not load the rate-limit script in time")
        if loading.cancelled():  # the limiter was closed meanwhile
            raise ConnectionError("the rate limiter was closed")
        loading.result()

    async def _load_once(self) -> None:
        self.sha = ""
        await self.start()

    @staticmethod
    def _wait_ms(raw: list[Any], limits: LimitSet) -> int:
        """Milliseconds from now until every refusing entry has left its window (it still
        counts at exactly `window` old, so one more millisecond)."""
        now = int(raw[1])
        wait = 0
        for i, window in enumerate(limits.windows):
            refused_by = int(raw[4 + 3 * i])
            if refused_by >= 0:
                wait = max(wait, refused_by + window.seconds * 1000 + 1 - now)
        return wait

    def _decide(self, raw: list[Any], limits: LimitSet) -> Decision:
        allowed = int(raw[0]) == 1
        now = int(raw[1])
        remaining, reset = [], []
        for i, window in enumerate(limits.windows):
            count, oldest = int(raw[2 + 3 * i]), int(raw[3 + 3 * i])
            remaining.append(window.amount - count)
            span = (oldest + window.seconds * 1000 - now) / 1000 if oldest >= 0 else window.seconds
            reset.append(whole_seconds(span))
        # Whole milliseconds: Retry-After is the first whole second strictly after the
        # refusing entry's last refusing millisecond (no float rounding near integers).
        retry = 0 if allowed else (self._wait_ms(raw, limits) - 1) // 1000 + 1
        refused_by = tuple(
            w.name for i, w in enumerate(limits.windows) if int(raw[4 + 3 * i]) >= 0
        )
        return Decision(
            allowed, tuple(remaining), tuple(reset), retry, at=now / 1000, refused_by=refused_by
        )
