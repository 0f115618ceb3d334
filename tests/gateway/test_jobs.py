"""The job API: create (202), poll, follow events (resumable), cancel; tenants see only
their own jobs."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
import redis

from producer.contract.keys import Keys
from tests.gateway.conftest import MODEL, GatewayProcess, create_key, wait_until

pytestmark = pytest.mark.timeout(180)

CHAT = {
    "model": MODEL,
    "max_tokens": 16,
    "temperature": 0.0,
    "messages": [{"role": "user", "content": "Where is my package?"}],
}


def _auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _events(response: httpx.Response) -> list[dict[str, str]]:
    """Parse an SSE body into events ({id, event, data})."""
    out: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in response.iter_lines():
        if not line:
            if current:
                out.append(current)
            current = {}
            continue
        name, _, value = line.partition(": ")
        current[name] = value
    return out


def test_job_lifecycle_and_events(gateway: GatewayProcess, module_redis: str) -> None:
    key = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=gateway.url, headers=_auth(key), timeout=60) as http:
        created = http.post("/v1/jobs", json=CHAT)
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["object"] == "chat.completion.job"
        assert job["status"] in ("queued", "running", "done")
        assert created.headers["location"] == f"/v1/jobs/{job['id']}"
        done = wait_until(
            lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["status"] == "done" and j
        )
        # the job's result is kept a day (the gateway's job_result_ttl_s), not the default
        r = redis.Redis.from_url(module_redis)
        assert 86_000 < r.ttl(Keys().result(job["id"])) <= 86_400
        r.close()
        text = done["result"]["choices"][0]["message"]["content"]
        assert done["result"]["usage"]["completion_tokens"] >= 1
        # Events: every chunk, then done; resuming after chunk k gives the rest only.
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            events = _events(response)
        chunks = [e for e in events if e["event"] == "chunk"]
        assert "".join(json.loads(e["data"])["delta"] for e in chunks) == text
        assert [e["id"] for e in chunks] == [str(i) for i in range(len(chunks))]
        assert events[-1]["event"] == "done"
        assert json.loads(events[-1]["data"])["result"]["choices"][0]["message"]["content"] == text
        if len(chunks) > 1:
            with http.stream(
                "GET", f"/v1/jobs/{job['id']}/events", headers={"last-event-id": "0"}
            ) as response:
                resumed = _events(response)
            assert [e["id"] for e in resumed if e["event"] == "chunk"] == [
                e["id"] for e in chunks[1:]
            ]


def test_job_events_of_several_answers_carry_each_chunk_and_its_answer(
    gateway: GatewayProcess, module_redis: str
) -> None:
    """n = 2: one event per chunk (id = the chunk's index, every answer's chunks), each
    naming its answer; each answer's deltas make that answer's text; resuming after an
    event id gives exactly the later chunks."""
    key = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
    body = {**CHAT, "n": 2, "temperature": 1.0, "seed": 3}
    with httpx.Client(base_url=gateway.url, headers=_auth(key), timeout=60) as http:
        job = http.post("/v1/jobs", json=body).json()
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "done")
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            events = _events(response)
        chunks = [json.loads(e["data"]) for e in events if e["event"] == "chunk"]
        ids = [e["id"] for e in events if e["event"] == "chunk"]
        done = json.loads(events[-1]["data"])["result"]
        with http.stream(
            "GET", f"/v1/jobs/{job['id']}/events", headers={"last-event-id": ids[0]}
        ) as response:
            resumed = [e["id"] for e in _events(response) if e["event"] == "chunk"]
    assert ids == [str(c["index"]) for c in chunks] == [str(i) for i in range(len(chunks))]
    assert {c["choice"] for c in chunks} == {0, 1}
    for choice in done["choices"]:
        text = "".join(c["delta"] for c in chunks if c["choice"] == choice["index"])
        assert text == choice["message"]["content"]
    assert resumed == ids[1:]


def test_job_idempotency_and_ownership(gateway: GatewayProcess, module_redis: str) -> None:
    owner = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
    other = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=gateway.url, timeout=60) as http:
        headers = {**_auth(owner), "idempotency-key": "order-1"}
        first = http.post("/v1/jobs", json=CHAT, headers=headers).json()
        again = http.post("/v1/jobs", json=CHAT, headers=headers).json()
        assert again["id"] == first["id"]
        # Another tenant with the same key gets its own job, and cannot see the first.
        theirs = http.post(
            "/v1/jobs", json=CHAT, headers={**_auth(other), "idempotency-key": "order-1"}
        ).json()
        assert theirs["id"] != first["id"]
        for method in ("GET", "DELETE"):
            denied = http.request(method, f"/v1/jobs/{first['id']}", headers=_auth(other))
            assert denied.status_code == 404
            assert denied.json()["error"]["code"] == "not_found"
        assert http.get("/v1/jobs/nope!", headers=_auth(owner)).status_code == 404


def test_job_cancel(gateway: GatewayProcess, module_redis: str) -> None:
    tenant = f"t-{uuid.uuid4().hex[:8]}"
    key = create_key(module_redis, tenant)
    long = {**CHAT, "max_tokens": 1500, "ignore_eos": True}
    with httpx.Client(base_url=gateway.url, headers=_auth(key), timeout=60) as http:
        job = http.post("/v1/jobs", json=long).json()
        wait_until(lambda: http.get(f"/v1/jobs/{job['id']}").json()["status"] == "running")
        cancelled = http.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["cancelled"] is True
        final = wait_until(
            lambda: (j := http.get(f"/v1/jobs/{job['id']}").json())["status"] == "cancelled" and j
        )
        assert final["error"]["code"] == "cancelled"
        with http.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            events = _events(response)
        assert events[-1]["event"] == "error"
        assert json.loads(events[-1]["data"])["status"] == "cancelled"
        again = http.delete(f"/v1/jobs/{job['id']}")  # finished: nothing to cancel
        assert again.status_code == 200 and again.json()["cancelled"] is False
        # A job record whose request the queue no longer knows (its reservation, final and
        # result all gone): 404, and no cancel marker is written for it.
        r = redis.Redis.from_url(module_redis)
        r.hset(Keys().job("gone-1"), mapping={"tenant": tenant, "cancel_token": "t"})
        gone = http.delete("/v1/jobs/gone-1")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
        assert r.exists(Keys().cancelled("gone-1")) == 0
        r.close()


def test_job_refuses_bad_bodies(gateway: GatewayProcess, module_redis: str) -> None:
    key = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
    with httpx.Client(base_url=gateway.url, headers=_auth(key), timeout=60) as http:
        for body, param in [
            ({**CHAT, "stream": True}, "stream"),
            ({**CHAT, "callback_url": "ftp://example.com/x"}, "callback_url"),
            ({**CHAT, "callback_url": "http://169.254.169.254/latest"}, "callback_url"),
            ({**CHAT, "callback_url": "http://127.0.0.1:9/hook"}, "callback_url"),
            ({**CHAT, "priority": "urgent"}, "priority"),
            ({**CHAT, "deadline_s": -1}, "deadline_s"),
        ]:
            response = http.post("/v1/jobs", json=body)
            assert response.status_code == 400, (body, response.text)
            assert response.json()["error"]["param"] == param, response.json()
