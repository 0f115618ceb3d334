"""``chatq top``: a live terminal view per model, from Redis alone (no Prometheus needed).

Per model: queued, pending, backlog (tokens and seconds), output tokens per second and time
to first token (p50 / p99); per worker: state, running and waiting sequences, KV-cache use,
GPU utilisation and its own tokens per second. Rates and percentiles cover the time since
the previous frame (the first frame: since the workers started), computed from the counters
and TTFT histogram every worker puts in its heartbeat.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from producer.contract.keys import Keys
from workers.exporter import backlog_seconds
from workers.status import ModelStatus, WorkerStatus, status_report


@dataclass
class _Seen:
    """A worker's counters at the previous frame."""

    at_s: float
    tokens: int
    ttft_counts: list[int]


@dataclass
class Frame:
    """One refresh: the queue report plus rates since the previous frame."""

    report: list[ModelStatus]
    tokens_per_s: dict[str, float] = field(default_factory=dict)  # by worker
    ttft_window: dict[str, tuple[list[float], list[int]]] = field(default_factory=dict)  # model


def quantile(q: float, bounds: list[float], counts: list[int]) -> float | None:
    """``histogram_quantile`` over non-cumulative bucket counts (last bucket +Inf)."""
    total = sum(counts)
    if total <= 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if running + n >= rank and n > 0:
            if i >= len(bounds):  # the +Inf bucket: the highest finite bound
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * (rank - running) / n
        running += n
    return bounds[-1]


class Top:
    """Keeps each worker's previous counters to turn heartbeats into rates."""

    def __init__(self, redis: Redis, keys: Keys) -> None:
        self.redis = redis
        self.keys = keys
        self._seen: dict[str, _Seen] = {}

    async def frame(self) -> Frame:
        report = await status_report(self.redis, self.keys)
        now = time.monotonic()
        out = Frame(report)
        seen: dict[str, _Seen] = {}
        for m in report:
            bounds: list[float] = []
            window: list[int] = []
            for w in m.workers:
                cap = w.capacity
                tokens = int(cap.get("tokens_generated", 0))
                b, total_counts = _ttft(cap)
                counts = total_counts
                before = self._seen.get(w.name)
                if before is not None and now > before.at_s:
                    out.tokens_per_s[w.name] = max(0, tokens - before.tokens) / (now - before.at_s)
                    if len(before.ttft_counts) == len(counts):
                        counts = [x - y for x, y in zip(counts, before.ttft_counts, strict=True)]
                seen[w.name] = _Seen(now, tokens, total_counts)
                if b and (not bounds or bounds == b):
                    bounds = b
                    window = [x + y for x, y in zip(window, counts, strict=False)] or counts
            out.ttft_window[m.model] = (bounds, window)
        self._seen = seen
        return out


def _ttft(cap: dict[str, Any]) -> tuple[list[float], list[int]]:
    raw = cap.get("ttft_buckets")
    if not isinstance(raw, list) or len(raw) != 2:
        return [], []
    return [float(b) for b in raw[0]], [int(c) for c in raw[1]]


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _worker_row(w: WorkerStatus, tokens_per_s: float | None) -> tuple[str, ...]:
    cap = w.capacity
    total = int(cap.get("total_kv_tokens") or 0)
    free = int(cap.get("free_kv_tokens") or 0)
    kv = f"{(total - free) / total:.0%}" if total else "-"
    gpus = cap.get("gpus") or []
    gpu = " ".join(f"{g.get('util', 0):.0%}" for g in gpus if isinstance(g, dict)) or "-"
    return (
        w.name,
        str(cap.get("state", "?")),
        str(cap.get("running_seqs", "-")),
        str(cap.get("waiting_seqs", "-")),
        kv,
        gpu,
        f"{tokens_per_s:.0f}" if tokens_per_s is not None else "-",
        f"{w.beat_age_ms} ms" if w.beat_age_ms is not None else "-",
    )


def render(frame: Frame) -> Any:
    """The frame as a rich renderable (``Console.print`` it, or hand it to ``rich.live``)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    if not frame.report:
        return Text("no models have queued requests yet")
    parts: list[Any] = []
    for m in frame.report:
        bounds, counts = frame.ttft_window.get(m.model, ([], []))
        rates = [frame.tokens_per_s[w.name] for w in m.workers if w.name in frame.tokens_per_s]
        head = Table(title=f"model {m.model}", title_justify="left", expand=True)
        for col in ("queued", "pending", "backlog tokens", "backlog", "tokens/s",
                    "TTFT p50", "TTFT p99", "dead", "workers"):  # fmt: skip
            head.add_column(col, justify="right")
        head.add_row(
            str(m.queued_requests), str(m.pending), str(m.backlog_tokens),
            _seconds(backlog_seconds(m)), f"{sum(rates):.0f}" if rates else "-",
            _seconds(quantile(0.5, bounds, counts)), _seconds(quantile(0.99, bounds, counts)),
            str(m.dead_letters), str(len(m.workers)),
        )  # fmt: skip
        parts.append(head)
        if m.workers:
            table = Table(expand=True, show_edge=False)
            for col in ("worker", "state", "running", "waiting", "KV used", "GPU util",
                        "tokens/s", "beat"):  # fmt: skip
                table.add_column(col, justify="left" if col in ("worker", "state") else "right")
            for w in m.workers:
                table.add_row(*_worker_row(w, frame.tokens_per_s.get(w.name)))
            parts.append(table)
    return Group(*parts)
