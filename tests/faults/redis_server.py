"""A redis-server of a test's own on a free loopback port, which the test may kill,
restart on the same port (empty, or from a snapshot it asked for) and inspect.

The shared server on 6379 is never touched from here.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

START_TIMEOUT = 5.0


def need_redis_server() -> None:
    """Skip a test when no redis-server binary is installed — fail it instead when Redis
    is required (``KEYSTILE_TEST_REQUIRE_REDIS``, as .ci/run sets)."""
    import pytest

    from conftest import REDIS_REQUIRED

    if shutil.which("redis-server") is None:
        missing = "redis-server is not on PATH (apt-get install redis-server)"
        if REDIS_REQUIRED:
            pytest.fail(missing)
        pytest.skip(missing)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1, restartable on the same port.

    No persistence unless asked: ``--save "" --appendonly no``. :meth:`snapshot` writes a
    dump (``SAVE``) that the next :meth:`start` loads, as a server with persistence would
    come back after a crash; without one the server comes back empty.
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        debug: bool = False,
        password: str | None = None,
        unix_socket: bool = False,
        args: tuple[str, ...] = (),
    ) -> None:
        self.args = args  # more redis-server options (e.g. "--cluster-enabled", "yes")
        self.debug = debug  # allow DEBUG SLEEP and the like from loopback
        self.password = password  # requirepass: the default user's password
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = tempfile.TemporaryDirectory(prefix="ks-redis-")
        self.dir = Path(self._dir.name)
        # Listening on a unix socket too (its path, in the server's directory), when asked.
        self.socket_path = str(self.dir / "redis.sock") if unix_socket else None
        self.process: subprocess.Popen[bytes] | None = None
        self.admin = redis.Redis(
            host="127.0.0.1",
            port=self.port,
            password=password,
            socket_timeout=5,
            socket_connect_timeout=1,
        )
        self.starts = 0

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server (loading a snapshot if one was taken) and wait for PING."""
        assert self.process is None or self.process.poll() is not None, "already running"
        argv = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
            "--dir",
            str(self.dir),
            "--dbfilename",
            "dump.rdb",
            "--logfile",
            str(self.dir / "redis.log"),
            *(("--enable-debug-command", "local") if self.debug else ()),
            *(("--requirepass", self.password) if self.password is not None else ()),
            *(
                ("--unixsocket", self.socket_path, "--unixsocketperm", "700")
                if self.socket_path is not None
                else ()
            ),
            *self.args,
        ]
        deadline = time.monotonic() + timeout
        while True:
            self.process = subprocess.Popen(
                argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(deadline):
                self.starts += 1
                return
            # Exited at once: the port may still be held for a moment after a kill.
            assert time.monotonic() < deadline, f"redis-server did not start:\n{self.log()}"
            time.sleep(0.05)

    def _wait_ready(self, deadline: float) -> bool:
        assert self.process is not None
        while True:
            try:
                self.admin.ping()
                return True
            except (redis.ConnectionError, redis.BusyLoadingError):
                if self.process.poll() is not None:
                    return False
                if time.monotonic() > deadline:
                    self.kill()
                    raise AssertionError(f"redis-server not answering:\n{self.log()}") from None
                time.sleep(0.01)

    def log(self) -> str:
        path = self.dir / "redis.log"
        return path.read_text(errors="replace")[-4000:] if path.exists() else "(no log)"

    def snapshot(self) -> None:
        """Write the dataset to disk now (``SAVE``): the next start loads it."""
        self.admin.save()

    def forget_snapshot(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / "dump.rdb").unlink()

    def kill(self) -> None:
        """SIGKILL the server (a crash: no goodbye to its clients) and wait for it."""
        process = self.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=10)
        self.admin.connection_pool.disconnect()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def clients(self, name: str | None = None) -> list[dict[str, object]]:
        """``CLIENT LIST`` (without this helper's own connection), optionally only the
        connections named ``name``."""
        me = self.admin.client_id()
        found = [c for c in self.admin.client_list() if int(c["id"]) != me]
        if name is not None:
            found = [c for c in found if c.get("name") == name]
        return found

    def commands(self) -> dict[str, int]:
        """Calls per command since the start (or the last :meth:`reset`), as INFO
        commandstats counts them."""
        stats = self.admin.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(value["calls"])
            for name, value in stats.items()
            if name.startswith("cmdstat_")
        }

    def errors(self) -> dict[str, int]:
        """Error replies so far by kind (INFO errorstats), e.g. ``{"NOSCRIPT": 1}``."""
        stats = self.admin.info("errorstats")
        return {
            name.removeprefix("errorstat_"): int(value["count"])
            for name, value in stats.items()
            if name.startswith("errorstat_")
        }

    def reset(self) -> None:
        """Zero the command and error statistics (CONFIG RESETSTAT)."""
        self.admin.config_resetstat()

    def close(self) -> None:
        self.kill()
        self.admin.close()
        self._dir.cleanup()
