"""A lean Redis connection for the rate limiter's one round trip per request.

redis-py spends far more Python per command than Redis spends answering it (a
``redis.asyncio`` EVALSHA costs ~100 µs here, most of it in the client's layers). The
rate limiter sends one kind of command on every limited request, so it talks to Redis
through this module instead: one :class:`asyncio.Protocol` speaking RESP2 over one
socket, shared by every caller.

- Redis answers the commands of one connection in order, so callers need not wait for a
  free connection: each appends its future to a queue and the replies resolve them in
  turn. A caller alone writes at once; callers that arrive while replies are outstanding
  are written together, in parts of at most :data:`PART` commands: the rest of an
  event-loop iteration's at its end, each full part at once, so Redis answers the first
  requests of a burst while the event loop is still preparing the others rather than
  after (64 requests in flight: the app waited on Redis a third of the time with one
  write per iteration, almost never in parts of 16).
- One timer per connection watches the oldest outstanding reply. When a caller's deadline
  passes, everything queued behind it is stuck too: every caller gets ``TimeoutError``
  and the connection is dropped; the next call connects again.
- It speaks what the limiter needs (commands in, RESP2 replies out, ``AUTH`` and
  ``SELECT`` on connecting) and nothing else: no pub/sub, TLS or cluster.
  :func:`keystile.redis.connect.lean_connection` answers ``None`` for a client it cannot
  stand in for, and the limiter keeps using redis-py.

Error replies (``-NOSCRIPT ...``) are returned as :class:`ReplyError` values, not raised:
a caller decides what each means. Lost connections raise :class:`ConnectionError` (an
:class:`OSError`), garbage from the server :class:`ProtocolError` (one too).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Sequence
from typing import Any, cast

__all__ = ["LeanRedis", "ProtocolError", "ReplyError", "RespReader", "encode"]

_CRLF = b"\r\n"
_MAX_LENGTH = 512 * 1024 * 1024  # Redis' own proto-max-bulk-len default
_MAX_DEPTH = 16
#: Commands queued while replies are outstanding go out at most this many at a time.
PART = 16


class ReplyError(Exception):
    """An error reply from Redis, such as ``NOSCRIPT No matching script``."""

    @property
    def code(self) -> str:
        """The error's first word (``NOSCRIPT``, ``ERR``, ``WRONGPASS``)."""
        return str(self.args[0]).split(" ", 1)[0] if self.args else ""


class ProtocolError(ConnectionError):
    """The server sent something that is not a RESP2 reply (the connection is dropped)."""


def encode(args: Sequence[bytes | str | int]) -> bytes:
    """One command as a RESP array of bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if isinstance(arg, bytes):
            data = arg
        elif isinstance(arg, str):
            data = arg.encode()
        elif isinstance(arg, int) and not isinstance(arg, bool):
            data = b"%d" % arg
        else:
            raise TypeError(f"a Redis argument is bytes, str or int, not {type(arg).__name__}")
        parts.append(b"$%d\r\n%b\r\n" % (len(data), data))
    return b"".join(parts)


class _Incomplete(Exception):
    """The buffer ends inside an element: wait until ``need`` bytes from its start."""

    def __init__(self, need: int) -> None:
        self.need = need


def _integer(line: bytes) -> int:
    # int() would also take b" 1", b"1_0" and b"+1"; RESP allows only [-]digits.
    digits = line[1:] if line[:1] == b"-" else line
    if not digits.isdigit() or not digits.isascii() or len(digits) > 19:
        raise ProtocolError(f"not a RESP integer: {line[:32]!r}")
    return int(line)


def _length(line: bytes) -> int:
    """A bulk string's or array's length: -1 (nil) or 0..512 MiB."""
    length = _integer(line)
    if length < -1 or length > _MAX_LENGTH:
        raise ProtocolError(f"not a RESP length: {line[:32]!r}")
    return length


_ARRAY = object()  # _element: an array header was read and pushed on the stack


class RespReader:
    """Incremental RESP2 parser: :meth:`feed` bytes as they arrive, get whole replies.

    Bulk strings and simple strings come back as ``bytes``, integers as ``int``, nil as
    ``None``, arrays as ``list``, error replies as :class:`ReplyError` values. Work is
    linear in the bytes received however they are cut: the arrays being filled live on a
    stack (never parsed twice), and a bulk string waits, unjoined, until it is whole.
    """

    __slots__ = ("_chunks", "_need", "_size", "_stack")

    def __init__(self) -> None:
        self._chunks: list[bytes] = []  # bytes received, not yet parsed
        self._size = 0  # their total length
        self._need = 0  # parse again once that many are here
        self._stack: list[tuple[list[Any], int]] = []  # arrays being filled: (items, size)

    def feed(self, data: bytes) -> list[Any]:
        """Every reply completed by ``data`` (raises :class:`ProtocolError` on garbage)."""
        if not self._chunks and not self._stack and data[-2:] == _CRLF:
            # The common case: whole replies in one piece. Parse in place.
            buffer = data
        else:
            self._chunks.append(data)
            self._size += len(data)
            if self._size < self._need:
                return []
            buffer = b"".join(self._chunks)
        replies: list[Any] = []
        stack = self._stack
        position, end = 0, len(buffer)
        while position < end:
            try:
                value, position = self._element(buffer, position)
            except _Incomplete as more:
                rest = buffer[position:]
                self._chunks, self._size, self._need = [rest], len(rest), more.need
                return replies
            if value is _ARRAY:
                continue
            while stack:  # the element completes its array, and maybe the arrays above
                items, size = stack[-1]
                items.append(value)
                if len(items) < size:
                    break
                stack.pop()
                value = items
            else:
                replies.append(value)
        self._chunks, self._size, self._need = [], 0, 0
        return replies

    def _element(self, buffer: bytes, position: int) -> tuple[Any, int]:
        eol = buffer.find(_CRLF, position)
        if eol < 0:
            if len(buffer) - position > 64 * 1024:  # no header line is that long
                raise ProtocolError("RESP line too long")
            raise _Incomplete(len(buffer) - position + 1)
        kind = buffer[position]
        line = buffer[position + 1 : eol]
        after = eol + 2
        if kind == 0x24:  # $ bulk string
            length = _length(line)
            if length < 0:
                return None, after
            stop = after + length
            if len(buffer) < stop + 2:
                raise _Incomplete(stop + 2 - position)
            if buffer[stop : stop + 2] != _CRLF:
                raise ProtocolError("RESP bulk string not followed by CRLF")
            return buffer[after:stop], stop + 2
        if kind == 0x2B:  # + simple string
            return line, after
        if kind == 0x3A:  # : integer
            return _integer(line), after
        if kind == 0x2D:  # - error
            return ReplyError(line.decode("utf-8", "replace")), after
        if kind == 0x2A:  # * array
            size = _length(line)
            if size < 0:
                return None, after
            if size == 0:
                return [], after
            if len(self._stack) >= _MAX_DEPTH:
                raise ProtocolError("RESP arrays nested too deep")
            self._stack.append(([], size))
            return _ARRAY, after
        raise ProtocolError(f"unknown RESP type byte {bytes([kind])!r}")


class _Connection(asyncio.Protocol):
    """One socket: the queue of callers awaiting replies, in the order they were sent.

    Two clocks run on one timer. Each caller has a deadline: past it, that caller gets
    ``TimeoutError`` (its reply, when it comes, is read and dropped). And the oldest
    command on the wire may wait ``stall`` seconds: past that, the socket is stuck, so
    every caller fails and the socket is dropped (a late caller never condemns a healthy
    socket: only the time a command has been waiting on the wire does).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, stall: float) -> None:
        self.loop = loop
        self.stall = stall
        self.transport: asyncio.WriteTransport | None = None
        self.reader = RespReader()
        # (future, caller's deadline, when sent) per command sent or about to be sent
        self.waiting: deque[tuple[asyncio.Future[Any], float, float]] = deque()
        self.unsent: list[bytes] = []  # written together on the next loop iteration
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = math.inf  # when the timer fires (inf: not armed)
        self.lost = False
        self.closed: asyncio.Future[None] = loop.create_future()  # done once it is closed
        self.writes = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream connection's transport writes and aborts, whatever its class: uvloop's
        # TCPTransport and UnixTransport do not derive from asyncio's classes at all.
        self.transport = cast(asyncio.WriteTransport, transport)

    def data_received(self, data: bytes) -> None:
        try:
            replies = self.reader.feed(data)
        except ProtocolError as exc:
            self.drop(exc)
            return
        waiting = self.waiting
        for reply in replies:
            if not waiting:
                self.drop(ProtocolError("Redis sent a reply nobody asked for"))
                return
            future = waiting.popleft()[0]
            if not future.done():
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fail(ConnectionError("the connection to Redis was lost"))
        if not self.closed.done():
            self.closed.set_result(None)

    def send(self, command: bytes, deadline: float) -> asyncio.Future[Any]:
        future = self.loop.create_future()
        now = self.loop.time()
        transport = self.transport
        if self.lost or transport is None:
            future.set_exception(ConnectionError("the connection to Redis was lost"))
            return future
        if deadline <= now:  # no time left to send it in
            future.set_exception(TimeoutError("no time left to ask Redis"))
            return future
        waiting = self.waiting
        waiting.append((future, deadline, now))
        wake = deadline if deadline < now + self.stall else now + self.stall
        if wake < self.timer_at:
            self.arm(wake)
        if len(waiting) == 1:
            # Nothing outstanding: write at once (the common case of one caller).
            transport.write(command)
            self.writes += 1
        else:
            # Replies are outstanding: what arrives meanwhile goes out together, a full
            # part at once (Redis starts on it), the rest at the end of this iteration.
            unsent = self.unsent
            if not unsent:
                self.loop.call_soon(self.flush)
            unsent.append(command)
            if len(unsent) >= PART:
                self.flush()
        return future

    def flush(self) -> None:
        unsent, self.unsent = self.unsent, []
        if unsent and not self.lost and self.transport is not None:
            self.transport.write(b"".join(unsent))
            self.writes += 1

    def arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.loop.call_at(when, self.expire)
        self.timer_at = when

    def expire(self) -> None:
        """The timer: drop a stuck socket, or fail the callers past their deadline."""
        self.timer, self.timer_at = None, math.inf
        waiting = self.waiting
        if not waiting:
            return
        now = self.loop.time()
        stuck_at = waiting[0][2] + self.stall
        if stuck_at <= now:
            self.drop(TimeoutError("Redis did not answer in time"))
            return
        wake = stuck_at
        for future, deadline, _ in waiting:
            if future.done():
                continue
            if deadline <= now:
                future.set_exception(TimeoutError("Redis did not answer in time"))
            elif deadline < wake:
                wake = deadline
        self.arm(wake)

    def fail(self, exc: BaseException) -> None:
        waiting, self.waiting = self.waiting, deque()
        self.unsent = []
        if self.timer is not None:
            self.timer.cancel()
            self.timer, self.timer_at = None, math.inf
        for future, _, _ in waiting:
            if not future.done():
                future.set_exception(exc)

    def drop(self, exc: BaseException) -> None:
        """Close the socket (its replies can no longer be matched) and fail every caller.
        The socket closes on the loop's next iteration: on a loop already closed, only
        when the transport is collected (close a LeanRedis on the loop that used it)."""
        self.lost = True
        self.fail(exc)
        if self.transport is not None:
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                self.transport.abort()


def _failed(attempt: asyncio.Task[_Connection]) -> bool:
    """Whether a finished connection attempt failed (reading its error marks it read)."""
    return attempt.done() and (attempt.cancelled() or attempt.exception() is not None)


class LeanRedis:
    """One multiplexed RESP2 connection to Redis, connected on first use.

    ``timeout`` bounds each call (and each connection attempt, AUTH and SELECT included)
    unless the call gives a ``deadline`` of its own, in :meth:`asyncio.loop.time` seconds.
    ``name``: the connection's ``CLIENT SETNAME``, for ``CLIENT LIST`` (no spaces).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
        timeout: float = 0.25,
        name: str | None = None,
    ) -> None:
        self.host = host
        self.name = name
        self.port = port
        self.path = path
        self.db = db
        self.timeout = timeout
        self._username = username
        self._password = password
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[_Connection] | None = None
        self._writes = 0  # of connections already gone

    @property
    def writes(self) -> int:
        """How many times commands went out (round trips), connecting aside."""
        return self._writes + (self._conn.writes if self._conn is not None else 0)

    def deadline(self) -> float:
        """When a call starting now must end, in event-loop time."""
        return asyncio.get_running_loop().time() + self.timeout

    async def call(self, command: bytes, deadline: float | None = None) -> Any:
        """Send one :func:`encode`-d command; its reply (a :class:`ReplyError` for an error
        reply). ``TimeoutError`` past the deadline, ``ConnectionError`` when unreachable."""
        conn = self._conn
        if conn is None or conn.lost or conn.loop is not asyncio.get_running_loop():
            if deadline is None:
                deadline = self.deadline()
            conn = await self._connected(deadline)
        elif deadline is None:
            deadline = conn.loop.time() + self.timeout
        return await conn.send(command, deadline)

    async def execute(self, *args: bytes | str | int, deadline: float | None = None) -> Any:
        """:meth:`call` with the command's words."""
        return await self.call(encode(args), deadline)

    async def _connected(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        attempt = self._connecting
        if attempt is None or attempt.get_loop() is not loop or _failed(attempt):
            self._retire()
            attempt = self._connecting = loop.create_task(self._open())
            attempt.add_done_callback(_failed)  # its error is read even if nobody waits
        if not attempt.done():
            # Wait for the shared attempt without cancelling it: others may wait too.
            await asyncio.wait({attempt}, timeout=max(0.0, deadline - loop.time()))
            if not attempt.done():
                raise TimeoutError("could not connect to Redis in time")
        if self._connecting is attempt:
            self._connecting = None
        if attempt.cancelled():  # closed meanwhile: for this caller, Redis is unreachable
            raise ConnectionError("the connection to Redis was closed")
        conn = attempt.result()  # raises what the attempt raised
        if conn.lost:
            raise ConnectionError("the connection to Redis was lost")
        if self._conn is not conn:
            self._drop_connection()
            self._conn = conn
        return conn

    async def _open(self) -> _Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(max(self.timeout, 1.0)):
            try:
                if self.path is not None:
                    _, conn = await loop.create_unix_connection(
                        lambda: _Connection(loop, self.timeout), self.path
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: _Connection(loop, self.timeout), self.host, self.port
                    )
            except (UnicodeError, ValueError) as exc:  # a host name that cannot be one
                raise ConnectionError(f"cannot connect to Redis at {self!r}") from exc
            try:
                for words in self._handshake():
                    # The enclosing timeout is the deadline.
                    reply = await conn.send(encode(words), math.inf)
                    if reply != b"OK":
                        why = reply.code if isinstance(reply, ReplyError) else "no +OK"
                        raise ConnectionError(f"Redis refused {words[0]!s}: {why}")
            except BaseException:
                conn.drop(ConnectionError("connection abandoned"))
                raise
            conn.writes = 0  # the handshake is not a round trip of any caller
            return conn

    def _handshake(self) -> list[list[bytes | str | int]]:
        """AUTH, CLIENT SETNAME and SELECT, as redis-py sends them for the same URL."""
        words: list[list[bytes | str | int]] = []
        if self._username:
            words.append(["AUTH", self._username, self._password or ""])
        elif self._password is not None:
            words.append(["AUTH", self._password])
        if self.name:
            words.append(["CLIENT", "SETNAME", self.name])
        if self.db:
            words.append(["SELECT", self.db])
        return words

    def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            self._writes += conn.writes
            conn.drop(ConnectionError("the connection to Redis was closed"))

    def _retire(self) -> None:
        self._drop_connection()
        attempt, self._connecting = self._connecting, None
        if attempt is not None and not attempt.done():
            with contextlib.suppress(RuntimeError):  # its event loop is closed
                attempt.cancel()

    def close(self) -> None:
        """Close the connection and fail every caller still waiting; a later call
        connects again. The socket closes on the event loop's next iteration:
        :meth:`aclose` waits for it."""
        self._retire()

    async def aclose(self) -> None:
        """:meth:`close`, and wait until the socket is closed."""
        conn, attempt = self._conn, self._connecting
        self._retire()
        loop = asyncio.get_running_loop()
        if attempt is not None and attempt.get_loop() is loop:
            await asyncio.wait({attempt}, timeout=1.0)
            if attempt.done() and not _failed(attempt):
                conn = attempt.result()
                conn.drop(ConnectionError("the connection to Redis was closed"))
        if conn is not None and conn.loop is loop:
            await asyncio.wait({conn.closed}, timeout=1.0)

    def __repr__(self) -> str:
        where = self.path if self.path is not None else f"{self.host}:{self.port}"
        return f"LeanRedis({where}, db={self.db})"
