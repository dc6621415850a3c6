"""Raw HTTP/1.1 over loopback sockets: exactly the bytes a test chooses, and exactly what
came back (or that the server closed the connection without an answer)."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from faults.asgi import error_code


@dataclass
class RawAnswer:
    """What came back on one connection: the status (``None``: no response at all), the
    headers (names lowercased; repeated ones joined with ``, ``), the body, and how the
    exchange ended."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    raw: bytes = b""
    error: str | None = None
    elapsed: float = 0.0

    @property
    def json(self) -> object:
        return json.loads(self.body)

    @property
    def code(self) -> str | None:
        return error_code(self.body)

    def describe(self) -> str:
        if self.status is None:
            return f"no response ({self.error or 'closed'})"
        code = self.code
        return f"{self.status}" + (f" {code}" if code else "")


def request(
    method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> bytes:
    """An HTTP/1.1 request with ``Connection: close``, headers sent exactly as given."""
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    lines += [name + b": " + value for name, value in headers]
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def parse(raw: bytes) -> RawAnswer:
    answer = RawAnswer(raw=raw)
    head, sep, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    if not sep or not lines[0].startswith(b"HTTP/1.1 "):
        answer.error = f"not an HTTP response: {raw[:80]!r}" if raw else "closed"
        return answer
    answer.status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.decode("latin-1").strip().lower()
        text = value.decode("latin-1").strip()
        answer.headers[key] = f"{answer.headers[key]}, {text}" if key in answer.headers else text
    answer.body = body
    return answer


def complete(raw: bytes) -> bool:
    """Whether ``raw`` holds one whole response (so a kept-alive connection need not be
    waited out)."""
    _, sep, body = raw.partition(b"\r\n\r\n")
    if not sep:
        return False
    answer = parse(raw)
    if answer.status is None:
        return False
    if "content-length" in answer.headers:
        return len(body) >= int(answer.headers["content-length"].split(",")[0])
    if "chunked" in answer.headers.get("transfer-encoding", ""):
        return body.endswith(b"0\r\n\r\n")
    return answer.status in (204, 304)


async def exchange(
    port: int,
    data: bytes,
    *,
    timeout: float = 10.0,
    gate: asyncio.Event | None = None,
    half_close: bool = False,
) -> RawAnswer:
    """Connect to 127.0.0.1:port, (wait for ``gate``,) send ``data`` (then, with
    ``half_close``, end the sending side) and read one response, or until the server
    closes. Never raises: a reset or a timeout is recorded in ``error``."""
    started = time.monotonic()
    raw = b""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                if gate is not None:
                    await gate.wait()
                    started = time.monotonic()
                writer.write(data)
                if half_close:
                    writer.write_eof()
                await writer.drain()
                while not complete(raw):
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    raw += chunk
            finally:
                writer.close()
    except TimeoutError:
        return RawAnswer(error="timed out", elapsed=time.monotonic() - started)
    except OSError as exc:
        if raw:  # reset after answering: keep the answer
            answer = parse(raw)
            answer.elapsed = time.monotonic() - started
            return answer
        return RawAnswer(error=f"{type(exc).__name__}: {exc}", elapsed=time.monotonic() - started)
    answer = parse(raw)
    answer.elapsed = time.monotonic() - started
    return answer
