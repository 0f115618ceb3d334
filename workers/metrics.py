"""A worker's metrics: plain numbers the hot path bumps, Prometheus families built at scrape.

The hot path only adds to ints and histogram buckets; ``snapshot()`` feeds the heartbeat (and
so ``chatq status`` / ``chatq top``), and :class:`WorkerCollector` turns the same numbers into
Prometheus families when ``/metrics`` is scraped (``workers.metrics_server``). Names follow
Prometheus conventions: ``chatq_`` prefix, base units (seconds, ratios 0..1), ``_total`` on
counters.

With ``--host-processes N`` every host process counts its own requests; hosts 1..N-1 copy
their numbers into a shared array (``to_vector`` / ``from_vector``, the one encoding of that
boundary) each heartbeat, and host 0, the one serving ``/metrics``, exports them all, each
under its own consumer name.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from gpu_engine.outputs import EngineCapacity
from producer.contract.codes import ErrorCode

# Request latencies (queue wait, time to first token, end to end), seconds.
LATENCY_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
# Mean gap between one request's output tokens, seconds.
INTER_TOKEN_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip

FINISH_REASONS = ("stop", "length", "deadline")
# Every final a worker writes, as (outcome, reason): a fixed list so host processes can share
# their counts as a flat vector; an unexpected reason counts under "other", never vanishes.
OUTCOMES: tuple[tuple[str, str], ...] = (
    *(("done", r) for r in FINISH_REASONS),
    ("done", "other"),
    *(("error", c.value) for c in ErrorCode),
    ("error", "other"),
)
_OUTCOME_INDEX = {o: i for i, o in enumerate(OUTCOMES)}

# Plain counters: (attribute, metric name, help).
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("pulled", "chatq_worker_entries_pulled_total", "Request entries read from the lanes."),
    ("claimed", "chatq_worker_entries_claimed_total", "Entries taken over from dead workers."),
    ("admitted", "chatq_worker_requests_admitted_total", "Requests handed to the engine."),
    ("requeued", "chatq_worker_entries_requeued_total", "Entries handed back at shutdown."),
    ("reconciled", "chatq_worker_entries_reconciled_total",
     "Entries Redis said this worker held while it did not, taken up again."),
    ("resumed", "chatq_worker_requests_resumed_total",
     "Requests continued from the chunks of a worker that died mid-answer."),
    ("fenced", "chatq_worker_requests_fenced_total",
     "Requests dropped because another worker took their entry over."),
    ("dead_lettered", "chatq_worker_dead_letters_total", "Entries this worker dead-lettered."),
    ("prompt_tokens", "chatq_prompt_tokens_total", "Prompt tokens of finished requests."),
    ("cached_tokens", "chatq_prompt_cached_tokens_total",
     "Prompt tokens served from the prefix cache (finished requests)."),
    ("tokens_generated", "chatq_generation_tokens_total", "Output tokens generated."),
    ("shared_prompt_tokens", "chatq_prompt_shared_tokens_total",
     "Prompt tokens the further answers of n > 1 requests took from the first one's KV "
     "blocks (prefix cache) instead of computing them."),
)  # fmt: skip


class Histogram:
    """Bucket counts (not cumulative) and a sum; ``observe`` is a bisect and two adds."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, count)`` pairs as Prometheus wants them."""
        out: list[tuple[str, float]] = []
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=False):
            running += n
            out.append((repr(float(bound)), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


# Histograms: (attribute, metric name, help, buckets).
HISTOGRAMS: tuple[tuple[str, str, str, tuple[float, ...]], ...] = (
    ("queue_wait", "chatq_request_queue_wait_seconds",
     "From enqueue until the engine got the request.", LATENCY_BUCKETS_S),
    ("ttft", "chatq_request_time_to_first_token_seconds",
     "From enqueue until the first output token.", LATENCY_BUCKETS_S),
    ("inter_token", "chatq_request_inter_token_latency_seconds",
     "Mean gap between output tokens, one observation per request.", INTER_TOKEN_BUCKETS_S),
    ("e2e", "chatq_request_e2e_latency_seconds",
     "From enqueue until the final result.", LATENCY_BUCKETS_S),
)  # fmt: skip


class Metrics:
    """One host process's numbers (its consumer name is ``worker``)."""

    def __init__(self, worker: str, model: str) -> None:
        self.worker = worker
        self.model = model
        self.pulled = 0  # entries read from the lanes
        self.claimed = 0  # entries taken over from dead workers
        self.admitted = 0  # requests handed to the engine
        self.requeued = 0  # handed back at shutdown
        self.reconciled = 0  # pending on this worker in Redis but not held: taken up again
        self.resumed = 0  # continued from a dead worker's chunks
        self.fenced = 0  # dropped: another worker took the entry over
        self.dead_lettered = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.tokens_generated = 0
        self.shared_prompt_tokens = 0  # n > 1: prompt KV the further answers shared
        self.outcomes = [0] * len(OUTCOMES)
        self.queue_wait = Histogram(LATENCY_BUCKETS_S)
        self.ttft = Histogram(LATENCY_BUCKETS_S)
        self.inter_token = Histogram(INTER_TOKEN_BUCKETS_S)
        self.e2e = Histogram(LATENCY_BUCKETS_S)
        # per tenant (the envelope's ``tenant``; requests without one are not counted
        # here): carried by the heartbeat for ``chatq status``, not exported per host
        self.tenant_completed: Counter[str] = Counter()
        self.tenant_errors: Counter[str] = Counter()

    # --- the hot path ---

    def count_error(self, code: str) -> None:
        index = _OUTCOME_INDEX.get(("error", code))
        self.outcomes[index if index is not None else _OUTCOME_INDEX["error", "other"]] += 1

    def observe_done(
        self,
        reason: str,
        *,
        prompt_tokens: int,
        cached_tokens: int,
        completion_tokens: int,
        queue_wait_s: float,
        ttft_s: float,
        e2e_s: float,
    ) -> None:
        """One ``done`` result: its outcome, tokens and latencies."""
        index = _OUTCOME_INDEX.get(("done", reason))
        self.outcomes[index if index is not None else _OUTCOME_INDEX["done", "other"]] += 1
        self.prompt_tokens += prompt_tokens
        self.cached_tokens += cached_tokens
        self.queue_wait.observe(queue_wait_s)
        self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        if completion_tokens > 1:
            self.inter_token.observe(max(0.0, e2e_s - ttft_s) / (completion_tokens - 1))

    # --- readers ---

    @property
    def completed(self) -> int:
        """``done`` results."""
        return sum(n for (outcome, _), n in zip(OUTCOMES, self.outcomes, strict=True)
                   if outcome == "done")  # fmt: skip

    @property
    def errors(self) -> dict[str, int]:
        """``error`` results by code (codes seen only)."""
        pairs = zip(OUTCOMES, self.outcomes, strict=True)
        return {reason: n for (outcome, reason), n in pairs if outcome == "error" and n}

    def snapshot(self) -> dict[str, Any]:
        """What the heartbeat carries (``chatq status`` / ``chatq top`` read it)."""
        out: dict[str, Any] = {attr: getattr(self, attr) for attr, _, _ in COUNTERS}
        out["completed"] = self.completed
        out["errors"] = self.errors
        out["tenants"] = {
            t: {"completed": self.tenant_completed[t], "errors": self.tenant_errors[t]}
            for t in self.tenant_completed.keys() | self.tenant_errors.keys()
        }
        out["ttft_buckets"] = [list(self.ttft.bounds), list(self.ttft.counts)]
        return out

    # --- the host-process boundary: one flat vector of floats ---

    @staticmethod
    def vector_size() -> int:
        hist = sum(len(b) + 2 for _, _, _, b in HISTOGRAMS)  # buckets + Inf + sum
        return len(COUNTERS) + len(OUTCOMES) + hist

    def to_vector(self) -> list[float]:
        out: list[float] = [float(getattr(self, attr)) for attr, _, _ in COUNTERS]
        out.extend(float(n) for n in self.outcomes)
        for attr, _, _, _ in HISTOGRAMS:
            h: Histogram = getattr(self, attr)
            out.extend(float(n) for n in h.counts)
            out.append(h.sum)
        return out

    @classmethod
    def from_vector(cls, worker: str, model: str, vector: Sequence[float]) -> Metrics:
        m = cls(worker, model)
        values = iter(vector)
        for attr, _, _ in COUNTERS:
            setattr(m, attr, int(next(values)))
        m.outcomes = [int(next(values)) for _ in OUTCOMES]
        for attr, _, _, _ in HISTOGRAMS:
            h: Histogram = getattr(m, attr)
            h.counts = [int(next(values)) for _ in h.counts]
            h.sum = next(values)
        return m


class WorkerCollector:
    """Prometheus families of a worker: each host process's counters and histograms (host 0's
    own plus ``peers``: callables returning the other hosts' :class:`Metrics`) and the engine's
    gauges (``capacity``, host 0 only: the hosts share one engine)."""

    def __init__(
        self,
        own: Metrics,
        peers: Sequence[Callable[[], Metrics]] = (),
        capacity: Callable[[], EngineCapacity] | None = None,
        devices: int = 1,
    ) -> None:
        self.own = own
        self.peers = list(peers)
        self.capacity = capacity
        self.devices = devices

    def collect(self) -> Iterator[Any]:
        hosts = [self.own, *(peer() for peer in self.peers)]
        yield from _host_families(hosts)
        yield from self._engine_families()

    def _engine_families(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        labels, values = ["worker", "model"], [self.own.worker, self.own.model]

        def gauge(name: str, doc: str, value: float) -> Any:
            fam = GaugeMetricFamily(name, doc, labels=labels)
            fam.add_metric(values, value)
            return fam

        yield gauge("chatq_worker_devices", "Devices the engine runs on (GPUs; 1 on CPU).",
                    self.devices)  # fmt: skip
        if self.capacity is None:
            return
        c = self.capacity()
        used = c.total_kv_tokens - c.free_kv_tokens
        yield gauge("chatq_worker_running_requests", "Sequences the engine is running.",
                    c.running_seqs)  # fmt: skip
        yield gauge("chatq_worker_waiting_requests", "Sequences waiting inside the engine.",
                    c.waiting_seqs)  # fmt: skip
        yield gauge("chatq_worker_kv_cache_tokens", "KV-cache capacity in tokens.",
                    c.total_kv_tokens)  # fmt: skip
        yield gauge("chatq_worker_kv_cache_usage_ratio", "Share of the KV cache in use (0..1).",
                    used / c.total_kv_tokens if c.total_kv_tokens else 0.0)  # fmt: skip
        pre = CounterMetricFamily("chatq_worker_preemptions_total",
                                  "Sequences the engine preempted (recomputed later).",
                                  labels=labels)  # fmt: skip
        pre.add_metric(values, c.num_preemptions)
        yield pre


def _host_families(hosts: Sequence[Metrics]) -> Iterator[Any]:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    labels = ["worker", "model"]
    for attr, name, doc in COUNTERS:
        fam = CounterMetricFamily(name, doc, labels=labels)
        for m in hosts:
            fam.add_metric([m.worker, m.model], getattr(m, attr))
        yield fam
    requests = CounterMetricFamily(
        "chatq_requests_total",
        "Final results by outcome (done, error) and reason (finish reason or error code).",
        labels=[*labels, "outcome", "reason"],
    )
    for m in hosts:
        for (outcome, reason), n in zip(OUTCOMES, m.outcomes, strict=True):
            requests.add_metric([m.worker, m.model, outcome, reason], n)
    yield requests
    for attr, name, doc, _ in HISTOGRAMS:
        hist = HistogramMetricFamily(name, doc, labels=labels)
        for m in hosts:
            h: Histogram = getattr(m, attr)
            hist.add_metric([m.worker, m.model], h.cumulative(), h.sum)
        yield hist
