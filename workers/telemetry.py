"""What a worker shows its operators, wired in one place.

- the metrics port (``--metrics-port``): ``/metrics`` with every host process's counters and
  histograms, the engine's gauges and the GPUs' readings; ``/health`` (the loop turns);
  ``/ready`` (engine loaded and the last heartbeat written within its TTL);
- hosts 1..N-1 of a worker publish their :class:`Metrics` into a shared array each
  heartbeat, which host 0 reads at scrape time (every host's counts are exported);
- GPU readings for the heartbeat (``chatq top``), sampled at most every ``GPU_BEAT_S``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

from gpu_engine.outputs import EngineCapacity
from workers.gpu_metrics import GpuCollector, GpuTelemetry, engine_gpu_indices
from workers.metrics import Metrics, WorkerCollector
from workers.metrics_server import MetricsServer, Probe
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

GPU_BEAT_S = 2.0  # GPU readings in the heartbeat are at most this old


class WorkerTelemetry:
    """A worker host process's metrics port, shared host metrics and GPU readings."""

    def __init__(self, settings: WorkerSettings, metrics: Metrics, *, shared: Any = None) -> None:
        """``shared``: this is host k > 0 of a worker; publish ``metrics`` into this array."""
        self.settings = settings
        self.metrics = metrics
        self.probe = Probe()
        self._shared = shared
        self._peers: list[tuple[str, Any]] = []  # host 0: (consumer name, shared array)
        self._server: MetricsServer | None = None
        self._serving = False  # the worker reached its serving state
        self._draining = False  # it has begun to stop
        self._last_beat_s: float | None = None
        self._gpu: GpuTelemetry | None = None
        self._gpu_beat: list[dict[str, Any]] = []
        self._gpu_beat_at = 0.0
        if shared is None:
            selectors = engine_gpu_indices(
                settings.device, settings.tensor_parallel_size, os.environ
            )
            self._gpu = GpuTelemetry.open(selectors)

    # --- host processes ---

    def peer_array(self, ctx: Any, name: str) -> Any:
        """Host 0: a shared array for host ``name`` (pass it to that host's process)."""
        arr = ctx.Array("d", Metrics.vector_size(), lock=True)
        self._peers.append((name, arr))
        return arr

    def _peer_reader(self, name: str, arr: Any) -> Callable[[], Metrics]:
        model = self.metrics.model

        def read() -> Metrics:
            with arr.get_lock():
                vector = list(arr)
            return Metrics.from_vector(name, model, vector)

        return read

    def publish(self) -> None:
        """Host k > 0: copy this host's numbers where host 0 reads them."""
        if self._shared is not None:
            vector = self.metrics.to_vector()
            with self._shared.get_lock():
                self._shared[:] = vector

    # --- the port ---

    def serve(self, port: int, capacity: Callable[[], EngineCapacity]) -> int:
        """Host 0: start ``/metrics``, ``/health``, ``/ready`` on ``port``; the bound port."""
        from prometheus_client import CollectorRegistry

        registry = CollectorRegistry(auto_describe=False)
        devices = len(self._gpu.handles) if self._gpu is not None else 1
        registry.register(  # type: ignore[arg-type]
            WorkerCollector(
                self.metrics,
                [self._peer_reader(name, arr) for name, arr in self._peers],
                capacity=capacity,
                devices=max(devices, self.settings.tensor_parallel_size),
            )
        )
        registry.register(GpuCollector(self.metrics.worker, self._gpu))  # type: ignore[arg-type]
        self._server = MetricsServer(registry, self.probe.stalled, self.not_ready)
        bound = self._server.start(port)
        log.info("%s: /metrics, /health, /ready on port %d", self.metrics.worker, bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    # --- state the checks read ---

    def serving(self) -> None:
        self._serving = True

    def draining(self) -> None:
        self._draining = True

    def beat_ok(self) -> None:
        """A heartbeat was written: the loop turns and peers see this worker alive."""
        self._last_beat_s = time.monotonic()
        self.probe.tick()
        self.publish()

    def not_ready(self) -> str | None:
        if self._draining:
            return "stopping"
        if not self._serving:
            return "starting: engine loading or hosts setting up"
        if self._last_beat_s is None:
            return "no heartbeat written yet"
        age_s = time.monotonic() - self._last_beat_s
        ttl_s = self.settings.heartbeat_interval_s * 4
        if age_s > ttl_s:
            return f"last heartbeat written {age_s:.1f} s ago (Redis unreachable?)"
        return None

    def gpu_beat(self) -> list[dict[str, Any]]:
        """GPU utilisation and memory for the heartbeat (at most GPU_BEAT_S old)."""
        if self._gpu is None:
            return []
        now = time.monotonic()
        if now - self._gpu_beat_at >= GPU_BEAT_S:
            self._gpu_beat_at = now
            try:
                self._gpu_beat = [
                    {"gpu": r.index, "util": r.utilization_ratio,
                     "mem_used": r.memory_used_bytes, "mem_total": r.memory_total_bytes}
                    for r in self._gpu.read()
                ]  # fmt: skip
            except Exception as err:  # a failing read leaves the heartbeat without GPUs
                log.warning("GPU readings failed (%s)", err)
                self._gpu_beat = []
        return self._gpu_beat
