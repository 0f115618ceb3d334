"""A worker's counters: plain attributes always, Prometheus export when asked for.

The counters are cheap Python ints the hot path bumps; ``snapshot()`` feeds the heartbeat
(and so ``chatq status``). With ``--metrics-port`` and prometheus-client installed, a
collector reads the same numbers at scrape time, so the hot path never touches Prometheus.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

LATENCY_BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000)


class Metrics:
    def __init__(self, worker: str, model: str) -> None:
        self.worker = worker
        self.model = model
        self.pulled = 0  # entries read from the lanes
        self.claimed = 0  # entries taken over from dead workers
        self.admitted = 0  # requests handed to the engine
        self.completed = 0  # ``done`` results
        self.tokens_generated = 0
        self.requeued = 0  # handed back at shutdown
        self.dead_lettered = 0
        self.errors: Counter[str] = Counter()  # ``error`` results by code
        self._latency_counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
        self._latency_sum_ms = 0.0

    def count_error(self, code: str) -> None:
        self.errors[code] += 1

    def observe_latency_ms(self, total_ms: float) -> None:
        self._latency_counts[bisect.bisect_left(LATENCY_BUCKETS_MS, total_ms)] += 1
        self._latency_sum_ms += total_ms

    def snapshot(self) -> dict[str, Any]:
        return {
            "pulled": self.pulled,
            "claimed": self.claimed,
            "admitted": self.admitted,
            "completed": self.completed,
            "tokens_generated": self.tokens_generated,
            "requeued": self.requeued,
            "dead_lettered": self.dead_lettered,
            "errors": dict(self.errors),
        }

    def serve(self, port: int) -> bool:
        """Expose ``/metrics`` on ``port``; False if prometheus-client is not installed."""
        try:
            from prometheus_client import REGISTRY, start_http_server
        except ImportError:
            log.warning("prometheus-client is not installed; --metrics-port ignored")
            return False
        REGISTRY.register(_Collector(self))  # type: ignore[arg-type]
        start_http_server(port)
        return True


class _Collector:
    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        labels = ["worker", "model"]
        values = [self.m.worker, self.m.model]
        for name in (
            "pulled",
            "claimed",
            "admitted",
            "completed",
            "tokens_generated",
            "requeued",
            "dead_lettered",
        ):
            fam = CounterMetricFamily(f"chatq_worker_{name}", f"chatq worker {name}", labels=labels)
            fam.add_metric(values, getattr(self.m, name))
            yield fam
        errs = CounterMetricFamily(
            "chatq_worker_errors", "error results by code", labels=[*labels, "code"]
        )
        for code, n in self.m.errors.items():
            errs.add_metric([*values, code], n)
        yield errs
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(LATENCY_BUCKETS_MS, self.m._latency_counts, strict=False):
            running += n
            buckets.append((str(bound), running))
        buckets.append(("+Inf", running + self.m._latency_counts[-1]))
        hist = HistogramMetricFamily("chatq_request_total_ms", "enqueue → done, ms", labels=labels)
        hist.add_metric(values, buckets, self.m._latency_sum_ms)
        yield hist
