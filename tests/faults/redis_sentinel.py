"""A redis-server master watched by sentinels, on free loopback ports, stopped by pid."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import redis

from faults.redis_server import RedisServer, free_port

__all__ = ["SERVICE", "Sentinel"]

SERVICE = "ksmaster"


class Sentinel:
    """One sentinel watching ``master`` as :data:`SERVICE`, stopped by pid."""

    def __init__(self, master: RedisServer, *, quorum: int = 1, number: int = 0) -> None:
        self.master = master
        self.port = free_port()
        self.config = master.dir / f"sentinel{number}.conf"
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {master.dir}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {master.port} {quorum}\n"
            f"sentinel down-after-milliseconds {SERVICE} 1000\n"
        )
        log = Path(master.dir) / f"sentinel{number}.log"
        self.process = subprocess.Popen(
            ["redis-server", str(self.config), "--sentinel", "--logfile", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        admin = redis.Redis(port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        while True:  # ready once it names the master
            try:
                if admin.execute_command("SENTINEL", "get-master-addr-by-name", SERVICE):
                    break
            except redis.ConnectionError:
                pass
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.02)
        admin.close()

    @property
    def store_url(self) -> str:
        """The store URL that reaches the master through this sentinel."""
        return f"redis+sentinel://127.0.0.1:{self.port}/{SERVICE}"

    def cleanup(self, namespace: str) -> None:
        """Delete what a test wrote under its namespace on the master (never a flush)."""
        from conftest import cleanup_namespace

        cleanup_namespace(namespace, self.master.url)

    def close(self) -> None:
        self.process.kill()
        self.process.wait(timeout=10)
