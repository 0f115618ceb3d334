"""A client that goes away cancels its request: the engine stops working on it and the
request's result is ``cancelled`` (streaming and non-streaming)."""

from __future__ import annotations

import json
import socket
import time
import uuid

import httpx
import pytest
import redis

from producer.contract.keys import Keys
from producer.contract.results import Chunk, Error, decode_result
from tests.gateway.conftest import MODEL, GatewayProcess, create_key, wait_until
from tests.workers.conftest import ThreadWorker

pytestmark = pytest.mark.timeout(180)

# Long enough that it is still running when the client leaves (ignore_eos: no early stop).
LONG = {
    "model": MODEL,
    "max_tokens": 1500,
    "ignore_eos": True,
    "messages": [{"role": "user", "content": "Tell me a long story."}],
}


def _final(module_redis: str, request_id: str) -> object:
    """The request's final result entry (done / error), or None while it has none."""
    r = redis.Redis.from_url(module_redis)
    try:
        last = r.xrevrange(Keys().result(request_id), count=1)
        entry = decode_result(last[0][1]) if last else None
        return None if entry is None or isinstance(entry, Chunk) else entry
    finally:
        r.close()


def _running(worker: ThreadWorker) -> int:
    return int(worker.capacity.running_seqs)


def test_stream_disconnect_cancels(
    gateway: GatewayProcess, gw_worker: ThreadWorker, module_redis: str
) -> None:
    key = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
    with (
        httpx.Client(timeout=30) as http,
        http.stream(
            "POST",
            gateway.url + "/v1/chat/completions",
            headers={"authorization": f"Bearer {key}"},
            json={**LONG, "stream": True},
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        # A content chunk means the engine is generating it now.
        while True:
            line = next(lines)
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"]:
                break
        request_id = first["id"].removeprefix("chatcmpl-")
        assert _running(gw_worker) >= 1
    # The connection is closed: the request is cancelled, the engine drops it.
    final = wait_until(lambda: _final(module_redis, request_id), timeout_s=30)
    assert isinstance(final, Error) and final.code == "cancelled"
    wait_until(lambda: _running(gw_worker) == 0, timeout_s=30)


def test_non_stream_disconnect_cancels(
    gateway: GatewayProcess, gw_worker: ThreadWorker, module_redis: str
) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    key = create_key(module_redis, tenant, max_concurrent=5)
    body = json.dumps(LONG).encode()
    sock = socket.create_connection(("127.0.0.1", gateway.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"authorization: Bearer {key}\r\ncontent-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    r = redis.Redis.from_url(module_redis)
    try:
        inflight = Keys().tenant_inflight(tenant)
        # The request is queued and counted in flight for its tenant; it starts running.
        request_id = wait_until(lambda: [m.decode() for m in r.zrange(inflight, 0, -1)])[0]
        wait_until(lambda: _running(gw_worker) >= 1, timeout_s=30)
        time.sleep(0.3)
        sock.close()
        final = wait_until(lambda: _final(module_redis, request_id), timeout_s=30)
        assert isinstance(final, Error) and final.code == "cancelled"
        wait_until(lambda: _running(gw_worker) == 0, timeout_s=30)
        wait_until(lambda: r.zcard(inflight) == 0, timeout_s=10)  # no longer in flight
    finally:
        r.close()
