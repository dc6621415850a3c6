"""uvicorn in a subprocess on a free loopback port: started, waited for (every worker),
always stopped. Every wait is bounded; a server that dies fails the test with its log."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import httpx

from faults.redis_server import free_port

TESTS = Path(__file__).resolve().parent.parent
START_TIMEOUT = 30.0
STARTED = "Application startup complete."


def child_env(**extra: str) -> dict[str, str]:
    """This environment without keystile's (or uvicorn's) settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("KEYSTILE_", "KS_")) and k != "FORWARDED_ALLOW_IPS"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def loop_flags() -> list[str]:
    """The event loop and HTTP parser of every uvicorn a test starts: asyncio and h11, or
    with ``KEYSTILE_TEST_SERVER=uvloop`` (.ci/run) uvloop and httptools, what
    ``uvicorn[standard]`` picks by default."""
    if os.environ.get("KEYSTILE_TEST_SERVER", "") == "uvloop":
        return ["--loop", "uvloop", "--http", "httptools"]
    return ["--loop", "asyncio", "--http", "h11"]


def factory_argv(port: int, *flags: str) -> list[str]:
    """uvicorn serving faults.app:create_app on 127.0.0.1:port (``flags`` come last)."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "faults.app:create_app",
        "--app-dir",
        str(TESTS),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *loop_flags(),
        *flags,
    ]


def demo_argv(port: int) -> list[str]:
    """``keystile demo`` (the command line, its uvicorn configured as it configures it)."""
    code = "import sys; from keystile.cli import main; sys.exit(main(sys.argv[1:]))"
    return [sys.executable, "-c", code, "demo", "--host", "127.0.0.1", "--port", str(port)]


class ServerFailed(RuntimeError):
    """The server exited or did not answer in time."""


class Server:
    """One server process and everything it printed."""

    def __init__(self, argv: list[str], env: Mapping[str, str], port: int) -> None:
        self.argv = argv
        self.env = dict(env)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def started(self, line: str) -> bool:
        """Whether ``line`` says one worker has started (what :meth:`start` counts)."""
        return STARTED in line

    def start(self, workers: int = 1, timeout: float = START_TIMEOUT) -> None:
        """Start, wait for ``workers`` lines that say so (:meth:`started`), then for
        /health."""
        self.process = subprocess.Popen(
            self.argv,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        seen = 0
        while seen < workers:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ServerFailed(f"not started within {timeout} s:\n{self.output}") from None
            if line is None:
                raise ServerFailed(f"exited while starting:\n{self.output}")
            seen += self.started(line)
        with httpx.Client(base_url=self.base_url, timeout=2.0) as http:
            while True:
                try:
                    if http.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise ServerFailed(f"/health not answering:\n{self.output}")
                time.sleep(0.02)  # bounded polling

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_for_lines(self, text: str, count: int = 1, timeout: float = 5.0) -> list[str]:
        """The output lines containing ``text``, once there are ``count`` of them (waiting up
        to ``timeout`` seconds: a server logs a request just after answering it)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [line for line in list(self.lines) if text in line]
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"not {count} lines with {text!r}:\n{self.output}")
            time.sleep(0.01)  # bounded polling

    def stop(self) -> None:
        """Stop (SIGTERM, then SIGKILL after 10 s) and collect the output."""
        process = self.process
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._reader is not None:
            self._reader.join(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


ServerKind = TypeVar("ServerKind", bound=Server)


@contextmanager
def serve_command(
    argv: Callable[[int], list[str]],
    env: Mapping[str, str],
    *,
    kind: type[ServerKind],
    workers: int = 1,
    attempts: int = 3,
) -> Iterator[ServerKind]:
    """``kind`` running ``argv(port)``, started, on a free port (another one if that port
    was taken meanwhile); always stopped."""
    for attempt in range(attempts):
        port = free_port()
        server = kind(argv(port), env, port)
        try:
            server.start(workers=workers)
        except ServerFailed:
            server.stop()
            if "Errno 98" in server.output and attempt + 1 < attempts:
                continue  # someone took the port between free_port() and the bind
            raise
        break
    try:
        yield server
    finally:
        server.stop()


@contextmanager
def serve(
    env: Mapping[str, str] | None = None,
    *,
    flags: tuple[str, ...] = (),
    workers: int = 1,
    demo: bool = False,
    attempts: int = 3,
) -> Iterator[Server]:
    """faults.app (or the demo) under uvicorn, started, on a free port."""

    def argv(port: int) -> list[str]:
        return demo_argv(port) if demo else factory_argv(port, *flags)

    with serve_command(
        argv, env or child_env(), kind=Server, workers=workers, attempts=attempts
    ) as server:
        yield server
