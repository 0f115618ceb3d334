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

from producer.keys import GROUP, PRIORITIES, Keys


@dataclass(frozen=True)
class LaneStatus:
    priority: str
    length: int  # entries in the stream: queued + pending
    pending: int  # delivered to a worker, not yet acknowledged

    @property
    def queued(self) -> int:
        return max(self.length - self.pending, 0)


@dataclass(frozen=True)
class WorkerStatus:
    name: str
    pid: int | None = None
    host: str = ""
    beat_age_ms: int | None = None  # since its last heartbeat
    capacity: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelStatus:
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
    """One :class:`ModelStatus` per model that ever had a request queued, sorted by name."""
    # redis-py types SMEMBERS as sync-or-async (one stub for both clients); this is async.
    members: Any = await redis.smembers(keys.models)  # type: ignore[misc]
    models = sorted(_s(m) for m in members)
    workers = await live_workers(redis, keys)
    pipe = redis.pipeline(transaction=False)
    for model in models:
        pipe.hgetall(keys.backlog(model))
        for lane in keys.request_lanes(model):
            pipe.xlen(lane)
            pipe.xpending(lane, GROUP)
            pipe.xinfo_consumers(lane, GROUP)
    replies = iter(await pipe.execute(raise_on_error=False))
    report: list[ModelStatus] = []
    for model in models:
        backlog = next(replies)
        backlog = {_s(k): v for k, v in backlog.items()} if isinstance(backlog, dict) else {}
        lanes: list[LaneStatus] = []
        consumers: set[str] = set()
        for priority in PRIORITIES:
            length, pending, infos = next(replies), next(replies), next(replies)
            length = length if isinstance(length, int) else 0
            pending = int(pending["pending"]) if isinstance(pending, dict) else 0
            if isinstance(infos, list):
                consumers |= {_s(c["name"]) for c in infos}
            lanes.append(LaneStatus(priority, length, pending))
        serving = sorted(
            (w for w in workers.values() if _serves(w, model, consumers)), key=lambda w: w.name
        )
        report.append(
            ModelStatus(
                model=model,
                lanes=tuple(lanes),
                backlog_tokens=_int(backlog.get("tokens")),
                backlog_requests=_int(backlog.get("requests")),
                drain_rate_tps=_float(backlog.get("rate")),
                dead_letters=_int(backlog.get("dead")),
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


def render_text(report: list[ModelStatus]) -> str:
    """A plain fixed-width table (for logs, pipes, and terminals without rich)."""
    if not report:
        return "no models have queued requests yet"
    rows = [_COLUMNS, *_rows(report)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def render_rich(report: list[ModelStatus]) -> Any:
    """The same table as a ``rich.table.Table`` (``rich.print`` it)."""
    from rich.table import Table

    table = Table(title="chatq status")
    for i, name in enumerate(_COLUMNS):
        table.add_column(name, justify="left" if i in (0, 2, 7) else "right")
    for row in _rows(report):
        table.add_row(*row)
    return table
