"""Servers in subprocesses, on free loopback ports: started, waited for, always stopped.

Every wait is bounded; a server that dies or never answers fails the test with its output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from browser.gate_server import MARKER
from faults.server import Server, child_env, loop_flags, serve_command

__all__ = ["ServerProcess", "child_env", "demo_argv", "seed_env", "serve", "uvicorn_argv"]

HERE = Path(__file__).resolve().parent
GATE_SERVER = HERE / "gate_server.py"


def uvicorn_argv(port: int, *flags: str) -> list[str]:
    """The uvicorn command line serving gate_server:create_app on 127.0.0.1:port."""
    command = "-m uvicorn --factory gate_server:create_app --host 127.0.0.1 --app-dir"
    port_and_loop = ["--port", str(port), *loop_flags()]
    return [sys.executable, *command.split(), str(HERE), *port_and_loop, *flags]


def demo_argv(port: int) -> list[str]:
    """``keystile demo`` on 127.0.0.1:port, through gate_server's wrapper."""
    return [sys.executable, str(GATE_SERVER), "demo", str(port)]


class ServerProcess(Server):
    """A gate_server (or demo) process: started once it has printed the keys it made."""

    keys: list[str]

    def started(self, line: str) -> bool:
        if line.startswith(MARKER + " "):
            self.keys = json.loads(line[len(MARKER) + 1 :])
            return True
        return False


@contextmanager
def serve(
    argv: Callable[[int], list[str]], env: Mapping[str, str], *, attempts: int = 3
) -> Iterator[ServerProcess]:
    """A started server on a free port (another port if that one was taken meanwhile)."""
    with serve_command(argv, env, kind=ServerProcess, attempts=attempts) as server:
        yield server


def seed_env(keys: list[dict[str, object]], **extra: str) -> dict[str, str]:
    """A child environment asking gate_server to create ``keys``."""
    return child_env(KEYSTILE_TEST_SEED=json.dumps(keys), **extra)
