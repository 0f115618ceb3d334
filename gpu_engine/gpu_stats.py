"""GPU memory and utilisation through NVML (``pynvml`` from nvidia-ml-py), for reports.

Imported lazily and optional: without NVML (CPU machines) every reading is empty.
"""

from __future__ import annotations

import threading
import time
from typing import Any


def _nvml() -> Any | None:
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no driver or no library: no readings
        return None


def gpu_snapshot(index: int = 0) -> dict[str, Any]:
    """Name, driver, memory used/total (MiB), utilisation (%), clocks (MHz), power (W)."""
    nvml = _nvml()
    if nvml is None:
        return {}
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = nvml.nvmlDeviceGetMemoryInfo(h)
    util = nvml.nvmlDeviceGetUtilizationRates(h)
    name = nvml.nvmlDeviceGetName(h)
    driver = nvml.nvmlSystemGetDriverVersion()
    out: dict[str, Any] = {
        "name": name.decode() if isinstance(name, bytes) else name,
        "driver": driver.decode() if isinstance(driver, bytes) else driver,
        "memory_used_mib": mem.used // 2**20,
        "memory_total_mib": mem.total // 2**20,
        "gpu_util_pct": util.gpu,
        "mem_util_pct": util.memory,
    }
    try:
        out["sm_clock_mhz"] = nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_SM)
        out["mem_clock_mhz"] = nvml.nvmlDeviceGetClockInfo(h, nvml.NVML_CLOCK_MEM)
        out["power_w"] = nvml.nvmlDeviceGetPowerUsage(h) / 1000.0
    except Exception:  # optional fields
        pass
    return out


class UtilizationSampler:
    """Polls NVML in a background thread; ``summary()`` gives mean utilisation and peak
    memory over the sampled window. Use as a context manager around the measured region."""

    def __init__(self, index: int = 0, period_s: float = 0.1) -> None:
        self.index, self.period_s = index, period_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> UtilizationSampler:
        if _nvml() is not None:
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.samples.append(gpu_snapshot(self.index))
            time.sleep(self.period_s)

    def summary(self) -> dict[str, float]:
        if not self.samples:
            return {}
        util = [s["gpu_util_pct"] for s in self.samples]
        return {
            "gpu_util_mean_pct": sum(util) / len(util),
            "memory_peak_mib": float(max(s["memory_used_mib"] for s in self.samples)),
            "samples": float(len(self.samples)),
        }
