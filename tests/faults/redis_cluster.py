"""A Redis Cluster of the tests' own: three primaries (and, when asked, one replica each)
on free loopback ports, made with ``redis-cli --cluster create`` and stopped by pid.

The shared server on 6379 is never touched from here. A cluster node also listens on its
port + 10,000 (the cluster bus), so every port is 55,535 or less.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time

import redis

from faults.redis_server import RedisServer, free_port

START_TIMEOUT = 30.0


def cluster_port(taken: set[int]) -> int:
    """A free loopback port of 55,535 or less whose bus port (+10,000) is free too."""
    while True:
        port = free_port()
        if port > 55_535 or port in taken or port + 10_000 in taken:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


class RedisCluster:
    """``primaries`` primaries and ``replicas`` replicas of each, all on 127.0.0.1."""

    def __init__(self, primaries: int = 3, replicas: int = 0) -> None:
        taken: set[int] = set()
        self.nodes: list[RedisServer] = []
        for _ in range(primaries * (1 + replicas)):
            port = cluster_port(taken)
            taken.add(port)
            node = RedisServer(
                port,
                args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",  # in the node's own directory
                    "--cluster-node-timeout",
                    "2000",
                ),
            )
            self.nodes.append(node)
        self.replicas = replicas
        self.ports = [node.port for node in self.nodes]
        self.url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start(self) -> None:
        for node in self.nodes:
            node.start()
        create = subprocess.run(
            [
                "redis-cli",
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in self.ports),
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=START_TIMEOUT,
            check=False,
        )
        assert create.returncode == 0, create.stdout.decode() + create.stderr.decode()
        self.wait_ok()

    def wait_ok(self, nodes: list[RedisServer] | None = None) -> None:
        """Wait until every running node says ``cluster_state:ok`` and knows every slot's
        primary (and, with replicas, every replica has synced)."""
        deadline = time.monotonic() + START_TIMEOUT
        for node in nodes or [n for n in self.nodes if n.running]:
            while True:
                with contextlib.suppress(redis.RedisError):
                    info = node.admin.cluster("info")
                    if info.get("cluster_state") == "ok" and self._synced(node):
                        break
                assert time.monotonic() < deadline, node.log()
                time.sleep(0.05)

    @staticmethod
    def _synced(node: RedisServer) -> bool:
        replication = node.admin.info("replication")
        if replication.get("role") != "slave":
            return True
        return bool(replication.get("master_link_status") == "up")

    def primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now."""
        found = []
        for node in self.nodes:
            if node.running and node.admin.info("replication").get("role") == "master":
                found.append(node)
        return found

    def owner(self, name: str) -> RedisServer:
        """The running primary that holds ``name``'s slot."""
        admin = self.primaries()[0].admin
        slot = int(admin.cluster("keyslot", name))
        by_port = {node.port: node for node in self.nodes}
        for start, end, primary, *_ in admin.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return by_port[int(primary[1])]
        raise AssertionError(f"no primary holds slot {slot}")

    def exists(self, name: str) -> bool:
        return bool(self.owner(name).admin.exists(name))

    def cleanup(self, namespace: str) -> None:
        """Delete what a test wrote under its namespace, on every primary."""
        for node in self.primaries():
            names = list(node.admin.scan_iter(match=f"{namespace}:*", count=1000))
            for name in names:
                node.admin.delete(name)

    def close(self) -> None:
        for node in self.nodes:
            node.close()
