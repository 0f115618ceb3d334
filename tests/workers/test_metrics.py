"""Worker metrics: families and their names, the host-process vector, the metrics port."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gpu_engine.outputs import EngineCapacity
from producer.sync_client import SyncChatClient
from tests.workers.conftest import WorkerProcess
from tests.workers.metric_conventions import convention_problems
from tests.workers.test_cli import _each_holds, _ready, _submit_long, _wait
from workers.gpu_metrics import GpuCollector, GpuReading, GpuTelemetry, gpu_families
from workers.metrics import OUTCOMES, Metrics, WorkerCollector
from workers.metrics_server import MetricsServer
from workers.redis_server import free_port


def _busy_metrics(name: str = "w1") -> Metrics:
    m = Metrics(name, "tiny")
    m.pulled, m.admitted, m.tokens_generated = 5, 4, 42
    m.count_error("cancelled")
    m.count_error("not-a-code")
    m.observe_done("stop", prompt_tokens=10, cached_tokens=8, completion_tokens=11,
                   queue_wait_s=0.002, ttft_s=0.02, e2e_s=1.02)  # fmt: skip
    m.observe_done("length", prompt_tokens=3, cached_tokens=0, completion_tokens=1,
                   queue_wait_s=0.5, ttft_s=7.0, e2e_s=7.0)  # fmt: skip
    return m


def _capacity() -> EngineCapacity:
    return EngineCapacity(1024, 4096, 0, 3, 2, 8, num_preemptions=7)


def _scrape(registry: CollectorRegistry) -> dict[str, list[tuple[dict[str, str], float]]]:
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def test_worker_families_carry_the_numbers_in_base_units() -> None:
    reg = CollectorRegistry()
    reg.register(WorkerCollector(_busy_metrics(), capacity=_capacity))  # type: ignore[arg-type]
    got = _scrape(reg)
    assert got["chatq_generation_tokens_total"] == [({"worker": "w1", "model": "tiny"}, 42.0)]
    assert got["chatq_prompt_cached_tokens_total"][0][1] == 8
    assert got["chatq_prompt_tokens_total"][0][1] == 13
    outcomes = {(lb["outcome"], lb["reason"]): v for lb, v in got["chatq_requests_total"]}
    assert outcomes["done", "stop"] == 1 and outcomes["done", "length"] == 1
    assert outcomes["error", "cancelled"] == 1 and outcomes["error", "other"] == 1
    assert len(outcomes) == len(OUTCOMES)  # every outcome exported, zero or not
    ttft = {lb["le"]: v for lb, v in got["chatq_request_time_to_first_token_seconds_bucket"]}
    assert ttft["0.01"] == 0 and ttft["0.025"] == 1 and ttft["5.0"] == 1 and ttft["+Inf"] == 2
    assert got["chatq_request_time_to_first_token_seconds_sum"][0][1] == pytest.approx(7.02)
    # one inter-token observation: (1.02 - 0.02) s over 10 gaps; none for a 1-token answer
    assert got["chatq_request_inter_token_latency_seconds_count"][0][1] == 1
    assert got["chatq_request_inter_token_latency_seconds_sum"][0][1] == pytest.approx(0.1)
    assert got["chatq_worker_kv_cache_usage_ratio"][0][1] == pytest.approx(0.75)
    assert got["chatq_worker_running_requests"][0][1] == 3
    assert got["chatq_worker_waiting_requests"][0][1] == 2
    assert got["chatq_worker_preemptions_total"][0][1] == 7


def test_metric_names_follow_prometheus_conventions() -> None:
    reading = GpuReading(0, "GPU-1", "H100", 0.5, 0.25, 1 << 30, 80 << 30, 61.0, 300.0, 1.98e9,
                         {"sw_power_cap": True, "hw_slowdown": False})  # fmt: skip
    families = [
        *WorkerCollector(_busy_metrics(), capacity=_capacity).collect(),
        *gpu_families("w1", [reading]),
    ]
    assert convention_problems(families) == []
    names = {f.name for f in families}
    assert {"chatq_gpu_utilization_ratio", "chatq_gpu_memory_bandwidth_utilization_ratio",
            "chatq_gpu_temperature_celsius", "chatq_gpu_sm_clock_hertz"} <= names  # fmt: skip


def test_convention_check_catches_bad_names() -> None:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    bad = [
        GaugeMetricFamily("chatq_latency_ms", "x"),
        GaugeMetricFamily("chatq_gpu_util_percent", "x"),
        GaugeMetricFamily("queue_depth_requests", "x"),
        GaugeMetricFamily("chatq_queue_depth", "x"),
        CounterMetricFamily("chatq_things", ""),
    ]
    problems = convention_problems(bad)
    for name in ("chatq_latency_ms", "chatq_gpu_util_percent", "queue_depth_requests",
                 "chatq_queue_depth", "chatq_things_total"):  # fmt: skip
        assert any(p.startswith(name) for p in problems), (name, problems)


def test_host_vector_round_trips_every_number() -> None:
    m = _busy_metrics("w")
    vector = m.to_vector()
    assert len(vector) == Metrics.vector_size()
    back = Metrics.from_vector("w.1", "tiny", vector)
    assert back.to_vector() == vector
    assert back.snapshot() == m.snapshot() and back.worker == "w.1"


def test_gpu_metrics_are_skipped_cleanly_without_nvml() -> None:
    """This machine has no NVIDIA driver: no telemetry, no families, no error."""
    assert GpuTelemetry.open(["0"]) is None
    assert GpuTelemetry.open([]) is None
    assert list(GpuCollector("w1", None).collect()) == []


def test_engine_gpu_indices_follow_cuda_visible_devices() -> None:
    from workers.gpu_metrics import engine_gpu_indices as idx

    assert idx("cpu", 1, {}) == []
    assert idx("cuda:1", 2, {}) == ["1", "2"]
    assert idx("cuda:0", 1, {"CUDA_VISIBLE_DEVICES": "3,5"}) == ["3"]
    assert idx("cuda:1", 1, {"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}) == ["GPU-b"]
    assert idx("auto", 1, {}) == ["0"]


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def test_metrics_server_serves_metrics_health_and_ready_over_http() -> None:
    reg = CollectorRegistry()
    reg.register(WorkerCollector(_busy_metrics()))  # type: ignore[arg-type]
    state: dict[str, str | None] = {"health": None, "ready": "engine loading"}
    server = MetricsServer(reg, lambda: state["health"], lambda: state["ready"])
    port = server.start(0, host="127.0.0.1")
    try:
        base = f"http://127.0.0.1:{port}"
        status, body = _get(f"{base}/metrics")
        assert status == 200 and "chatq_generation_tokens_total" in body
        assert _get(f"{base}/health") == (200, "ok\n")
        assert _get(f"{base}/ready") == (503, "engine loading\n")
        state["ready"] = None
        assert _get(f"{base}/ready") == (200, "ok\n")
        state["health"] = "event loop stalled for 11.0 s"
        assert _get(f"{base}/health")[0] == 503
        assert _get(f"{base}/nope")[0] == 404
    finally:
        server.stop()


def _scrape_url(url: str) -> dict[tuple[str, str], float]:
    """``(series name, worker) → value`` summed over the other labels."""
    status, text = _get(url)
    assert status == 200
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            key = (s.name, s.labels.get("worker", ""))
            out[key] = out.get(key, 0.0) + s.value
    return out


def test_every_host_process_counts_are_exported(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """``--host-processes 2``: both consumers (``wm``, ``wm.1``) hold requests at once, and
    the one /metrics port of the worker exports each host's counts: what that host answered.
    (How the 12 requests split between the hosts depends on who pulls first and on the
    shared engine's queue, so the counts are checked against the answers, not a fixed 6/6.)"""
    r = redis.Redis.from_url(redis_url)
    port = free_port()
    w = spawn_worker(redis_url, "wm", "--host-processes", "2", "--metrics-port", str(port))
    _wait(lambda: _ready(r, "wm", "wm.1"), 120, "both host processes", w)
    # /ready once serving (the hosts' first heartbeats come a moment before that)
    _wait(lambda: _get(f"http://127.0.0.1:{port}/ready")[0] == 200, 30, "/ready", w)
    with SyncChatClient(redis_url) as client:
        ids = _submit_long(client, max_tokens=200)
        _wait(lambda: _each_holds(r, "wm", "wm.1"), 60, "both hosts holding requests", w)
        results = [client.result(rid, timeout_s=120) for rid in ids]
    answered = {h: sum(res.worker == h for res in results) for h in ("wm", "wm.1")}
    assert sum(answered.values()) == 12 and all(answered.values()), answered

    def exported() -> dict[tuple[str, str], float] | None:
        got = _scrape_url(f"http://127.0.0.1:{port}/metrics")
        done = {h: got.get(("chatq_requests_total", h), 0.0) for h in ("wm", "wm.1")}
        return got if done == {h: float(n) for h, n in answered.items()} else None

    got = _wait(exported, 10, "both hosts' counts on /metrics", w)
    for host, n in answered.items():
        assert got["chatq_generation_tokens_total", host] == n * 200
        assert got["chatq_request_e2e_latency_seconds_count", host] == n
        assert got["chatq_worker_entries_pulled_total", host] >= n
    # the engine's gauges once, under host 0's name
    assert ("chatq_worker_kv_cache_usage_ratio", "wm") in got
    assert ("chatq_worker_kv_cache_usage_ratio", "wm.1") not in got


@pytest.mark.gpu
def test_gpu_telemetry_reads_the_gpu() -> None:
    """On a GPU machine: NVML readings in base units and sane ranges, families named by the
    conventions (run with ``pytest -m gpu``)."""
    telemetry = GpuTelemetry.open(["0"])
    assert telemetry is not None
    (reading,) = telemetry.read()
    assert 0.0 <= reading.utilization_ratio <= 1.0
    assert 0.0 <= reading.memory_bandwidth_utilization_ratio <= 1.0
    assert 0 < reading.memory_used_bytes <= reading.memory_total_bytes
    assert reading.temperature_celsius is None or 0 < reading.temperature_celsius < 120
    assert reading.sm_clock_hertz is None or reading.sm_clock_hertz > 1e8
    assert reading.throttle_reasons and all(isinstance(v, bool) for v in
                                            reading.throttle_reasons.values())  # fmt: skip
    families = list(GpuCollector("w", telemetry).collect())
    assert convention_problems(families) == []
    assert {f.name for f in families if f.samples} >= {"chatq_gpu_utilization_ratio",
                                                       "chatq_gpu_memory_used_bytes"}  # fmt: skip
