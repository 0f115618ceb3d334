"""A queue split into 3 partitions on a real local 3-master Redis Cluster, served by real
workers (tiny checkpoint): traffic spreads over every master, every request is answered
once, and cancel, idempotency, dead letters and reclaim work per partition."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import ChatClient
from producer.connection import connect_sync
from producer.contract.keys import GROUP, Keys
from producer.errors import ProtocolError, RequestFailed
from producer.sync_client import SyncChatClient
from testkit.cluster import LocalCluster
from tests.workers.conftest import MODEL, ThreadWorker, WorkerProcess, tiny_settings
from workers.dead_letters import DeadLetters
from workers.status import status_report

P = 3
KEYS = Keys("chatq", partitions=P)
HI = [{"role": "user", "content": "Say hi"}]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(masters=3) as c:
        yield c


@pytest.fixture(scope="module")
def cluster_worker(
    cluster: LocalCluster, tiny_checkpoint: Callable[..., Path]
) -> Iterator[ThreadWorker]:
    settings = tiny_settings(cluster.url, tiny_checkpoint("llama"), name="cw", partitions=P)
    handle = ThreadWorker(settings)
    handle.start()
    yield handle
    handle.stop()


def _done_count(r: Any, request_id: str) -> int:
    return sum(1 for _, fields in r.xrange(KEYS.result(request_id)) if fields[b"t"] == b"done")


async def test_requests_spread_over_every_master_and_are_answered_once(
    cluster: LocalCluster, cluster_worker: ThreadWorker
) -> None:
    async with ChatClient(cluster.url, partitions=P) as client:
        ids = list(
            await asyncio.gather(*(client.submit(HI, model=MODEL, max_tokens=4) for _ in range(30)))
        )
        ids += await client.submit_many([HI] * 6, model=MODEL, max_tokens=4)
        results = await client.results_many(ids, timeout_s=180)
    assert {KEYS.partition_of(i) for i in ids} == {0, 1, 2}
    assert all(r.finish_reason in ("stop", "length") for r in results)
    r = connect_sync(cluster.url)
    assert all(_done_count(r, i) == 1 for i in ids)  # answered once
    for port in cluster.ports:  # every master held lanes and results
        node = redis.Redis(port=port)
        assert node.keys("chatq:req:*") and node.keys("chatq:res:*"), port
    for p in range(P):  # every entry acked and deleted; the backlog given back
        assert all(r.xlen(lane) == 0 for lane in KEYS.request_lanes(MODEL, p))
        assert int(r.hget(KEYS.backlog(MODEL, p), "tokens") or 0) == 0


def test_the_blocking_client_spreads_and_reads_across_slots(
    cluster: LocalCluster, cluster_worker: ThreadWorker
) -> None:
    with SyncChatClient(cluster.url, partitions=P) as client:
        ids = [client.submit(HI, model=MODEL, max_tokens=4) for _ in range(9)]
        ids += client.submit_many([HI] * 3, model=MODEL, max_tokens=4)
        results = client.results_many(ids, timeout_s=120)
    assert len({KEYS.partition_of(i) for i in ids}) > 1
    assert all(r.finish_reason in ("stop", "length") for r in results)


async def test_idempotency_cancel_and_dead_letters_per_partition(
    cluster: LocalCluster, cluster_worker: ThreadWorker
) -> None:
    async with ChatClient(cluster.url, partitions=P) as client:
        first = await client.submit(HI, model=MODEL, max_tokens=4, idempotency_key="order-1")
        again = await client.submit(HI, model=MODEL, max_tokens=4, idempotency_key="order-1")
        assert str(again) == str(first)
        long = await client.submit(
            HI, model=MODEL, max_tokens=1500, ignore_eos=True, priority="low"
        )
        assert await client.cancel(long)
        with pytest.raises(RequestFailed) as failed:
            await client.result(long, timeout_s=120)
        assert failed.value.code == "cancelled"
        assert (await client.result(first, timeout_s=120)).finish_reason in ("stop", "length")
    r = connect_sync(cluster.url)
    # An entry nobody can read, in partition 2: parked in partition 2's dead letters.
    r.xadd(KEYS.requests(MODEL, "normal", 2), {"m": b"\xc1 not msgpack", "c": "5"})
    deadline = time.monotonic() + 60
    while r.xlen(KEYS.dead(2)) < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert r.xlen(KEYS.dead(2)) == 1
    assert r.xlen(KEYS.dead(0)) == r.xlen(KEYS.dead(1)) == 0
    # What operators see (chatq status, chatq dead) covers every partition.
    async with ChatClient(cluster.url, partitions=P) as client:
        (tiny,) = [m for m in await status_report(client.redis, KEYS) if m.model == MODEL]
        assert tiny.dead_letters == 1 and tiny.backlog_tokens == 0
        (letter,) = await DeadLetters(client.redis, KEYS).newest(10)
        assert letter.partition == 2 and letter.request_id == ""
        await DeadLetters(client.redis, KEYS).drop(letter.entry_id)
        (tiny,) = [m for m in await status_report(client.redis, KEYS) if m.model == MODEL]
        assert tiny.dead_letters == 0 and r.xlen(KEYS.dead(2)) == 0


async def test_a_killed_workers_entries_are_reclaimed_in_every_partition(
    cluster: LocalCluster,
    cluster_worker: ThreadWorker,
    spawn_worker: Callable[..., WorkerProcess],
) -> None:
    victim = spawn_worker(cluster.url, "victim", "--partitions", str(P))
    r = connect_sync(cluster.url)
    deadline = time.monotonic() + 120
    while not r.exists(KEYS.heartbeat("victim", P - 1)):
        assert victim.proc.poll() is None and time.monotonic() < deadline, victim.log()
        await asyncio.sleep(0.1)
    async with ChatClient(cluster.url, partitions=P) as client:
        ids = list(
            await asyncio.gather(
                *(client.submit(HI, model=MODEL, max_tokens=200, ignore_eos=True)
                  for _ in range(24))
            )
        )  # fmt: skip
        held: set[int] = set()
        while len(held) < 2 and time.monotonic() < deadline:  # the victim holds entries
            held = {
                p
                for p in range(P)
                for lane in KEYS.request_lanes(MODEL, p)
                if any(c["name"] == b"victim" and c["pending"] for c in _consumers(r, lane))
            }
            await asyncio.sleep(0.05)
        victim.signal(signal.SIGKILL)
        victim.wait(10)
        results = await client.results_many(ids, timeout_s=240)
    assert len(held) >= 2  # it died holding entries of several partitions
    assert all(res.finish_reason == "length" for res in results)
    assert all(_done_count(r, i) == 1 for i in ids)


def _consumers(r: Any, lane: str) -> list[dict[str, Any]]:
    try:
        return list(r.xinfo_consumers(lane, GROUP))
    except redis.ResponseError:
        return []


@pytest.mark.parametrize(("field", "value"), [("tenant", "acme"), ("callback_url", "https://x/")])
def test_gateway_only_fields_are_refused_on_a_cluster(
    cluster: LocalCluster, field: str, value: str
) -> None:
    """A final that queues a webhook or frees a tenant slot names another slot's keys, which
    the cluster would refuse only after the work: the client refuses the field up front."""
    with SyncChatClient(cluster.url, partitions=P) as client, pytest.raises(ProtocolError) as err:
        client.submit(HI, model=MODEL, max_tokens=4, **{field: value})
    assert err.value.field == field and "Redis Cluster" in str(err.value)
