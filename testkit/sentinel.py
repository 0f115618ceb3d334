"""A Redis master, its replica and three Sentinels as real local processes, for the Sentinel
tests and ``bench/sentinel_failover.py``.

``with SentinelGroup(fsync="everysec") as group: group.url`` gives a ``redis+sentinel://``
URL; ``group.kill_master()`` SIGKILLs the current master and ``group.wait_failover(old)``
waits until the Sentinels name another one. Loopback only; every process's files live in one
temp dir that goes away on exit.
"""

from __future__ import annotations

import signal
import subprocess
import time
from typing import Any

import redis

from testkit.process_group import ProcessGroup
from workers.redis_server import find_server_binary, free_port

SERVICE = "chatq"
HOST = "127.0.0.1"
# Sentinel timing for tests: a master silent for 1 s is subjectively down; two of three
# Sentinels agreeing make it objectively down and one of them fails it over.
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 10_000
QUORUM = 2


class SentinelGroupError(RuntimeError):
    """A process of the group did not start or a failover did not happen in time."""


class SentinelGroup(ProcessGroup):
    """A master, one replica and three Sentinels monitoring them (service ``chatq``)."""

    def __init__(self, *, fsync: str = "everysec", binary: str | None = None) -> None:
        if fsync not in ("always", "everysec", "no"):
            raise ValueError(f"fsync must be always, everysec or no: {fsync!r}")
        self.fsync = fsync
        super().__init__("chatq-sentinel-")
        self.binary = binary or find_server_binary()
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}
        self.first_master = 0

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def server_url(self, port: int) -> str:
        return f"redis://{HOST}:{port}/0"

    def start(self) -> SentinelGroup:
        master = self._start_server(None)
        self.first_master = master
        self._start_server(master)
        self._wait_replicated(master)
        for _ in range(3):
            self._start_sentinel(master)
        self._wait_sentinels_agree(master)
        return self

    def master_port(self) -> int:
        """The master the Sentinels name now (asked of the first one that answers)."""
        for port in self.sentinels:
            reply = _command(port, "SENTINEL GET-MASTER-ADDR-BY-NAME", SERVICE)
            if reply:
                return int(reply[1])
        raise SentinelGroupError("no Sentinel names a master")

    def kill_master(self) -> int:
        """SIGKILL the current master (no shutdown, no final fsync); its port."""
        port = self.master_port()
        proc = self.servers[port]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return port

    def wait_failover(self, old_port: int, timeout_s: float = 30.0) -> int:
        """Wait until the Sentinels name a master other than ``old_port`` and it takes
        writes; its port."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                port = self.master_port()
            except (SentinelGroupError, redis.RedisError):
                port = old_port
            if port != old_port and _role(port) == "master":
                return port
            time.sleep(0.05)
        raise SentinelGroupError(f"no failover from port {old_port} within {timeout_s} s")

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return [*self.sentinels.values(), *self.servers.values()]

    # ------------------------------------------------------------------ processes

    def _start_server(self, master: int | None) -> int:
        port = free_port(HOST)
        data = self.dir / f"redis-{port}"
        data.mkdir()
        args = [
            self.binary, "--port", str(port), "--bind", HOST, "--dir", str(data),
            "--save", "", "--appendonly", "yes", "--appendfsync", self.fsync,
            "--maxmemory-policy", "noeviction", "--logfile", str(data / "log"),
            "--daemonize", "no",
        ]  # fmt: skip
        if master is not None:
            args += ["--replicaof", HOST, str(master)]
        self.servers[port] = self._spawn(args, port)
        return port

    def _start_sentinel(self, master: int) -> int:
        port = free_port(HOST)
        conf = self.dir / f"sentinel-{port}.conf"
        conf.write_text(
            f"port {port}\nbind {HOST}\ndaemonize no\nlogfile {self.dir}/sentinel-{port}.log\n"
            f"dir {self.dir}\n"
            f"sentinel monitor {SERVICE} {HOST} {master} {QUORUM}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.sentinels[port] = self._spawn([self.binary, str(conf), "--sentinel"], port)
        return port

    def _spawn(self, args: list[str], port: int) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SentinelGroupError(f"{args[0]} on port {port} exited at start")
            try:
                if _command(port, "PING"):
                    return proc
            except redis.RedisError:
                time.sleep(0.05)
        proc.kill()
        raise SentinelGroupError(f"{args[0]} did not answer on port {port} in 10 s")

    def _wait_replicated(self, master: int) -> None:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            info = _command(master, "INFO", "replication")
            if info.get("connected_slaves") == 1 and info["slave0"]["state"] == "online":
                return
            time.sleep(0.05)
        raise SentinelGroupError("the replica did not sync with the master in 15 s")

    def _wait_sentinels_agree(self, master: int) -> None:
        # A Sentinel learns the replica and the other Sentinels from the master (INFO, hello
        # messages); a failover before that would have nobody to promote or to vote.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ready = 0
            for port in self.sentinels:
                state = _command(port, "SENTINEL MASTER", SERVICE)  # parsed by redis-py
                others = state.get("num-other-sentinels", 0)
                if state.get("num-slaves", 0) >= 1 and others >= len(self.sentinels) - 1:
                    ready += 1
            if ready == len(self.sentinels):
                return
            time.sleep(0.1)
        raise SentinelGroupError(f"the Sentinels did not learn master {master}'s group in 20 s")


def _role(port: int) -> str:
    try:
        reply = _command(port, "ROLE")
    except redis.RedisError:
        return "down"
    return _text(reply[0]) if reply else "unknown"


def _command(port: int, *args: str) -> Any:
    """One command over a fresh connection (no pool kept between calls: the group must be
    usable before and after a failover without a client's reconnect logic in the way)."""
    with redis.Redis(host=HOST, port=port, socket_timeout=2, single_connection_client=True) as r:
        return r.execute_command(*args)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
