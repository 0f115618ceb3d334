"""``chatq exporter``: the queue's metrics, per model and lane, read from Redis alone.

Workers export what they do; the queue itself (queued and pending entries per lane,
backlog in tokens and in seconds, dead letters, live workers) belongs to no worker, and must
be visible when no worker runs: backlog seconds is the autoscaling signal, and a scaler
that scales from zero cannot read it from the workers it has not started yet. One exporter
per Redis is enough (its numbers are the same whoever reads them).

Backlog seconds = backlog tokens ÷ the drain rate the workers measure (an EWMA of finalized
cost tokens per second in the model's backlog hash): how long the queue would take to
drain at the current pace. With a backlog but no measured rate yet, the sample is left out
(no number would be honest); scale from zero on queued requests instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import Any

from redis.exceptions import RedisError

from producer.connection import connect
from producer.contract.keys import Keys
from workers.metrics_server import MetricsServer, Probe
from workers.status import ModelStatus, status_report

log = logging.getLogger(__name__)

STALE_POLLS = 3  # /ready fails after this many poll intervals without a successful read


class QueueExporter:
    """Polls Redis every ``interval_s`` (one loop) and serves the latest numbers."""

    def __init__(
        self, redis_url: str, prefix: str = "chatq", interval_s: float = 2.0, partitions: int = 1
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.redis_url = redis_url
        self.keys = Keys(prefix, partitions)
        self.interval_s = interval_s
        self.report: list[ModelStatus] = []
        self.redis_up = False
        self.last_ok_s: float | None = None
        self.probe = Probe()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, port: int | None = None, host: str = "0.0.0.0") -> int:
        """Poll until stopped; serve ``/metrics`` on ``port`` meanwhile (None: no port)."""
        server: MetricsServer | None = None
        if port is not None:
            from prometheus_client import CollectorRegistry

            registry = CollectorRegistry(auto_describe=False)
            registry.register(self)  # type: ignore[arg-type]
            server = MetricsServer(registry, self.probe.stalled, self.not_ready)
            port = server.start(port, host)
            log.info("chatq exporter: /metrics on port %d, polling every %s s", port,
                     self.interval_s)  # fmt: skip
        redis = connect(self.redis_url)
        try:
            while not self._stop.is_set():
                await self.poll(redis)
                self.probe.tick()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.interval_s)
        finally:
            await redis.aclose()
            if server is not None:
                server.stop()
        return 0

    async def poll(self, redis: Any) -> None:
        try:
            self.report = await status_report(redis, self.keys)
        except (RedisError, OSError) as err:
            if self.redis_up:
                log.warning("chatq exporter: reading Redis failed (%s)", err)
            self.redis_up = False
            return
        self.redis_up = True
        self.last_ok_s = time.monotonic()

    def not_ready(self) -> str | None:
        if self.last_ok_s is None:
            return "Redis not read yet"
        age_s = time.monotonic() - self.last_ok_s
        if age_s > STALE_POLLS * self.interval_s + 5:
            return f"Redis last read {age_s:.0f} s ago"
        return None

    def collect(self) -> Iterator[Any]:
        """The families (prometheus-client collector protocol)."""
        yield from queue_families(self.report, self.redis_up)


def backlog_seconds(m: ModelStatus) -> float | None:
    """Backlog ÷ drain rate; 0 without a backlog; None with a backlog but no rate yet."""
    if m.backlog_tokens <= 0:
        return 0.0
    if m.drain_rate_tps <= 0:
        return None
    return m.backlog_tokens / m.drain_rate_tps


def queue_families(report: list[ModelStatus], redis_up: bool) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    up = GaugeMetricFamily("chatq_exporter_redis_up", "1 if the last read of Redis worked.")
    up.add_metric([], 1.0 if redis_up else 0.0)
    yield up
    queued = GaugeMetricFamily("chatq_queue_queued_requests",
                               "Entries in the lane not yet delivered to a worker.",
                               labels=["model", "lane"])  # fmt: skip
    pending = GaugeMetricFamily("chatq_queue_pending_requests",
                                "Entries delivered to a worker and not yet acknowledged.",
                                labels=["model", "lane"])  # fmt: skip
    for m in report:
        for lane in m.lanes:
            queued.add_metric([m.model, lane.priority], lane.queued)
            pending.add_metric([m.model, lane.priority], lane.pending)
    yield queued
    yield pending
    per_model: tuple[tuple[str, str, Any], ...] = (
        ("chatq_queue_backlog_tokens", "Cost tokens of queued and running requests.",
         lambda m: m.backlog_tokens),
        ("chatq_queue_backlog_requests", "Queued and running requests.",
         lambda m: m.backlog_requests),
        ("chatq_queue_drain_tokens_per_second", "Measured drain rate (EWMA of finalized "
         "cost tokens per second; 0 until measured).", lambda m: m.drain_rate_tps),
        ("chatq_queue_backlog_seconds", "Backlog tokens / drain rate: time to drain at the "
         "current pace (the autoscaling signal).", backlog_seconds),
        ("chatq_queue_live_workers", "Workers heartbeating for the model.",
         lambda m: len(m.workers)),
    )  # fmt: skip
    for name, doc, value in per_model:
        fam = GaugeMetricFamily(name, doc, labels=["model"])
        for m in report:
            v = value(m)
            if v is not None:
                fam.add_metric([m.model], v)
        yield fam
    dead = CounterMetricFamily("chatq_queue_dead_letters_total",
                               "Requests dead-lettered (delivered too often, or unreadable).",
                               labels=["model"])  # fmt: skip
    for m in report:
        dead.add_metric([m.model], m.dead_letters)
    yield dead
