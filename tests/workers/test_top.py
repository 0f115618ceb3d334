"""``chatq top`` and the queue exporter against a live worker (real Redis, real engine)."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from producer import ChatClient
from producer.connection import connect
from producer.contract.keys import Keys
from tests.workers.conftest import MODEL, ThreadWorker
from tests.workers.metric_conventions import convention_problems
from workers.cli import main
from workers.exporter import QueueExporter
from workers.top import Top, quantile, render

USER = [{"role": "user", "content": "Where is my parcel?"}]


async def _answer(url: str, n: int) -> None:
    """Answer ``n`` chats, then wait until the worker's heartbeat counts them (it beats every
    0.5 s; the test database was flushed just before the test)."""
    async with ChatClient(url) as client:
        before = await _completed(client.redis)
        ids = await client.submit_many([USER] * n, model=MODEL, max_tokens=6)
        await client.results_many(ids, timeout_s=60)
        for _ in range(100):
            if await _completed(client.redis) >= before + n:
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the heartbeat did not count the answers")


async def _completed(redis: Any) -> int:
    raw = await redis.get(Keys().heartbeat("tw"))
    return int(json.loads(raw)["capacity"]["completed"]) if raw else -1


def test_quantile_interpolates_like_histogram_quantile() -> None:
    bounds = [0.1, 0.2, 0.4]
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    assert quantile(0.5, bounds, [0, 4, 0, 0]) == pytest.approx(0.15)
    assert quantile(0.99, bounds, [1, 0, 0, 1]) == 0.4  # in +Inf: the highest bound


async def test_top_renders_models_and_workers_of_a_live_worker(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    redis = connect(redis_url)
    top = Top(redis, Keys())
    try:
        await _answer(redis_url, 3)
        await top.frame()
        await _answer(redis_url, 4)
        frame = await top.frame()
    finally:
        await redis.aclose()
    console = Console(record=True, width=160)
    console.print(render(frame))
    text = console.export_text()
    assert f"model {MODEL}" in text and "tw" in text
    assert "TTFT p50" in text and "KV used" in text
    assert frame.tokens_per_s["tw"] > 0
    bounds, counts = frame.ttft_window[MODEL]
    assert sum(counts) == 4  # the answers since the previous frame
    p50 = quantile(0.5, bounds, counts)
    assert p50 is not None and p50 > 0


def test_top_once_prints_a_frame(
    tiny_worker: ThreadWorker, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    asyncio.run(_answer(redis_url, 2))
    assert main(["top", "--redis", redis_url, "--once", "--interval-s", "0.2"]) == 0
    out = capsys.readouterr().out
    assert f"model {MODEL}" in out and "tw" in out


async def test_exporter_serves_queue_metrics_from_redis(
    tiny_worker: ThreadWorker, redis_url: str
) -> None:
    await _answer(redis_url, 3)
    exporter = QueueExporter(redis_url, interval_s=0.2)
    task = asyncio.create_task(exporter.run(port=0, host="127.0.0.1"))
    try:
        while exporter.not_ready() is not None:
            await asyncio.sleep(0.05)
        fams = list(exporter.collect())
        assert convention_problems(fams) == []
        got = {s.name: s for f in fams for s in f.samples if s.labels.get("model") == MODEL}
        assert got["chatq_queue_live_workers"].value == 1
        assert got["chatq_queue_drain_tokens_per_second"].value >= 0  # measured per window
        assert "chatq_queue_backlog_seconds" in got and "chatq_queue_dead_letters_total" in got
    finally:
        exporter.stop()
        await task


def test_exporter_command_serves_http(redis_url: str) -> None:
    """``chatq exporter`` over HTTP (no model needed): /metrics and /ready."""
    import subprocess
    import sys
    import time

    from workers.redis_server import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "workers.cli", "exporter", "--redis",
                             redis_url, "--port", str(port), "--interval-s", "0.2"])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            names = {f.name for f in text_string_to_metric_families(r.read().decode())}
        assert "chatq_exporter_redis_up" in names and "chatq_queue_backlog_tokens" in names
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
