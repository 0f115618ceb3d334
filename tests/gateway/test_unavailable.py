"""Redis going away: 503 with a retry hint (the clients' retry), /ready says so, /health
still answers; a deadline that passes while queued is a 504 the clients do not retry."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from producer import SyncChatClient
from producer.contract.keys import Keys
from producer.contract.limits import Limits
from tests.gateway.conftest import MODEL, GatewayProcess, create_key, wait_until
from tests.workers.conftest import ThreadWorker
from workers.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)

CHAT = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]}


def test_redis_down_is_503(tmp_path: Path) -> None:
    with RedisServer() as server:
        key = create_key(server.url, "down")
        gw = GatewayProcess(server.url, tmp_path / "gateway.log").wait_ready()
        try:
            assert httpx.get(gw.url + "/ready").status_code == 200
            server.stop()
            auth = {"authorization": f"Bearer {key}"}
            response = httpx.post(
                gw.url + "/v1/chat/completions", json=CHAT, headers=auth, timeout=30
            )
            assert response.status_code == 503, response.text
            assert response.headers["retry-after"] == "1"
            assert response.json()["error"]["code"] == "service_unavailable"
            assert httpx.get(gw.url + "/ready").status_code == 503
            assert httpx.get(gw.url + "/health").status_code == 200
        finally:
            gw.stop()


def test_deadline_passed_in_queue_is_504(
    gateway: GatewayProcess, gw_worker: ThreadWorker, module_redis: str
) -> None:
    """The worker's 4 slots are held by long requests, so a request with the shortest
    deadline the client takes waits in the queue past it; freed, the worker drops it."""
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=create_key(module_redis, tenant))
    with SyncChatClient(module_redis) as direct:
        long = {"model": MODEL, "max_tokens": 1500, "ignore_eos": True, "stream": True}
        blockers = [direct.submit(CHAT["messages"], **long) for _ in range(4)]
        for rid in blockers:  # all four are running
            next(direct.stream(rid, timeout_s=60))
        lane = Keys().requests(MODEL, "normal")

        def free_the_worker() -> None:
            # Once the request is queued (the blockers' 4 entries + its own) or answered,
            # wait out its deadline (twice the minimum, from its creation at the latest),
            # then free the slots: intake finds it expired.
            wait_until(lambda: answered.is_set() or direct.redis.xlen(lane) >= 5)
            time.sleep(2 * Limits().min_deadline_s)
            for rid in blockers:
                direct.cancel(rid)

        answered = threading.Event()  # the worker may pull and drop it before it is seen
        freer = threading.Thread(target=free_the_worker)
        freer.start()
        try:
            with pytest.raises(openai.APIStatusError) as err:
                client.chat.completions.create(
                    model=MODEL, messages=CHAT["messages"], max_tokens=4,  # type: ignore[arg-type]
                    extra_body={"deadline_s": Limits().min_deadline_s},
                    timeout=60,
                )  # fmt: skip
        finally:
            answered.set()
            freer.join()
    assert err.value.status_code == 504
    assert err.value.response.headers["x-should-retry"] == "false"
    assert err.value.code == "deadline_exceeded"
    # The worker counted the tenant's request (its error) in its metrics.
    assert gw_worker.worker.metrics.tenant_errors[tenant] == 1


def test_tenant_counted_by_the_worker(
    gateway: GatewayProcess, gw_worker: ThreadWorker, module_redis: str
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=create_key(module_redis, tenant))
    for _ in range(3):
        client.chat.completions.create(model=MODEL, messages=CHAT["messages"], max_tokens=2)  # type: ignore[arg-type]
    assert gw_worker.worker.metrics.tenant_completed[tenant] == 3
    assert gw_worker.worker.metrics.snapshot()["tenants"][tenant]["completed"] == 3
