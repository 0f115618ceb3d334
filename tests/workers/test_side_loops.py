"""The worker's side loops (heartbeat + reclaim) on a server of their own: a non-default
``max_deliveries`` is honoured, and a worker rides out a Redis outage (server stopped and
started again, empty) and serves again without a restart."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.keys import GROUP, HEARTBEAT_INTERVAL_S, STREAM_FIELD, Keys
from producer.errors import RequestFailed
from producer.sync_client import SyncChatClient
from tests.workers.conftest import MODEL, ThreadWorker, tiny_settings
from workers.redis_server import RedisServer

pytestmark = pytest.mark.timeout(240)

KEYS = Keys()
USER = [{"role": "user", "content": "Where is my order?"}]


class Server:
    """A private redis-server that a test may stop and start again on the same port."""

    def __init__(self) -> None:
        self.current = RedisServer().start()
        self.port = self.current.port
        self.url = self.current.url

    def restart_empty(self) -> None:
        self.current = RedisServer(port=self.port).start()

    def stop(self) -> None:
        self.current.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def worker(server: Server, tiny_checkpoint: Callable[..., Path]) -> Iterator[ThreadWorker]:
    """A worker that dead-letters an entry on its second delivery (``max_deliveries=1``)."""
    settings = tiny_settings(server.url, tiny_checkpoint("llama"), name="sl", max_deliveries=1)
    handle = ThreadWorker(settings).start()
    yield handle
    handle.stop()  # raises unless the worker ended clean (exit code 0)


def _wait(cond: Callable[[], object], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s  # a bound to end the test, not a speed target
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_max_deliveries_1_dead_letters_an_entry_on_its_second_delivery(
    worker: ThreadWorker, server: Server
) -> None:
    """Delivered once to a worker that died: with the default (3) it would be served; with
    ``max_deliveries=1`` the live worker's claim is its second delivery, so it goes to the
    dead letters and the requester gets ``dead_letter``."""
    r = redis.Redis.from_url(server.url)
    lane = KEYS.requests(MODEL, "normal")
    r.set(KEYS.heartbeat("ghost"), "{}", px=60_000)  # alive while the delivery is staged
    env = make_envelope(USER, model=MODEL, request_id="once-1")
    pipe = r.pipeline(transaction=True)  # XADD and the ghost's read: the worker cannot win
    pipe.xadd(lane, {STREAM_FIELD: encode_envelope(env)})
    pipe.xreadgroup(GROUP, "ghost", {lane: ">"}, count=1)
    entry_id, delivered = pipe.execute()
    assert delivered and delivered[0][1][0][0] == entry_id
    r.delete(KEYS.heartbeat("ghost"))
    with SyncChatClient(server.url) as client:
        with pytest.raises(RequestFailed) as failed:
            client.result("once-1", timeout_s=60)
        assert failed.value.code == "dead_letter"
        dead = r.xrange(KEYS.dead())
        assert [fields[b"id"] for _, fields in dead] == [b"once-1"]
        # ...and a request delivered only once is served as usual.
        res = client.chat(USER, model=MODEL, max_tokens=2, ignore_eos=True, timeout_s=60)
    assert res.worker == "sl" and res.usage.completion_tokens == 2


def test_worker_rides_out_a_redis_outage(worker: ThreadWorker, server: Server) -> None:
    """Redis goes away (and comes back empty, as after a failover without persistence): the
    worker keeps running through it, re-creates its groups, beats again and serves."""
    with SyncChatClient(server.url) as client:
        before = client.chat(USER, model=MODEL, max_tokens=2, ignore_eos=True, timeout_s=60)
    assert before.worker == "sl"
    server.stop()
    # Down for several heartbeat intervals and blocking reads: every loop meets the error.
    time.sleep(6 * HEARTBEAT_INTERVAL_S)
    assert worker._thread.is_alive(), f"the worker exited: {worker.error!r} {worker.exit_code}"
    server.restart_empty()
    r = redis.Redis.from_url(server.url)
    _wait(lambda: r.get(KEYS.heartbeat("sl")) is not None, 60, "the heartbeat back")
    with SyncChatClient(server.url) as client:
        after = client.chat(USER, model=MODEL, max_tokens=3, ignore_eos=True, timeout_s=60)
    assert after.worker == "sl" and after.usage.completion_tokens == 3
    assert worker._thread.is_alive()
