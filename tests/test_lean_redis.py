"""The lean Redis connection behind the rate limiter (keystile.redis.lean): RESP2 parsed exactly
in any chunking, garbage refused, callers sharing one socket get their own replies, and a
stuck, killed, unreachable or password-protected server ends each call with a clear error
within its deadline."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import fakeredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from conftest import REDIS_URL, budget, require_redis
from faults.redis_server import RedisServer, free_port, need_redis_server
from keystile.redis.connect import lean_connection
from keystile.redis.lean import LeanRedis, ProtocolError, ReplyError, RespReader, encode

# -- the wire format ---------------------------------------------------------------------------


def wire(value: Any) -> bytes:
    """A reply as a server would send it (the test's own encoder, independent of keystile's)."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, ReplyError):
        return b"-" + str(value.args[0]).encode() + b"\r\n"
    if isinstance(value, int):
        return b":" + str(value).encode() + b"\r\n"
    if isinstance(value, bytes):
        return b"$" + str(len(value)).encode() + b"\r\n" + value + b"\r\n"
    if isinstance(value, list):
        return b"*" + str(len(value)).encode() + b"\r\n" + b"".join(wire(v) for v in value)
    raise TypeError(value)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, ReplyError) or isinstance(b, ReplyError):
        return type(a) is type(b) and a.args == b.args
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


error_text = st.text(
    st.characters(min_codepoint=32, max_codepoint=126), min_size=1, max_size=40
).map(lambda t: ReplyError("ERR " + t))
scalars = st.one_of(
    st.none(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.binary(max_size=64),  # bulk strings may hold CRLF and any byte
    error_text,
)
replies = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5), max_leaves=20)


@given(st.lists(replies, min_size=1, max_size=8), st.data())
def test_any_chunking_of_a_reply_stream_parses_to_the_same_replies(
    values: list[Any], data: st.DataObject
) -> None:
    """Replies cut anywhere — even one byte at a time — come out whole, in order, equal to
    what was sent."""
    stream = b"".join(wire(v) for v in values)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(stream)), max_size=12)))
    reader = RespReader()
    got: list[Any] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += reader.feed(stream[last:cut])
        last = cut
    assert len(got) == len(values)
    assert all(same(g, v) for g, v in zip(got, values, strict=True))


@given(st.binary(max_size=200))
@settings(max_examples=400)
def test_garbage_is_a_protocol_error_or_waits_for_more(noise: bytes) -> None:
    """Arbitrary bytes either parse, wait for more, or raise ProtocolError — nothing else."""
    reader = RespReader()
    with contextlib.suppress(ProtocolError):
        for reply in reader.feed(noise):
            assert reply is None or isinstance(reply, bytes | int | list | ReplyError)


@pytest.mark.parametrize(
    "line",
    [b"+OK", b":12", b"$3\r\nabc", b"*1\r\n:1", b"-ERR x", b"$-1", b"*-1"],
    ids=["simple", "integer", "bulk", "array", "error", "nil bulk", "nil array"],
)
def test_known_replies(line: bytes) -> None:
    """Each RESP2 reply type decodes to the Python value the limiter expects."""
    expected = {
        b"+OK": b"OK",
        b":12": 12,
        b"$3\r\nabc": b"abc",
        b"*1\r\n:1": [1],
        b"$-1": None,
        b"*-1": None,
    }
    [reply] = RespReader().feed(line + b"\r\n")
    if line.startswith(b"-"):
        assert isinstance(reply, ReplyError) and reply.code == "ERR"
    else:
        assert reply == expected[line]


@pytest.mark.parametrize(
    "reply",
    [b"?1\r\n", b":1_0\r\n", b": 1\r\n", b"$2\r\nabcd\r\n", b"$x\r\n", b"*1\r\n!\r\n"],
    ids=["type", "underscore", "space", "bulk overrun", "bad length", "bad item"],
)
def test_malformed_replies_are_protocol_errors(reply: bytes) -> None:
    """What int() would let through (1_0, ' 1') and what RESP2 does not know are refused."""
    with pytest.raises(ProtocolError):
        RespReader().feed(reply)


def test_commands_are_encoded_as_arrays_of_bulk_strings() -> None:
    """str, bytes and int words become bulk strings; anything else is a TypeError."""
    assert encode(["SET", b"k\r\n", 12]) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$2\r\n12\r\n"
    for bad in (1.5, True, None):
        with pytest.raises(TypeError):
            encode(["SET", bad])  # type: ignore[list-item]


# -- which clients it stands in for ------------------------------------------------------------


def test_from_client_reads_the_clients_server_and_credentials() -> None:
    """TCP and unix clients map to a lean connection with their db and credentials; TLS,
    a credential provider and fakeredis do not (the limiter then uses redis-py)."""
    lean = lean_connection(Redis.from_url("redis://u:pw@10.0.0.7:6380/3"))
    assert lean is not None
    assert (lean.host, lean.port, lean.db, lean.path) == ("10.0.0.7", 6380, 3, None)
    assert "pw" not in repr(lean)
    unix = lean_connection(Redis.from_url("unix:///run/redis.sock?db=2"))
    assert unix is not None and (unix.path, unix.db) == ("/run/redis.sock", 2)
    assert lean_connection(Redis.from_url("rediss://127.0.0.1:6380/0")) is None
    assert lean_connection(fakeredis.FakeAsyncRedis()) is None

    class Provider:
        def get_credentials(self) -> tuple[str, str]:
            return ("u", "pw")

    assert lean_connection(Redis(credential_provider=Provider())) is None  # type: ignore[arg-type]
    named = lean_connection(Redis.from_url("redis://10.0.0.7/0", client_name="app-1"))
    assert named is not None and named.name == "app-1-lean" and lean.name is None


# -- against a real server ---------------------------------------------------------------------


@pytest.fixture
async def lean() -> AsyncIterator[LeanRedis]:
    require_redis()
    made = lean_connection(Redis.from_url(REDIS_URL), timeout=2.0)
    assert made is not None
    yield made
    await made.aclose()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    need_redis_server()
    server = RedisServer(debug=True)
    server.start()
    yield server
    server.close()


async def test_the_connection_is_named_after_the_clients(own_redis: RedisServer) -> None:
    """CLIENT LIST shows the lean connection as the client's name plus "-lean", beside the
    client's own connections."""
    client = Redis.from_url(own_redis.url, client_name="ks-app")
    lean = lean_connection(client)
    assert lean is not None
    try:
        assert await client.ping() and await lean.execute("PING") == b"PONG"
        assert len(own_redis.clients("ks-app-lean")) == 1
        assert len(own_redis.clients("ks-app")) == 1
    finally:
        await lean.aclose()
        await client.aclose()


async def test_callers_sharing_the_socket_each_get_their_own_reply(lean: LeanRedis) -> None:
    """300 concurrent ECHOs over the one connection: each caller gets its own value back,
    in far fewer writes than calls; an error reply is returned to its caller only."""
    before = lean.writes
    results = await asyncio.gather(
        *(lean.execute("ECHO", f"v{n}") for n in range(300)),
        lean.execute("NO-SUCH-COMMAND"),
    )
    *echoes, error = results
    assert echoes == [f"v{n}".encode() for n in range(300)]
    assert isinstance(error, ReplyError) and error.code == "ERR"
    assert 1 <= lean.writes - before < 50


async def test_a_burst_goes_out_in_parts_the_first_before_the_burst_is_queued(
    lean: LeanRedis,
) -> None:
    """65 callers in one event-loop iteration: the first writes at once; the others, queued
    while its reply is outstanding, go out 16 at a time — the first part already written
    while later callers are still being prepared (Redis starts on it), not all at the end
    of the iteration. Each caller still gets its own reply."""
    assert await lean.execute("PING") == b"PONG"  # connected: callers send at once
    before = lean.writes
    seen_by_caller_40: list[int] = []

    async def caller(n: int) -> Any:
        if n == 40:  # callers 0..39 have queued their commands in this same iteration
            seen_by_caller_40.append(lean.writes - before)
        return await lean.execute("ECHO", f"v{n}")

    replies = await asyncio.gather(*(caller(n) for n in range(65)))
    assert replies == [f"v{n}".encode() for n in range(65)]
    # caller 0 alone, then callers 1..16 and 17..32 as two full parts
    assert seen_by_caller_40 == [3]
    # and the rest: 33..48 a full part, 49..64 (16) a full part; nothing left at the end
    assert lean.writes - before == 5


async def test_a_killed_connection_fails_its_callers_and_the_next_call_reconnects(
    own_redis: RedisServer,
) -> None:
    """CLIENT KILL of the lean connection: a call waiting on it fails with ConnectionError
    at once, and the next call works on a new connection."""
    lean = LeanRedis(port=own_redis.port, timeout=5.0)
    try:
        assert await lean.execute("CLIENT", "SETNAME", "lean") == b"OK"
        waiting = asyncio.ensure_future(lean.execute("BLPOP", "nothing", 0))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        own_redis.admin.client_kill_filter(_type="normal", skipme=True)
        with pytest.raises(ConnectionError):
            await waiting
        assert time.perf_counter() - started < 1.0
        assert await lean.execute("PING") == b"PONG"
    finally:
        await lean.aclose()


@pytest.mark.timing
async def test_a_stuck_server_times_out_every_caller_within_the_deadline(
    own_redis: RedisServer,
) -> None:
    """While Redis sleeps (DEBUG SLEEP 1), 20 concurrent calls all raise TimeoutError by
    their 0.2 s deadline; once it wakes, the next call succeeds."""
    lean = LeanRedis(port=own_redis.port, timeout=0.2)
    stuck = socket.create_connection(("127.0.0.1", own_redis.port), timeout=5)
    try:
        assert await lean.execute("PING") == b"PONG"
        stuck.sendall(encode(["DEBUG", "SLEEP", "1"]))
        await asyncio.sleep(0.05)
        started = time.perf_counter()
        outcomes = await asyncio.gather(
            *(lean.execute("PING") for _ in range(20)), return_exceptions=True
        )
        elapsed = time.perf_counter() - started
        assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes
        assert elapsed < budget(0.2 + 0.15), f"{elapsed * 1000:.0f} ms"
        assert stuck.recv(16) == b"+OK\r\n"
        assert await lean.execute("PING") == b"PONG"
    finally:
        stuck.close()
        await lean.aclose()


async def test_an_unreachable_server_is_a_quick_connection_error() -> None:
    """Nothing listening: ConnectionRefusedError (an OSError) at once, not a hang."""
    lean = LeanRedis(port=free_port(), timeout=0.5)
    started = time.perf_counter()
    with pytest.raises(ConnectionRefusedError):
        await lean.execute("PING")
    assert time.perf_counter() - started < 0.5
    await lean.aclose()


async def test_password_and_database_are_used_and_a_wrong_password_is_refused() -> None:
    """A server with requirepass: the URL's password authenticates and its db is
    selected; a wrong password is a ConnectionError that does not repeat it."""
    need_redis_server()
    server = RedisServer(password="s3cret-pass")
    server.start()
    try:
        lean = lean_connection(Redis.from_url(f"redis://:s3cret-pass@127.0.0.1:{server.port}/4"))
        assert lean is not None
        assert await lean.execute("SET", "k", "v") == b"OK"
        assert server.admin.execute_command("SELECT", 4) and server.admin.get("k") == b"v"
        await lean.aclose()
        wrong = LeanRedis(port=server.port, password="wrong-guess")
        with pytest.raises(ConnectionError) as caught:
            await wrong.execute("PING")
        assert "wrong-guess" not in str(caught.value)
        assert "WRONGPASS" in str(caught.value) or "ERR" in str(caught.value)
        await wrong.aclose()
    finally:
        server.close()


async def test_a_unix_socket_works_like_tcp() -> None:
    """A unix:// client maps to a lean connection over the socket."""
    need_redis_server()
    server = RedisServer(unix_socket=True)
    server.start()
    try:
        lean = lean_connection(Redis.from_url(f"unix://{server.socket_path}?db=1"))
        assert lean is not None and lean.path == server.socket_path
        assert await lean.execute("SET", "u", 1) == b"OK"
        assert await lean.execute("GET", "u") == b"1"
        await lean.aclose()
    finally:
        server.close()


def test_one_connection_object_serves_successive_event_loops() -> None:
    """Closed at the end of one asyncio.run, it connects again in the next, without
    errors or warnings."""
    require_redis()
    lean = lean_connection(Redis.from_url(REDIS_URL))
    assert lean is not None

    async def ping() -> Any:
        pong = await lean.execute("PING")
        await lean.aclose()
        return pong

    assert asyncio.run(ping()) == b"PONG"
    assert asyncio.run(ping()) == b"PONG"


async def test_a_reply_nobody_asked_for_drops_the_connection(own_redis: RedisServer) -> None:
    """Bytes from the server with no caller waiting are a protocol error: the connection
    is dropped (a caller never gets another's reply), and the next call reconnects."""
    lean = LeanRedis(port=own_redis.port)
    try:
        assert await lean.execute("PING") == b"PONG"
        conn = lean._conn
        assert conn is not None
        conn.data_received(b"+SURPRISE\r\n")
        assert conn.lost
        assert await lean.execute("PING") == b"PONG"
        assert lean._conn is not conn
    finally:
        await lean.aclose()


# -- deadlines against a server that answers slowly (a fake of the test's own) --------------


class SlowServer:
    """A RESP server on a free loopback port answering each command, in order, after
    ``delay`` seconds, as ``answer(words)`` says; counts its connections."""

    def __init__(self, delay: float, answer: Any) -> None:
        self.delay = delay
        self.answer = answer
        self.connections = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        parser = RespReader()
        try:
            while data := await reader.read(65536):
                for words in parser.feed(data):
                    await asyncio.sleep(self.delay)
                    writer.write(
                        self.answer([w.upper() if i == 0 else w for i, w in enumerate(words)])
                    )
                    await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> SlowServer:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def pong(words: list[bytes]) -> bytes:
    return b"+OK\r\n" if words[0] in (b"AUTH", b"SELECT") else b"+PONG\r\n"


async def test_a_slow_but_healthy_server_keeps_its_one_connection() -> None:
    """Every answer 0.1 s late under a 0.25 s timeout: the first call, which also pays
    for AUTH and SELECT, runs out of time — but the connection it made serves every call
    after it, and a caller whose deadline has already passed gets TimeoutError without
    condemning the socket for the others."""
    async with SlowServer(0.1, pong) as server:
        lean = LeanRedis(port=server.port, password="pw", db=2, timeout=0.25)
        try:
            with pytest.raises(TimeoutError):
                await lean.execute("PING")  # 0.2 s of handshake + 0.1 s > 0.25 s
            results = [await lean.execute("PING") for _ in range(5)]
            assert results == [b"PONG"] * 5
            loop = asyncio.get_running_loop()
            late = lean.execute("PING", deadline=loop.time() - 0.001)
            on_time = lean.execute("PING")
            outcomes = await asyncio.gather(late, on_time, return_exceptions=True)
            assert isinstance(outcomes[0], TimeoutError) and outcomes[1] == b"PONG"
            assert await lean.execute("PING") == b"PONG"
            assert server.connections == 1
        finally:
            await lean.aclose()


async def test_a_noscript_reload_stays_within_one_timeout(figures: Any) -> None:
    """Redis answering 0.1 s late, and NOSCRIPT to the first EVALSHA: the request's
    reload and retry share its one 0.25 s budget (it is let through, degraded, by then)."""
    from keystile.ratelimit import _SHA, RedisLimiter, limit_set

    loaded = False

    def script_server(words: list[bytes]) -> bytes:
        nonlocal loaded
        if words[0] == b"SCRIPT":
            loaded = True
            return b"$40\r\n" + _SHA.encode() + b"\r\n"
        if words[0] == b"EVALSHA":
            if loaded:  # allowed, now, per window: count, oldest, refusing entry
                return b"+1 1800000000000 1 1800000000000 -1\r\n"
            return b"-NOSCRIPT No matching script.\r\n"
        return b"+PONG\r\n"

    async with SlowServer(0.1, script_server) as server:
        limiter = RedisLimiter(Redis(port=server.port), timeout=0.25)
        try:
            limiter.sha = _SHA  # as if loaded at start-up, before a SCRIPT FLUSH
            assert limiter._lean is not None
            assert await limiter._lean.execute("PING") == b"PONG"  # connected beforehand
            started = time.perf_counter()
            decision = await limiter.hit("k", limit_set("10/second", "dev"))
            took = time.perf_counter() - started
        finally:
            await limiter.close()
    assert decision.allowed and decision.degraded and limiter.passes == 1
    assert took < 0.25 + 0.1, f"{took * 1000:.0f} ms"


async def test_closing_the_limiter_while_a_request_connects_fails_it_cleanly() -> None:
    """A request waiting for the limiter's connection (AUTH answered 0.2 s late) when the
    limiter closes is refused by the failure mode (503 with "deny"), never cancelled."""
    from keystile.exceptions import StoreUnavailable
    from keystile.ratelimit import RedisLimiter, limit_set

    async with SlowServer(0.2, pong) as server:
        limiter = RedisLimiter(Redis(port=server.port, password="pw"), timeout=1.0, failure="deny")
        limiter.sha = "0" * 40
        request = asyncio.ensure_future(limiter.hit("k", limit_set("10/second", "dev")))
        await asyncio.sleep(0.05)
        await limiter.close()
        with pytest.raises(StoreUnavailable):
            await request
        assert not request.cancelled()


# -- every event loop: asyncio's and uvloop's (issue #18, item 0) ---------------------------


def loop_factory(name: str) -> Any:
    """A new event loop of the kind ``name`` names (uvloop: skipped where not installed)."""
    if name == "uvloop":
        return pytest.importorskip("uvloop").new_event_loop
    return asyncio.new_event_loop


@pytest.mark.parametrize("transport", ["tcp", "unix"])
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_item0_a_lean_connection_works_on_every_event_loop(loop: str, transport: str) -> None:
    """Over TCP and a unix socket, on asyncio's loop and uvloop's (whose transports are not
    asyncio.Transport): one call, then 50 callers sharing the socket each get their own
    reply, then an error reply comes back as a value."""
    need_redis_server()
    server = RedisServer(unix_socket=transport == "unix")
    server.start()
    url = f"unix://{server.socket_path}" if transport == "unix" else server.url

    async def session() -> None:
        lean = lean_connection(Redis.from_url(url))
        assert lean is not None
        try:
            assert await lean.execute("PING") == b"PONG"
            replies = await asyncio.gather(*(lean.execute("INCR", "n") for _ in range(50)))
            assert sorted(replies) == list(range(1, 51))
            error = await lean.execute("EVALSHA", "0" * 40, 0)
            assert isinstance(error, ReplyError) and error.code == "NOSCRIPT"
            assert await lean.execute("GET", "n") == b"50"
        finally:
            await lean.aclose()

    try:
        with asyncio.Runner(loop_factory=loop_factory(loop)) as runner:
            runner.run(session())
    finally:
        server.close()


async def test_async_tests_run_on_the_loop_they_are_asked_to() -> None:
    """KEYSTILE_TEST_LOOP=uvloop (.ci/run's second pass) really puts the tests on uvloop."""
    from conftest import TEST_LOOP

    kind = type(asyncio.get_running_loop()).__module__.split(".")[0]
    assert kind == TEST_LOOP
