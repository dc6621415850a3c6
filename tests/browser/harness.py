"""Servers in subprocesses, on free loopback ports: started, waited for, always stopped.

Every wait is bounded; a server that dies or never answers fails the test with its output.
"""

from __future__ import annotations

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import httpx

from browser.gate_server import MARKER

HERE = Path(__file__).resolve().parent
GATE_SERVER = HERE / "gate_server.py"
START_TIMEOUT = 20.0


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(**extra: str) -> dict[str, str]:
    """This environment without keygate's or uvicorn's settings, plus ``extra``: a child
    is configured only by what the test says."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("KEYGATE_") and k != "FORWARDED_ALLOW_IPS"
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def uvicorn_argv(port: int, *flags: str) -> list[str]:
    """The uvicorn command line serving gate_server:create_app on 127.0.0.1:port."""
    command = "-m uvicorn --factory gate_server:create_app --host 127.0.0.1 --app-dir"
    return [sys.executable, *command.split(), str(HERE), "--port", str(port), *flags]


def demo_argv(port: int) -> list[str]:
    """``keygate demo`` on 127.0.0.1:port, through gate_server's wrapper."""
    return [sys.executable, str(GATE_SERVER), "demo", str(port)]


class ServerFailed(RuntimeError):
    """The server exited or did not answer in time."""


class ServerProcess:
    """One server subprocess: its output, the keys it printed, its base URL."""

    def __init__(self, argv: list[str], env: Mapping[str, str], port: int) -> None:
        self.argv = argv
        self.env = dict(env)
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        self.keys: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the process, read the keys it prints, and wait until /health answers."""
        self._process = subprocess.Popen(
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
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ServerFailed(f"no keys within {timeout} s:\n{self.output}") from None
            if line is None:
                raise ServerFailed(f"exited before printing its keys:\n{self.output}")
            if line.startswith(MARKER + " "):
                self.keys = json.loads(line[len(MARKER) + 1 :])
                break
        with httpx.Client(base_url=self.base_url, timeout=1.0) as http:
            while True:
                if self._process.poll() is not None:
                    raise ServerFailed(f"exited before answering:\n{self.output}")
                try:
                    if http.get("/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise ServerFailed(f"not answering within {timeout} s:\n{self.output}")
                time.sleep(0.02)  # bounded polling

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
        """Stop the process (politely, then not) and collect its output."""
        process = self._process
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


@contextmanager
def serve(
    argv: Callable[[int], list[str]],
    env: Mapping[str, str],
    *,
    attempts: int = 3,
) -> Iterator[ServerProcess]:
    """A started server on a free port (another port if that one was taken meanwhile)."""
    for attempt in range(attempts):
        port = free_port()
        server = ServerProcess(argv(port), env, port)
        try:
            server.start()
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


def seed_env(keys: list[dict[str, object]], **extra: str) -> dict[str, str]:
    """A child environment asking gate_server to create ``keys``."""
    return child_env(KEYGATE_TEST_SEED=json.dumps(keys), **extra)
