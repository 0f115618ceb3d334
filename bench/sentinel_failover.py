"""Redis Sentinel failover under load: how long producers and workers wait, and what a
failover loses.

A real master, its replica and three Sentinels (``testkit.sentinel``), a ``chatq worker``
subprocess given only the ``redis+sentinel://`` URL (its engine is the zero-cost benchmark
engine, so what is measured is the queue), and ``--producers`` producer tasks submitting
chats back to back through the same URL. After ``--before-s`` the master is SIGKILLed; the
producers keep submitting (a submit that fails with ``RedisUnavailable`` is retried under
the same idempotency key, so an ambiguous failure cannot queue a request twice) for
``--after-s`` more seconds once the Sentinels have promoted the replica. Then every
acknowledged request's result is awaited.

Per round (one per ``--fsync`` setting, repeated ``--rounds`` times):

- ``failover s``: kill → the Sentinels name the replica and it takes writes;
- ``producers blocked s``: kill → each producer's first acknowledged submit after it
  (median and max over producers);
- ``answers resumed s``: kill → the answer to a request submitted after the kill (a probe
  submitted right after the kill, retried until the new master takes it);
- ``acked``: submits the master acknowledged; ``lost``: acknowledged but never answered (the
  ENQUEUE reached the master and not the replica: Redis replication is asynchronous);
  ``answered twice``: result streams holding more than one final.

    .venv/bin/python bench/sentinel_failover.py                # both fsync settings, 3 rounds
    .venv/bin/python bench/sentinel_failover.py --smoke        # one short round
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procs import spawn, stop  # noqa: E402
from bench.smoke import add_smoke_flag, parse_args  # noqa: E402

MODEL = "zero"
SMOKE: dict[str, Any] = dict(fsync=["everysec"], rounds=1, producers=2, before_s=1.5, after_s=1.5)


@dataclass
class Round:
    """What one failover round measured."""

    fsync: str
    failover_s: float = 0.0
    blocked_s: list[float] = field(default_factory=list)
    resumed_s: float = float("nan")
    acked: int = 0
    lost: int = 0
    twice: int = 0


@dataclass
class Producers:
    """Shared state of the producer tasks of one round."""

    stop_at: float = float("inf")
    killed_at: float = 0.0
    acked: dict[str, float] = field(default_factory=dict)  # request id -> ack time
    first_ack_after_kill: dict[int, float] = field(default_factory=dict)


async def produce(client: Any, index: int, shared: Producers) -> None:
    """Submit back to back until ``stop_at``; retry a failed submit under its idempotency
    key until the (new) master acknowledges it."""
    messages = [{"role": "user", "content": f"order status please ({index})"}]
    while time.monotonic() < shared.stop_at:
        started = time.monotonic()
        rid, failed = await submit_retrying(client, messages)
        now = time.monotonic()
        shared.acked[rid] = now
        # A reply already on its way when the master died is not a post-failover ack: only
        # a submit begun after the kill, or one that failed and was retried, counts.
        after_kill = shared.killed_at and (started >= shared.killed_at or failed)
        if after_kill and index not in shared.first_ack_after_kill:
            shared.first_ack_after_kill[index] = now - shared.killed_at


async def submit_retrying(client: Any, messages: list[dict[str, str]]) -> tuple[str, bool]:
    """Submit under a fresh idempotency key, retrying while Redis is unavailable; the id and
    whether any attempt failed."""
    from producer import RedisUnavailable

    key, failed = uuid.uuid4().hex, False
    while True:
        try:
            rid = await client.submit(
                messages, model=MODEL, max_tokens=8, idempotency_key=key, deadline_s=300
            )
            return rid, failed
        except RedisUnavailable:
            failed = True
            await asyncio.sleep(0.02)


async def probe_answers(client: Any, killed_at: float) -> float:
    """Kill → the first answer to a request submitted after the kill."""
    rid, _ = await submit_retrying(client, [{"role": "user", "content": "still there?"}])
    await client.result(rid, timeout_s=60)
    return time.monotonic() - killed_at


async def one_round(fsync: str, args: argparse.Namespace, tok_dir: Path, log: Path) -> Round:
    from producer import ChatClient
    from testkit.sentinel import SentinelGroup

    row = Round(fsync)
    with SentinelGroup(fsync=fsync) as group:
        worker = spawn_worker(group.url, tok_dir, log)
        try:
            async with ChatClient(group.url, allow_unserved=True) as client:
                await wait_heartbeat(client, worker)
                shared = Producers()
                tasks = [
                    asyncio.create_task(produce(client, i, shared)) for i in range(args.producers)
                ]
                await asyncio.sleep(args.before_s)
                shared.killed_at = time.monotonic()
                old = group.kill_master()
                probe = asyncio.create_task(probe_answers(client, shared.killed_at))
                await asyncio.to_thread(group.wait_failover, old)
                row.failover_s = time.monotonic() - shared.killed_at
                shared.stop_at = time.monotonic() + args.after_s
                await asyncio.gather(*tasks)
                row.resumed_s = await probe
                row.blocked_s = sorted(shared.first_ack_after_kill.values())
                await collect(client, shared, row)
        finally:
            stop(worker)
    return row


async def collect(client: Any, shared: Producers, row: Round) -> None:
    """Await every acknowledged request's result; count the lost and the doubly answered."""
    from producer import ResultTimeout
    from producer.contract.keys import Keys

    row.acked = len(shared.acked)
    keys = Keys()
    sem = asyncio.Semaphore(64)

    async def one(rid: str) -> None:
        async with sem:
            try:
                await client.result(rid, timeout_s=20)
            except ResultTimeout:
                row.lost += 1
                return
            entries = await client.redis.xrange(keys.result(rid))
            finals = [e for _, e in entries if e.get(b"t") in (b"done", b"error")]
            row.twice += len(finals) > 1

    await asyncio.gather(*(one(r) for r in shared.acked))


def spawn_worker(url: str, tok_dir: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "workers.cli", "--log-level", "WARNING", "worker",
        "--model", str(tok_dir), "--served-model-name", MODEL, "--redis", url,
        "--name", "failover-worker", "--max-num-seqs", "64",
        "--engine-factory", "testkit.zero_cost_engine:ZeroCostEngine.from_options",
    ]  # fmt: skip
    return spawn(cmd, log)


async def wait_heartbeat(client: Any, worker: subprocess.Popen[bytes]) -> None:
    from producer.contract.keys import Keys

    while not await client.redis.exists(Keys().heartbeat("failover-worker")):
        if worker.poll() is not None:
            raise RuntimeError("the worker exited at start; see its log")
        await asyncio.sleep(0.1)


def table(rows: Sequence[Round]) -> str:
    out = [
        "| fsync | failover s | producers blocked s (median / max) | answers resumed s | "
        "acked | lost | answered twice |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        blocked = (
            f"{statistics.median(r.blocked_s):.2f} / {max(r.blocked_s):.2f}" if r.blocked_s else "-"
        )
        out.append(
            f"| {r.fsync} | {r.failover_s:.2f} | {blocked} | {r.resumed_s:.2f} | {r.acked:,} | "
            f"{r.lost} | {r.twice} |"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fsync", nargs="+", default=["always", "everysec"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--producers", type=int, default=8)
    parser.add_argument("--before-s", type=float, default=5.0)
    parser.add_argument("--after-s", type=float, default=5.0)
    add_smoke_flag(parser, "one short round on everysec, two producers")
    args = parse_args(parser, SMOKE, argv)
    from testkit.checkpoints import build_tokenizer

    rows = []
    with tempfile.TemporaryDirectory(prefix="chatq-failover-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        build_tokenizer(tok_dir)
        for _ in range(args.rounds):
            for fsync in args.fsync:
                row = asyncio.run(one_round(fsync, args, tok_dir, Path(tmp) / "worker.log"))
                print(table([row]).splitlines()[-1], flush=True)
                rows.append(row)
    print(table(rows))
    # Loss is measured, not failed on (asynchronous replication allows it); a round whose
    # producers did not all get through after the kill means the failover path itself is broken.
    broken = [r for r in rows if len(r.blocked_s) < args.producers]
    if broken:
        print(f"error: {len(broken)} round(s): a producer never got through after the failover")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
