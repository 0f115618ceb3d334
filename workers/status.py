"""What ``chatq status`` shows: per model, its queue, pending work, dead letters and workers.

Read-only. Counts come straight from Redis: a lane's length is queued + pending (FINALIZE
deletes acknowledged entries), pending comes from the consumer group, backlog tokens and the
drain rate from the model's backlog hash, dead letters from that hash's ``dead`` counter, and
live workers from the heartbeat keys.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from producer.contract.keys import GROUP, PRIORITIES, Keys


@dataclass(frozen=True)
class LaneStatus:
    """One priority lane of a model: entries queued and pending."""

    priority: str
    length: int  # entries in the stream: queued + pending
    pending: int  # delivered to a worker, not yet acknowledged

    @property
    def queued(self) -> int:
        return max(self.length - self.pending, 0)


@dataclass(frozen=True)
class WorkerStatus:
    """A live worker as its heartbeat shows it."""

    name: str
    pid: int | None = None
    host: str = ""
    beat_age_ms: int | None = None  # since its last heartbeat
    capacity: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelStatus:
    """One model's queue, backlog, dead letters and workers."""

    model: str
    lanes: tuple[LaneStatus, ...]
    backlog_tokens: int  # cost of queued + running requests (enqueue adds, FINALIZE removes)
    backlog_requests: int
    drain_rate_tps: float  # EWMA of finalized cost tokens per second; 0 = never measured
    dead_letters: int
    workers: tuple[WorkerStatus, ...]

    @property
    def queued_requests(self) -> int:
        return sum(lane.queued for lane in self.lanes)

    @property
    def pending(self) -> int:
        return sum(lane.pending for lane in self.lanes)


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    try:
        return int(_s(value)) if value is not None else 0
    except ValueError:
        return 0


def _float(value: Any) -> float:
    try:
        return float(_s(value)) if value is not None else 0.0
    except ValueError:
        return 0.0


async def live_workers(redis: Redis, keys: Keys) -> dict[str, WorkerStatus]:
    """Every worker whose heartbeat key exists, by name."""
    names: list[str] = []
    prefix_len = len(keys.heartbeat(""))
    async for key in redis.scan_iter(match=keys.heartbeat_pattern(), count=1000):
        names.append(_s(key)[prefix_len:])
    if not names:
        return {}
    values = await redis.mget([keys.heartbeat(n) for n in names])
    now_ms = time.time_ns() // 1_000_000
    out: dict[str, WorkerStatus] = {}
    for name, value in zip(names, values, strict=True):
        if value is None:  # expired between SCAN and MGET
            continue
        try:
            beat = json.loads(value)
            capacity = beat.get("capacity")
            out[name] = WorkerStatus(
                name=name,
                pid=beat.get("pid"),
                host=str(beat.get("host", "")),
                beat_age_ms=now_ms - int(beat["ts_ms"]),
                capacity=capacity if isinstance(capacity, dict) else {},
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            out[name] = WorkerStatus(name=name)
    return out


def _serves(worker: WorkerStatus, model: str, consumers: set[str]) -> bool:
    if worker.name in consumers:
        return True
    cap = worker.capacity
    models = cap.get("models")
    return cap.get("model") == model or (isinstance(models, list) and model in models)


async def status_report(redis: Redis, keys: Keys) -> list[ModelStatus]:
    """One :class:`ModelStatus` per model that ever had a request queued, sorted by name
    (lanes and backlogs summed over the partitions)."""
    names: set[str] = set()
    for p in keys.all_partitions():
        # redis-py types SMEMBERS as sync-or-async (one stub for both clients); this is async.
        members: Any = await redis.smembers(keys.models(p))  # type: ignore[misc]
        names |= {_s(m) for m in members}
    models = sorted(names)
    workers = await live_workers(redis, keys)
    pipe = redis.pipeline(transaction=False)
    for model in models:
        for p in keys.all_partitions():
            pipe.hgetall(keys.backlog(model, p))
            for lane in keys.request_lanes(model, p):
                pipe.xlen(lane)
                pipe.xpending(lane, GROUP)
                pipe.xinfo_consumers(lane, GROUP)
    replies = iter(await pipe.execute(raise_on_error=False))
    report: list[ModelStatus] = []
    for model in models:
        sums = dict.fromkeys(("tokens", "requests", "dead"), 0)
        rate = 0.0
        counts = {priority: [0, 0] for priority in PRIORITIES}  # length, pending
        consumers: set[str] = set()
        for _ in keys.all_partitions():
            backlog = next(replies)
            backlog = {_s(k): v for k, v in backlog.items()} if isinstance(backlog, dict) else {}
            for name in sums:
                sums[name] += _int(backlog.get(name))
            rate += _float(backlog.get("rate"))
            for priority in PRIORITIES:
                length, pending, infos = next(replies), next(replies), next(replies)
                counts[priority][0] += length if isinstance(length, int) else 0
                counts[priority][1] += int(pending["pending"]) if isinstance(pending, dict) else 0
                if isinstance(infos, list):
                    consumers |= {_s(c["name"]) for c in infos}
        serving = sorted(
            (w for w in workers.values() if _serves(w, model, consumers)), key=lambda w: w.name
        )
        report.append(
            ModelStatus(
                model=model,
                lanes=tuple(LaneStatus(prio, *counts[prio]) for prio in PRIORITIES),
                backlog_tokens=sums["tokens"],
                backlog_requests=sums["requests"],
                drain_rate_tps=rate,
                dead_letters=sums["dead"],
                workers=tuple(serving),
            )
        )
    return report


_COLUMNS = (
    "model", "queued", "high/normal/low", "pending", "backlog tok", "drain tok/s", "dead",
    "workers",
)  # fmt: skip


def _rows(report: list[ModelStatus]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for m in report:
        names = ", ".join(w.name for w in m.workers) or "-"
        rows.append(
            (
                m.model,
                str(m.queued_requests),
                "/".join(str(lane.queued) for lane in m.lanes),
                str(m.pending),
                str(m.backlog_tokens),
                f"{m.drain_rate_tps:.0f}" if m.drain_rate_tps > 0 else "-",
                str(m.dead_letters),
                f"{len(m.workers)} ({names})" if m.workers else "0",
            )
        )
    return rows


def render_text(report: list[ModelStatus], workers: dict[str, WorkerStatus] | None = None) -> str:
    """A plain fixed-width table (for logs, pipes, and terminals without rich), then the live
    ``workers`` (when given), so a worker shows before any request was queued."""
    parts: list[str] = []
    if report:
        parts.append(_table(_COLUMNS, _rows(report)))
    else:
        parts.append("no requests queued yet")
    if workers is not None:
        if workers:
            parts.append("live workers:\n" + _table(_WORKER_COLUMNS, _worker_rows(workers)))
        else:
            parts.append("no live workers")
    return "\n\n".join(parts)


def _table(columns: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    rows = [columns, *body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


_WORKER_COLUMNS = ("worker", "model", "device", "state", "running", "waiting", "KV used", "beat")


def _worker_rows(workers: dict[str, WorkerStatus]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for name in sorted(workers):
        cap = workers[name].capacity
        total, free = _int(cap.get("total_kv_tokens")), _int(cap.get("free_kv_tokens"))
        kv = f"{100 * (total - free) / total:.0f}% of {total}" if total > 0 else "-"
        age = workers[name].beat_age_ms
        rows.append(
            (
                name,
                str(cap.get("model", "?")),
                str(cap.get("device", "?")),
                str(cap.get("state", "?")),
                str(_int(cap.get("running_seqs"))),
                str(_int(cap.get("waiting_seqs"))),
                kv,
                f"{age / 1000:.1f} s ago" if age is not None else "?",
            )
        )
    return rows


def render_rich(report: list[ModelStatus]) -> Any:
    """The same table as a ``rich.table.Table`` (``rich.print`` it)."""
    from rich.table import Table

    table = Table(title="chatq status")
    for i, name in enumerate(_COLUMNS):
        table.add_column(name, justify="left" if i in (0, 2, 7) else "right")
    for row in _rows(report):
        table.add_row(*row)
    return table


@dataclass(frozen=True)
class WebhookFailure:
    """One delivery given up on (an entry of ``Keys.webhook_failed``)."""

    request_id: str
    url: str
    reason: str
    attempts: int


@dataclass(frozen=True)
class WebhookStatus:
    """Callback deliveries (``chatq webhooks``): counters and the newest failures."""

    delivered: int
    retried: int
    failed: int
    last_failures: tuple[WebhookFailure, ...]


async def webhook_status(redis: Redis, keys: Keys, last: int = 5) -> WebhookStatus:
    stats: Any = await redis.hgetall(keys.webhook_stats)  # type: ignore[misc]
    counts = {_s(k): _int(v) for k, v in stats.items()}
    entries = await redis.xrevrange(keys.webhook_failed, count=last)
    failures = []
    for _, fields in entries:
        f = {_s(k): _s(v) for k, v in fields.items()}
        failures.append(
            WebhookFailure(
                f.get("id", ""), f.get("url", ""), f.get("reason", ""), _int(f.get("attempts"))
            )
        )
    return WebhookStatus(
        counts.get("delivered", 0), counts.get("retried", 0), counts.get("failed", 0),
        tuple(failures),
    )  # fmt: skip


def render_webhooks(status: WebhookStatus) -> str:
    """One line of counters, then the newest failures (empty if nothing was ever sent)."""
    if not (status.delivered or status.retried or status.failed):
        return ""
    lines = [
        f"webhooks: {status.delivered} delivered, {status.retried} retries, {status.failed} failed"
    ]
    for f in status.last_failures:
        lines.append(f"  failed {f.request_id} → {f.url}: {f.reason} ({f.attempts} attempts)")
    return "\n".join(lines)
