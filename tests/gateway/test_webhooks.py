"""Webhooks end to end: a real local receiver, ``chatq webhooks`` (arq) processes, real
workers. Signatures verify with the official openai package; failures (500, timeouts) are
retried until exactly one delivery succeeds, also across kill -9 of the chatq worker (after
its final) and of the webhooks worker (mid-delivery); refused URLs are recorded where
``chatq status`` shows them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis

from producer import SyncChatClient
from producer.contract.keys import Keys
from tests.gateway.conftest import (
    MODEL,
    REPO,
    GatewayProcess,
    create_key,
    wait_until,
)
from tests.workers.conftest import ThreadWorker, WorkerProcess

pytestmark = pytest.mark.timeout(300)

CHAT = {"model": MODEL, "max_tokens": 8, "temperature": 0.0,
        "messages": [{"role": "user", "content": "Is my refund done?"}]}  # fmt: skip


class Receiver:
    """A local HTTP server playing a callback receiver: each delivery gets the next planned
    behaviour ("ok", "500", or "hang": answer 500 after ``hang_s``), then "ok" forever."""

    def __init__(self, plan: list[str] | None = None, hang_s: float = 3.0) -> None:
        self.plan = list(plan or [])
        self.hang_s = hang_s
        self.deliveries: list[dict[str, Any]] = []  # every attempt, in arrival order
        self.arrived: list[str] = []  # webhook-id of every attempt, as it arrives
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver._lock:
                    behaviour = receiver.plan.pop(0) if receiver.plan else "ok"
                    receiver.arrived.append(self.headers["webhook-id"])
                    # recorded as it arrives (arrival order), answered or not
                    record = {
                        "headers": dict(self.headers),
                        "body": body,
                        "status": 200 if behaviour == "ok" else 500,
                        "answered": False,
                    }
                    receiver.deliveries.append(record)
                if behaviour == "hang":
                    time.sleep(receiver.hang_s)
                try:
                    self.send_response(record["status"])
                    self.send_header("content-length", "0")
                    self.end_headers()
                    record["answered"] = True
                except OSError:
                    pass  # the sender was gone

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def ok(self, request_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [d for d in self.deliveries if d["status"] == 200 and d["answered"]
                    and d["headers"]["webhook-id"] == request_id]  # fmt: skip

    def attempts(self, request_id: str) -> list[dict[str, Any]]:
        with self._lock:
            return [d for d in self.deliveries if d["headers"]["webhook-id"] == request_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(plan: list[str] | None = None, hang_s: float = 3.0) -> Receiver:
        made.append(Receiver(plan, hang_s))
        return made[-1]

    yield make
    for r in made:
        r.close()


class WebhooksProcess:
    """``python -m workers.cli webhooks ...`` (an arq worker) in its own session."""

    def __init__(self, redis_url: str, log_path: Path, timeout_s: float = 1.0) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "webhooks", "--redis", redis_url,
             "--webhook-allow-loopback", "--webhook-backoff-s", "0.2",
             "--webhook-max-backoff-s", "0.5", "--webhook-timeout-s", str(timeout_s)],
            cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._log.close()


@pytest.fixture
def webhooks(module_redis: str, tmp_path: Path) -> Iterator[Callable[..., WebhooksProcess]]:
    started: list[WebhooksProcess] = []

    def start(timeout_s: float = 1.0) -> WebhooksProcess:
        started.append(WebhooksProcess(module_redis, tmp_path / "webhooks.log", timeout_s))
        return started[-1]

    yield start
    for w in started:
        w.stop()


@pytest.fixture(scope="module")
def hook_gateway(
    gw_worker: ThreadWorker, spawn_gateway: Callable[..., GatewayProcess]
) -> GatewayProcess:
    """A gateway that accepts loopback callback URLs (the local receiver)."""
    return spawn_gateway("--allow-anonymous", "--webhook-allow-loopback")


def _secret(module_redis: str, tenant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "workers.cli", "keys", "--redis", module_redis,
                          "secret", "--tenant", tenant], cwd=REPO, capture_output=True,
                         text=True, check=True)  # fmt: skip
    return out.stdout.strip()


def _job(gateway: GatewayProcess, key: str, url: str, **chat: Any) -> str:
    response = httpx.post(gateway.url + "/v1/jobs", json={**CHAT, **chat, "callback_url": url},
                          headers={"authorization": f"Bearer {key}"}, timeout=30)  # fmt: skip
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def test_signed_delivery_retried_until_one_success(
    hook_gateway: GatewayProcess, module_redis: str, receiver: Callable[..., Receiver],
    webhooks: Callable[..., WebhooksProcess],
) -> None:  # fmt: skip
    tenant = f"hook-{uuid.uuid4().hex[:6]}"
    key = create_key(module_redis, tenant)
    secret = _secret(module_redis, tenant)
    rcv = receiver(["500", "500", "hang", "500"], hang_s=2.0)  # timeout is 1 s
    webhooks()
    request_id = _job(hook_gateway, key, rcv.url)
    delivered = wait_until(lambda: rcv.ok(request_id), timeout_s=60)
    time.sleep(2.0)  # nothing more arrives afterwards
    assert len(rcv.ok(request_id)) == 1
    attempts = rcv.attempts(request_id)
    assert [a["status"] for a in attempts] == [500, 500, 500, 500, 200]
    hit = delivered[0]
    openai.OpenAI(api_key="unused").webhooks.verify_signature(
        hit["body"], hit["headers"], secret=secret
    )
    event = json.loads(hit["body"])
    assert event["type"] == "chat.completion.job.done"
    job = httpx.get(hook_gateway.url + f"/v1/jobs/{request_id}",
                    headers={"authorization": f"Bearer {key}"}).json()  # fmt: skip
    assert event["data"]["result"]["choices"] == job["result"]["choices"]
    assert event["data"]["id"] == request_id and event["data"]["status"] == "done"
    # The same body and id on every attempt; each attempt signed afresh.
    assert {a["body"] for a in attempts} == {hit["body"]}
    with pytest.raises(openai.InvalidWebhookSignatureError):
        openai.OpenAI(api_key="unused").webhooks.verify_signature(
            hit["body"], hit["headers"], secret=_secret(module_redis, f"other-{tenant}")
        )


def test_many_requests_one_success_each(
    hook_gateway: GatewayProcess, module_redis: str, receiver: Callable[..., Receiver],
    webhooks: Callable[..., WebhooksProcess],
) -> None:  # fmt: skip
    key = create_key(module_redis, f"hook-{uuid.uuid4().hex[:6]}")
    rcv = receiver(["500"] * 4)
    webhooks()
    ids = [_job(hook_gateway, key, rcv.url, seed=i) for i in range(4)]
    wait_until(lambda: all(rcv.ok(i) for i in ids), timeout_s=60)
    time.sleep(1.5)
    assert [len(rcv.ok(i)) for i in ids] == [1, 1, 1, 1]


def test_chatq_worker_killed_after_final(
    hook_gateway: GatewayProcess, module_redis: str, receiver: Callable[..., Receiver],
    webhooks: Callable[..., WebhooksProcess], tiny_checkpoint: Callable[..., Path],
    tmp_path: Path,
) -> None:  # fmt: skip
    """The delivery is queued in the same step as the final: a worker killed -9 right after
    writing it loses nothing (the webhooks worker starts only afterwards)."""
    worker = WorkerProcess(
        ["--model", str(tiny_checkpoint("llama")), "--redis", module_redis, "--name", "hook-k",
         "--served-model-name", "tiny-k", "--device", "cpu", "--kv-cache-tokens", "2048",
         "--torch-threads", "1"], tmp_path / "worker.log",
    )  # fmt: skip
    try:
        key = create_key(module_redis, f"hook-{uuid.uuid4().hex[:6]}")
        r = redis.Redis.from_url(module_redis)
        wait_until(lambda: r.exists(Keys().heartbeat("hook-k")), timeout_s=120)
        rcv = receiver()
        request_id = _job(hook_gateway, key, rcv.url, model="tiny-k")
        wait_until(lambda: r.exists(Keys().final(request_id)), timeout_s=60)
        os.killpg(worker.proc.pid, signal.SIGKILL)
        worker.proc.wait(10)
        assert r.zscore(Keys().webhook_queue, Keys().webhook_job_id(request_id)) is not None
        webhooks()
        wait_until(lambda: rcv.ok(request_id), timeout_s=60)
        time.sleep(1.0)
        assert len(rcv.ok(request_id)) == 1
        r.close()
    finally:
        worker.cleanup()


def test_webhooks_worker_killed_mid_delivery(
    hook_gateway: GatewayProcess, module_redis: str, receiver: Callable[..., Receiver],
    webhooks: Callable[..., WebhooksProcess],
) -> None:  # fmt: skip
    """A webhooks worker killed -9 while a delivery hangs: another one takes the job over
    once arq's in-progress lock expires, and it is delivered once."""
    key = create_key(module_redis, f"hook-{uuid.uuid4().hex[:6]}")
    rcv = receiver(["hang"], hang_s=4.0)
    first = webhooks()
    request_id = _job(hook_gateway, key, rcv.url)
    wait_until(lambda: request_id in rcv.arrived, timeout_s=60)  # the POST is in flight
    first.kill9()
    webhooks()
    wait_until(lambda: rcv.ok(request_id), timeout_s=90)
    time.sleep(1.0)
    assert len(rcv.ok(request_id)) == 1
    assert rcv.arrived.count(request_id) >= 2  # the killed attempt, then the one that worked


def test_refused_urls_and_status(
    hook_gateway: GatewayProcess, gateway: GatewayProcess, module_redis: str,
    webhooks: Callable[..., WebhooksProcess],
) -> None:  # fmt: skip
    key = create_key(module_redis, f"hook-{uuid.uuid4().hex[:6]}")
    headers = {"authorization": f"Bearer {key}"}
    for url in ("http://169.254.169.254/latest/meta-data", "ftp://example.com/",
                "http://[::1]:9/x", "http://metadata.google.internal/"):  # fmt: skip
        target = gateway if "::1" in url else hook_gateway  # loopback: refused by default
        response = httpx.post(target.url + "/v1/jobs", json={**CHAT, "callback_url": url},
                              headers=headers)  # fmt: skip
        assert response.status_code == 400, url
        assert response.json()["error"]["param"] == "callback_url"
    # A producer talking to Redis directly skips the gateway: the webhooks worker refuses it.
    with SyncChatClient(module_redis) as client:
        request_id = client.submit(CHAT["messages"], model=MODEL, max_tokens=2,
                                   callback_url="http://169.254.169.254/latest")  # fmt: skip
        client.result(request_id, timeout_s=60)
    webhooks()
    r = redis.Redis.from_url(module_redis)
    failed = wait_until(
        lambda: [e for _, e in r.xrange(Keys().webhook_failed)
                 if e[b"id"].decode() == request_id], timeout_s=30,
    )  # fmt: skip
    assert b"metadata" in failed[0][b"reason"]
    r.close()
    status = subprocess.run([sys.executable, "-m", "workers.cli", "status", "--redis",
                             module_redis], cwd=REPO, capture_output=True, text=True)  # fmt: skip
    assert status.returncode == 0
    assert f"failed {request_id}" in status.stdout and "metadata" in status.stdout
