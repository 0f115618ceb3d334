"""Every metric name chatq exports (series names included), from the real collectors."""

from __future__ import annotations

import re
from typing import Any

from gpu_engine.outputs import EngineCapacity
from workers.exporter import queue_families
from workers.gpu_metrics import GpuReading, gpu_families
from workers.metrics import Metrics, WorkerCollector
from workers.status import LaneStatus, ModelStatus

METRIC_RE = re.compile(r"\b(chatq_[a-z0-9_]+)\b")
RECORDED_RE = re.compile(r"\b([a-z_]+:chatq_[a-z0-9_]+:[a-z0-9_]+)\b")


def _families() -> list[Any]:
    cap = EngineCapacity(10, 20, 0, 1, 0, 4)
    gpu = GpuReading(0, "GPU-x", "X", 0.1, 0.1, 1, 2, 50.0, 100.0, 1e9, {"hw_slowdown": False})
    model = ModelStatus("m", (LaneStatus("high", 1, 0),), 10, 1, 5.0, 0, ())
    return [
        *WorkerCollector(Metrics("w", "m"), capacity=lambda: cap).collect(),
        *gpu_families("w", [gpu]),
        *queue_families([model], True),
    ]


def exported_names() -> set[str]:
    """Family names and the series names Prometheus stores (``_total``, ``_bucket``...)."""
    names: set[str] = set()
    for fam in _families():
        names.add(fam.name)
        names.update(s.name for s in fam.samples)
    return names


def used_names(text: str) -> set[str]:
    """chatq metric names a PromQL text (or a whole config file) refers to."""
    stripped = RECORDED_RE.sub(" ", text)  # model:chatq_x:rate5m names a recording rule
    return set(METRIC_RE.findall(stripped))


def recorded_names(text: str) -> set[str]:
    """Recording-rule names (``level:metric:operations``) a text refers to."""
    return set(RECORDED_RE.findall(text))
