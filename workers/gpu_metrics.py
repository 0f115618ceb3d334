"""GPU telemetry through NVML (``pynvml`` from nvidia-ml-py) for a worker's ``/metrics``.

Read at scrape time, for the GPUs the worker's engine runs on. Without a driver or the
library (CPU machines) the collector yields nothing and ``GpuTelemetry.open`` returns None:
skipped cleanly, never an error. Which NVML devices: the engine's ``cuda:N`` (and the
tensor-parallel group after it) counted among ``CUDA_VISIBLE_DEVICES`` when that is set
(indices or UUIDs), else NVML index N. Assumes CUDA and NVML number devices alike (set
``CUDA_DEVICE_ORDER=PCI_BUS_ID`` where they could differ).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

# NVML's clocks-event (throttle) reason bits and the label each gets.
THROTTLE_REASONS: tuple[tuple[str, str], ...] = (
    ("nvmlClocksThrottleReasonGpuIdle", "gpu_idle"),
    ("nvmlClocksThrottleReasonApplicationsClocksSetting", "applications_clocks_setting"),
    ("nvmlClocksThrottleReasonSwPowerCap", "sw_power_cap"),
    ("nvmlClocksThrottleReasonHwSlowdown", "hw_slowdown"),
    ("nvmlClocksThrottleReasonSyncBoost", "sync_boost"),
    ("nvmlClocksThrottleReasonSwThermalSlowdown", "sw_thermal_slowdown"),
    ("nvmlClocksThrottleReasonHwThermalSlowdown", "hw_thermal_slowdown"),
    ("nvmlClocksThrottleReasonHwPowerBrakeSlowdown", "hw_power_brake_slowdown"),
)


@dataclass(frozen=True)
class GpuReading:
    """One GPU at one moment, in base units."""

    index: int
    uuid: str
    name: str
    utilization_ratio: float
    memory_bandwidth_utilization_ratio: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_celsius: float | None
    power_watts: float | None
    sm_clock_hertz: float | None
    throttle_reasons: dict[str, bool]


def engine_gpu_indices(device: str, tensor_parallel_size: int, env: Mapping[str, str]) -> list[str]:
    """NVML device selectors (index or UUID strings) of an engine on ``device``; [] on CPU."""
    if device == "cpu" or device.startswith("mps"):
        return []
    first = int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0
    wanted = range(first, first + tensor_parallel_size)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return [str(i) for i in wanted]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    return [ids[i] for i in wanted if i < len(ids)]


class GpuTelemetry:
    """Reads the given NVML devices; ``open`` returns None where NVML is not available."""

    def __init__(self, nvml: Any, handles: Sequence[tuple[int, Any]]) -> None:
        self.nvml = nvml
        self.handles = list(handles)

    @classmethod
    def open(cls, selectors: Sequence[str]) -> GpuTelemetry | None:
        if not selectors:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as err:  # no library or no driver: a CPU machine
            log.info("GPU metrics off: NVML unavailable (%s)", err)
            return None
        handles: list[tuple[int, Any]] = []
        for sel in selectors:
            try:
                if sel.isdigit():
                    h = pynvml.nvmlDeviceGetHandleByIndex(int(sel))
                else:
                    h = pynvml.nvmlDeviceGetHandleByUUID(sel)
                handles.append((int(pynvml.nvmlDeviceGetIndex(h)), h))
            except pynvml.NVMLError as err:
                log.warning("GPU metrics: no NVML device %r (%s)", sel, err)
        return cls(pynvml, handles) if handles else None

    def read(self) -> list[GpuReading]:
        return [self._read_one(index, h) for index, h in self.handles]

    def _read_one(self, index: int, h: Any) -> GpuReading:
        nvml = self.nvml
        util = nvml.nvmlDeviceGetUtilizationRates(h)
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        name = nvml.nvmlDeviceGetName(h)
        uuid = nvml.nvmlDeviceGetUUID(h)
        return GpuReading(
            index=index,
            uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
            name=name.decode() if isinstance(name, bytes) else str(name),
            utilization_ratio=util.gpu / 100.0,
            memory_bandwidth_utilization_ratio=util.memory / 100.0,
            memory_used_bytes=int(mem.used),
            memory_total_bytes=int(mem.total),
            temperature_celsius=self._optional(
                lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU)
            ),
            power_watts=self._optional(lambda: nvml.nvmlDeviceGetPowerUsage(h) / 1000.0),
            sm_clock_hertz=self._optional(
                lambda: nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM) * 1e6
            ),
            throttle_reasons=self._throttle(h),
        )

    def _optional(self, read: Any) -> float | None:
        """A reading some GPUs do not support (NVML_ERROR_NOT_SUPPORTED): None."""
        try:
            return float(read())
        except self.nvml.NVMLError:
            return None

    def _throttle(self, h: Any) -> dict[str, bool]:
        try:
            bits = int(self.nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h))
        except self.nvml.NVMLError:
            return {}
        out: dict[str, bool] = {}
        for const, label in THROTTLE_REASONS:
            mask = getattr(self.nvml, const, None)
            if mask is not None:
                out[label] = bool(bits & int(mask))
        return out


class GpuCollector:
    """Prometheus families for the worker's GPUs (labels: worker, gpu index, uuid, name)."""

    def __init__(self, worker: str, telemetry: GpuTelemetry | None) -> None:
        self.worker = worker
        self.telemetry = telemetry

    def collect(self) -> Iterator[Any]:
        if self.telemetry is None:
            return
        try:
            readings = self.telemetry.read()
        except Exception as err:  # a GPU that fell off the bus must not break /metrics
            log.warning("GPU metrics: NVML read failed (%s)", err)
            return
        yield from gpu_families(self.worker, readings)


GAUGES: tuple[tuple[str, str, str], ...] = (
    ("utilization_ratio", "chatq_gpu_utilization_ratio",
     "Share of the last sample period a kernel ran on the GPU (0..1)."),
    ("memory_bandwidth_utilization_ratio", "chatq_gpu_memory_bandwidth_utilization_ratio",
     "Share of the last sample period device memory was read or written (0..1)."),
    ("memory_used_bytes", "chatq_gpu_memory_used_bytes", "GPU memory in use."),
    ("memory_total_bytes", "chatq_gpu_memory_total_bytes", "GPU memory in all."),
    ("temperature_celsius", "chatq_gpu_temperature_celsius", "GPU core temperature."),
    ("power_watts", "chatq_gpu_power_watts", "GPU power draw."),
    ("sm_clock_hertz", "chatq_gpu_sm_clock_hertz", "SM clock."),
)  # fmt: skip


def gpu_families(worker: str, readings: Sequence[GpuReading]) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    labels = ["worker", "gpu", "uuid", "name"]
    for attr, name, doc in GAUGES:
        fam = GaugeMetricFamily(name, doc, labels=labels)
        for r in readings:
            value = getattr(r, attr)
            if value is not None:
                fam.add_metric([worker, str(r.index), r.uuid, r.name], value)
        yield fam
    throttle = GaugeMetricFamily(
        "chatq_gpu_throttled", "1 while NVML reports this clock throttle reason.",
        labels=[*labels, "reason"],
    )  # fmt: skip
    for r in readings:
        for reason, on in r.throttle_reasons.items():
            throttle.add_metric([worker, str(r.index), r.uuid, r.name, reason], 1.0 if on else 0.0)
    yield throttle
