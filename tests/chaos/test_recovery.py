"""Recovery from Redis faults without help (issue #20 item 0), on the chaos cluster:

- a ``CLIENT PAUSE`` longer than the heartbeat TTL expires every heartbeat, yet no live
  worker's entry is taken over, so no token is generated twice;
- a 60 s Redis outage (twice the retry budget that used to make a worker exit) is ridden
  out by every worker process, and every request is answered once;
- Redis restarted from a snapshot older than its last writes, under load: every request it
  still knows of is answered once (reconciliation re-handles the entries it hands back as
  pending on workers that had answered them), in bounded time.

Runs last in the module: the rollback turns the AOF off for the rest of the session.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from producer.contract.keys import GROUP
from testkit.chaos.cluster import KEYS, MODEL, ChaosCluster
from testkit.chaos.experiment import experiment
from testkit.chaos.nemesis import ROLLBACK, Fault

pytestmark = pytest.mark.chaos


def _show(capsys: pytest.CaptureFixture[str], table: str) -> None:
    """The checker's table in the test log, passed or not (CI keeps it)."""
    with capsys.disabled():
        print("\n" + table, flush=True)


def _counters(cluster: ChaosCluster) -> dict[str, int]:
    """Totals over every host process's heartbeat (its metrics ride along)."""
    r = cluster.client()
    try:
        totals: dict[str, int] = {}
        for key in r.scan_iter(match=KEYS.heartbeat("*")):
            raw = r.get(key)
            if raw is None:
                continue
            capacity: dict[str, Any] = json.loads(raw)["capacity"]
            for name in ("tokens_generated", "claimed", "fenced", "resumed", "reconciled"):
                totals[name] = totals.get(name, 0) + int(capacity.get(name, 0))
        return totals
    finally:
        r.close()


def _pids(cluster: ChaosCluster) -> dict[str, int]:
    return {n: w.proc.pid for n, w in cluster.workers.items() if w.proc and w.alive}


def _pending(cluster: ChaosCluster) -> int:
    """Entries delivered and not acknowledged on the model's lanes."""
    r = cluster.client()
    try:
        return sum(
            int(r.xpending(lane, GROUP)["pending"])
            for lane in KEYS.request_lanes(MODEL)
            if r.exists(lane)
        )
    finally:
        r.close()


async def _settled(cluster: ChaosCluster, timeout_s: float = 120.0) -> dict[str, int]:
    """Counters once every worker serves (one started again by an earlier test may still be
    loading), nothing an earlier test queued is still pending (a worker killed there and
    started again under its name re-handles its old entries when it reconciles: claims and
    resumes that belong to that test), and every worker has beaten since (every 0.5 s)."""
    await asyncio.to_thread(cluster.wait_ready, list(cluster.workers))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while _pending(cluster) and loop.time() < deadline:
        await asyncio.sleep(0.5)
    assert _pending(cluster) == 0, "an earlier test's entries are still pending"
    await asyncio.sleep(1.5)
    return _counters(cluster)


async def test_a_pause_past_the_heartbeat_ttl_generates_nothing_twice(
    chaos_cluster: ChaosCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    before = await _settled(chaos_cluster)
    pause = Fault("client_pause", "cw0", at_s=2.0, duration_s=5.0)  # TTL 2 s: all expire
    verdict, traffic = await experiment(
        chaos_cluster, [pause], duration_s=5.0, rate_per_s=4.0, prefix="pause",
        max_tokens=(150, 300),
    )  # fmt: skip
    after = await _settled(chaos_cluster)
    _show(capsys, verdict.table("CLIENT PAUSE 5 s"))
    assert verdict.clean and verdict.recovered, verdict
    delta = {k: after[k] - before.get(k, 0) for k in after}
    assert delta["claimed"] == delta["fenced"] == delta["resumed"] == 0, delta
    # Every token the workers generated is in an answer: none was generated twice.
    answered = sum(
        f.usage.completion_tokens for s in traffic.seen.values() for _, f in s.finals[:1]
        if hasattr(f, "usage")
    )  # fmt: skip
    assert delta["tokens_generated"] == answered, (delta, answered)


async def test_a_60_s_redis_outage_is_ridden_out(
    chaos_cluster: ChaosCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    pids = _pids(chaos_cluster)
    outage = Fault("kill_redis", "cw0", at_s=3.0, duration_s=60.0)
    verdict, _ = await experiment(
        chaos_cluster, [outage], duration_s=3.0, rate_per_s=4.0, prefix="outage",
        max_tokens=(300, 600), submit_retry_s=90.0,
    )  # fmt: skip
    _show(capsys, verdict.table("Redis down 60 s (appendfsync always)"))
    assert _pids(chaos_cluster) == pids  # every worker process lived through it
    assert verdict.clean and verdict.recovered, verdict
    (recovery,) = verdict.recovery_s
    assert recovery[1] is not None


async def test_redis_restarted_from_an_older_snapshot_answers_what_it_kept_once(
    chaos_cluster: ChaosCluster, capsys: pytest.CaptureFixture[str]
) -> None:
    rollback = Fault(ROLLBACK, "cw0", at_s=3.0, duration_s=2.0)  # 2 s of writes are lost
    # The bound: what Redis handed back pending on a worker that no longer holds it is taken
    # up after reconcile_interval_s (5 s) idle; 25 s leaves room for the generation itself.
    verdict, traffic = await experiment(
        chaos_cluster, [rollback], duration_s=6.0, rate_per_s=4.0, prefix="rollback",
        max_tokens=(100, 300), drain_timeout_s=25.0,
    )  # fmt: skip
    _show(capsys, verdict.table("Redis restarted from a snapshot 2 s old"))
    assert rollback.applying_s is not None
    # Acknowledged before the SAVE was sent: its XADD is in the snapshot. Not "before
    # began_s": a submit that waited behind the SAVE is acknowledged as it returns, and
    # under load often before the nemesis notes began_s, yet the rollback erased it.
    in_snapshot = {rid for rid, s in traffic.seen.items() if s.submitted_s < rollback.applying_s}
    assert in_snapshot and not set(verdict.lost) & in_snapshot, verdict
    assert not verdict.unexpected
    # What Redis keeps comes to one final per request, in bounded time; a reader may have
    # seen a final the rollback erased and stopped reading, while the request is answered
    # again (what everysec can cost: docs/reliability.md). One whose worker still held it
    # and found its stream short of chunks was dropped and is resumed by reconcile: within
    # reconcile_interval_s (5 s) plus its generation: 90 s bounds it on a loaded 2-core
    # machine (the wait ends as soon as every request has its final).
    r = chaos_cluster.client()
    try:
        kept = await _finals_kept(r, in_snapshot, timeout_s=90.0)
        counts = {rid: len(finals) for rid, finals in kept.items()}
        wrong = {rid: n for rid, n in counts.items() if n != 1}
        # What Redis holds of each, to tell a slow answer from a stuck one.
        traces = {rid: sorted(k.decode() for k in r.keys(f"*{rid}*")) for rid in wrong}
    finally:
        r.close()
    assert not wrong, (wrong, traces)


async def _finals_kept(r: Any, ids: set[str], timeout_s: float) -> dict[str, list[Any]]:
    """The final entries Redis keeps per request, once each has one (or the time is up)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        kept = {
            rid: [f for _, f in r.xrange(KEYS.result(rid)) if f[b"t"] != b"chunk"] for rid in ids
        }
        if all(kept.values()) or loop.time() >= deadline:
            return kept
        await asyncio.sleep(0.5)
