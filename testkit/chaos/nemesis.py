"""The nemesis: a schedule of faults applied to a :class:`~testkit.chaos.cluster.ChaosCluster`
one after another, each for a while, then healed.

Kinds: ``kill_worker`` (SIGKILL to a worker's processes; started again after the fault),
``kill_host`` (SIGKILL to one of a worker's other host processes, which ends the worker;
started again after), ``pause_worker`` (SIGSTOP for the duration, then SIGCONT: a "GC
pause" longer than the heartbeat TTL), ``kill_redis`` (SIGKILL to Redis, restarted after the
duration from what its fsync policy kept), ``client_pause`` (``CLIENT PAUSE`` for the
duration), ``net_delay`` (the worker's proxy adds 200 ms each way) and ``net_partition``
(the worker's proxy passes nothing; on heal its connections are cut). ``redis_rollback``
is the crash of a Redis host under ``appendfsync everysec`` or a failover to a lagging
replica: a snapshot when the fault begins, then SIGKILL and a restart from that snapshot
when it ends, so every write in between is lost (Redis runs without AOF from then on).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass

from testkit.chaos.cluster import ChaosCluster, ChaosWorker

KINDS = (
    "kill_worker", "kill_host", "pause_worker", "kill_redis", "client_pause", "net_delay",
    "net_partition",
)  # fmt: skip
ROLLBACK = "redis_rollback"  # not in KINDS: it turns the AOF off for the rest of the run
NET_DELAY_S = 0.2


@dataclass
class Fault:
    """One fault: what, on which worker, when (seconds after the run starts), how long."""

    kind: str
    target: str
    at_s: float
    duration_s: float
    # Monotonic, just before it is applied: what was acknowledged earlier happened before
    # the fault (a rollback's snapshot holds it). ``began_s`` is noted only once applying it
    # has returned, which under load can be well after it took effect, so a write
    # acknowledged before ``began_s`` may still be one the fault lost.
    applying_s: float | None = None
    began_s: float | None = None  # monotonic, once applied
    ended_s: float | None = None  # monotonic, once healed

    @property
    def name(self) -> str:
        where = "" if self.kind in ("kill_redis", "client_pause", ROLLBACK) else f" {self.target}"
        return f"{self.kind}{where} {self.duration_s:g} s @ {self.at_s:g} s"


def schedule(
    kinds: tuple[str, ...], workers: list[str], *, start_s: float, gap_s: float, seed: int = 0
) -> list[Fault]:
    """One fault of each kind, in a shuffled order, ``gap_s`` apart, on random workers."""
    rng = random.Random(seed)
    order = list(kinds)
    rng.shuffle(order)
    faults, at_s = [], start_s
    for kind in order:
        duration_s = {"pause_worker": 4.0, "kill_redis": 1.0, "client_pause": 4.0}.get(kind, 3.0)
        faults.append(Fault(kind, rng.choice(workers), at_s, duration_s))
        at_s += duration_s + gap_s
    return faults


class Nemesis:
    """Applies a schedule of faults to a cluster (see the module doc)."""

    def __init__(self, cluster: ChaosCluster) -> None:
        self.cluster = cluster

    async def run(self, faults: list[Fault]) -> None:
        t0 = time.monotonic()
        for fault in faults:
            await asyncio.sleep(max(0.0, t0 + fault.at_s - time.monotonic()))
            fault.applying_s = time.monotonic()
            await asyncio.to_thread(self._begin, fault)
            fault.began_s = time.monotonic()
            await asyncio.sleep(fault.duration_s)
            await asyncio.to_thread(self._end, fault)
            fault.ended_s = time.monotonic()

    def _worker(self, fault: Fault) -> ChaosWorker:
        return self.cluster.workers[fault.target]

    def _begin(self, fault: Fault) -> None:
        if fault.kind == "kill_worker":
            self._worker(fault).kill9()
        elif fault.kind == "kill_host":
            os.kill(self._host_pid(fault.target), signal.SIGKILL)
        elif fault.kind == "pause_worker":
            self._worker(fault).signal_all(signal.SIGSTOP)
        elif fault.kind == "kill_redis":
            self.cluster.redis_server.kill()
        elif fault.kind == "client_pause":
            r = self.cluster.client()
            try:
                r.execute_command("CLIENT", "PAUSE", int(fault.duration_s * 1000), "ALL")
            finally:
                r.close()
        elif fault.kind == ROLLBACK:
            r = self.cluster.client()
            try:
                r.config_set("appendonly", "no")  # a restart loads the snapshot, not the AOF
                r.save()
            finally:
                r.close()
        elif fault.kind == "net_delay":
            self._worker(fault).proxy.delay_s = NET_DELAY_S
        elif fault.kind == "net_partition":
            self._worker(fault).proxy.partition()
        else:
            raise ValueError(f"unknown fault kind {fault.kind!r}")

    def _host_pid(self, name: str, timeout_s: float = 180.0) -> int:
        """The pid of worker ``name``'s host process 1, once it beats (a worker started
        again after an earlier fault may still be loading)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid = self.cluster.host_pid(name, 1)
            if pid is not None:
                return pid
            time.sleep(0.2)
        raise RuntimeError(f"{name} has no host process 1 (host_processes >= 2 needed)")

    def _end(self, fault: Fault) -> None:
        if fault.kind in ("kill_worker", "kill_host"):
            proc = self._worker(fault).proc
            if fault.kind == "kill_host" and proc is not None:
                proc.wait(30)  # the other processes end with it
            self.cluster.respawn(fault.target)
        elif fault.kind == "pause_worker":
            self._worker(fault).signal_all(signal.SIGCONT)
        elif fault.kind == "kill_redis":
            self.cluster.redis_server.restart()
        elif fault.kind == ROLLBACK:
            self.cluster.redis_server.appendfsync = None
            self.cluster.redis_server.restart()
        elif fault.kind == "net_delay":
            self._worker(fault).proxy.delay_s = 0.0
        elif fault.kind == "net_partition":
            self._worker(fault).proxy.heal()
