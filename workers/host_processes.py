"""A worker's other host processes (``--host-processes N``), as host 0 sees them.

Host 0 starts the engine process with a pair of pipes per host, then hosts 1..N-1 as
spawned processes (``workers.worker.host_main``), each a Worker of its own attached to the
same engine. They start pulling together: each host sets its ``started`` event once set up,
host 0 waits for all of them and then sets the shared ``go``. A stop reaches them all (host
0 forwards SIGTERM); host 0 stops the engine only after they have left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from workers.engine_process import HostChannel
from workers.errors import WorkerError
from workers.settings import WorkerSettings
from workers.telemetry import WorkerTelemetry

log = logging.getLogger(__name__)

HOST_START_TIMEOUT_S = 300.0
HOST_EXIT_MARGIN_S = 15.0  # past the grace period, before host 0 kills a host that hangs
POLL_S = 0.01


class HostProcesses:
    """Hosts 1..N-1 of this worker: start them, let them go together, stop and join them."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.procs: list[Any] = []
        self.started: list[Any] = []  # each host's ``started`` event
        self.go: Any = None

    def start(
        self, channels: list[HostChannel], target: Callable[..., None], telemetry: WorkerTelemetry
    ) -> None:
        """Spawn one process per channel running ``target(settings, channel, started, go,
        shared metrics, log level)``; each publishes its metrics into an array of host 0's
        ``telemetry``."""
        ctx = mp.get_context("spawn")
        self.go = ctx.Event()
        for ch in channels:
            host = self.settings.with_(
                name=f"{self.settings.name}.{ch.host}",
                served_model_name=self.settings.model_name,
                metrics_port=None,
            )
            flag = ctx.Event()
            shared = telemetry.peer_array(ctx, host.name)
            proc = ctx.Process(
                target=target,
                args=(host, ch, flag, self.go, shared, logging.getLogger().getEffectiveLevel()),
                name=f"chatq-host-{ch.host}",
                daemon=True,
            )
            proc.start()
            self.procs.append(proc)
            self.started.append(flag)

    async def all_set_up(self, stopping: asyncio.Event) -> None:
        """Wait until every host is set up, then let all of them go (one that exits first
        is an error: the worker does not start)."""
        deadline = time.monotonic() + HOST_START_TIMEOUT_S
        while not all(flag.is_set() for flag in self.started):
            for proc in self.procs:
                if not proc.is_alive():
                    raise WorkerError(f"host process {proc.name} exited ({proc.exitcode}) "
                                      "while starting; see its log above")  # fmt: skip
            if time.monotonic() > deadline:
                raise WorkerError(f"host processes not set up after {HOST_START_TIMEOUT_S} s")
            if stopping.is_set():
                return
            await asyncio.sleep(POLL_S)
        self.go.set()

    def signal_stop(self) -> None:
        """Pass a stop on to the hosts (they drain on their own)."""
        for proc in self.procs:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    async def join(self, name: str) -> None:
        """Wait for the hosts to leave; kill one that hangs past the grace period."""
        if not self.procs:
            return
        self.signal_stop()
        timeout_s = self.settings.grace_period_s + HOST_EXIT_MARGIN_S

        def join() -> None:
            deadline = time.monotonic() + timeout_s
            for proc in self.procs:
                proc.join(max(0.0, deadline - time.monotonic()))

        await asyncio.get_running_loop().run_in_executor(None, join)
        for proc in self.procs:
            if proc.is_alive():
                log.error("%s: host process %s did not stop; killing it", name, proc.pid)
                proc.kill()
                proc.join(2)
            elif proc.exitcode:
                log.warning("%s: host process %s exited with %s", name, proc.pid, proc.exitcode)


async def await_go(started: Any, go: Any, stopping: asyncio.Event) -> None:
    """Host k > 0: say this host is set up, then wait for host 0's go (or a stop: the
    engine gone, a signal)."""
    started.set()
    while not go.is_set() and not stopping.is_set():
        await asyncio.sleep(POLL_S)
