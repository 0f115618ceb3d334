"""A Redis Cluster of real local ``redis-server --cluster-enabled yes`` processes, for the
Cluster tests and ``bench/queue_throughput.py``'s 1-vs-3-masters comparison.

``with LocalCluster(masters=3) as cluster: cluster.url`` gives a ``redis+cluster://`` URL.
The cluster is made with redis-py commands (CLUSTER ADDSLOTSRANGE, CLUSTER MEET), not
``redis-cli --cluster create``, so only ``redis-server`` must be installed: the slot space is
split into equal contiguous ranges, one per master, no replicas. Loopback only; every
process's files live in one temp dir that goes away on exit.
"""

from __future__ import annotations

import subprocess
import time

import redis

from testkit.process_group import ProcessGroup
from workers.redis_server import find_server_binary, free_port

HOST = "127.0.0.1"
SLOTS = 16384


class ClusterError(RuntimeError):
    """A node did not start, or the cluster did not come up in time."""


class LocalCluster(ProcessGroup):
    """``masters`` cluster nodes, each serving an equal share of the slots."""

    def __init__(self, masters: int = 3, *, binary: str | None = None) -> None:
        if masters < 1:
            raise ValueError(f"masters must be >= 1: {masters!r}")
        self.masters = masters
        super().__init__("chatq-cluster-")
        self.binary = binary or find_server_binary()
        self.nodes: dict[int, subprocess.Popen[bytes]] = {}
        self.bus_ports: dict[int, int] = {}

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a start-up node."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.nodes)

    @property
    def ports(self) -> list[int]:
        return list(self.nodes)

    def slot_ranges(self) -> list[tuple[int, int]]:
        """The (first, last) slot each master serves, in port order."""
        bounds = [SLOTS * i // self.masters for i in range(self.masters + 1)]
        return [(bounds[i], bounds[i + 1] - 1) for i in range(self.masters)]

    def node_of_slot(self, slot: int) -> int:
        """The port of the master serving ``slot``."""
        for port, (first, last) in zip(self.nodes, self.slot_ranges(), strict=True):
            if first <= slot <= last:
                return port
        raise ValueError(f"slot out of range: {slot}")

    def start(self) -> LocalCluster:
        for _ in range(self.masters):
            self._start_node()
        for port, (first, last) in zip(self.nodes, self.slot_ranges(), strict=True):
            _client(port).execute_command("CLUSTER ADDSLOTSRANGE", first, last)  # type: ignore[no-untyped-call]
        first_port = next(iter(self.nodes))
        for port in list(self.nodes)[1:]:
            _client(port).execute_command(  # type: ignore[no-untyped-call]
                "CLUSTER MEET", HOST, first_port, self.bus_ports[first_port]
            )
        self._wait_ok()
        return self

    def _start_node(self) -> int:
        # The cluster bus gets its own free port (the default, port + 10000, may be taken or
        # past 65535 for an ephemeral port).
        port, bus_port = free_port(), free_port()
        self.bus_ports[port] = bus_port
        node_dir = self.dir / str(port)
        node_dir.mkdir()
        log = open(node_dir / "redis.log", "wb")  # noqa: SIM115 - lives as long as the process
        self.nodes[port] = subprocess.Popen(
            [
                self.binary, "--port", str(port), "--bind", HOST, "--dir", str(node_dir),
                "--cluster-enabled", "yes", "--cluster-port", str(bus_port),
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                "--protected-mode", "no",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if _client(port).ping():
                    return port
            except redis.ConnectionError:
                time.sleep(0.05)
        raise ClusterError(f"cluster node on port {port} did not start")

    def _wait_ok(self, timeout_s: float = 30.0) -> None:
        """Until every node says cluster_state:ok and knows every other node."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ready = True
            for port in self.nodes:
                info = _client(port).execute_command("CLUSTER INFO")  # type: ignore[no-untyped-call]
                state, known = info.get("cluster_state"), info.get("cluster_known_nodes")
                if _text(state) != "ok" or int(known or 0) != len(self.nodes):
                    ready = False
            if ready:
                return
            time.sleep(0.1)
        raise ClusterError(f"the cluster was not ok within {timeout_s} s")

    def processes(self) -> list[subprocess.Popen[bytes]]:
        return list(self.nodes.values())


def _client(port: int) -> redis.Redis:
    return redis.Redis(host=HOST, port=port, socket_timeout=5)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
