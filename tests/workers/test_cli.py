"""``chatq`` end to end: workers as real subprocesses (kill -9, SIGTERM), enqueue and status."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.keys import GROUP, Keys
from producer.protocol import Done, decode_result
from producer.sync_client import SyncChatClient
from tests.workers.conftest import MODEL, ThreadWorker, WorkerProcess
from workers.cli import main

KEYS = Keys()
USER = [{"role": "user", "content": "My package has not arrived yet."}]


def _heartbeat(r: redis.Redis, name: str) -> dict[str, Any] | None:
    raw = r.get(KEYS.heartbeat(name))
    if raw is None:
        return None
    info: dict[str, Any] = json.loads(raw)["capacity"]
    return info


def _wait(cond: Callable[[], Any], timeout_s: float, what: str, *procs: WorkerProcess) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        for p in procs:
            assert p.proc.poll() is None, f"worker exited early:\n{p.log()[-3000:]}"
        time.sleep(0.02)
    logs = "\n".join(p.log()[-3000:] for p in procs)
    raise AssertionError(f"timed out waiting for {what}\n{logs}")


def _pending_by_consumer(r: redis.Redis) -> dict[str, int]:
    out: dict[str, int] = {}
    for lane in KEYS.request_lanes(MODEL):
        try:
            summary = r.xpending(lane, GROUP)
        except redis.ResponseError:
            continue
        for c in summary.get("consumers") or []:
            name = c["name"].decode() if isinstance(c["name"], bytes) else c["name"]
            out[name] = out.get(name, 0) + int(c["pending"])
    return out


def _finals(r: redis.Redis, request_id: str) -> list[Any]:
    results = [decode_result(f) for _, f in r.xrange(KEYS.result(request_id))]
    return [x for x in results if type(x).__name__ in ("Done", "Error")]


def _ready(r: redis.Redis, *names: str) -> bool:
    return all(_heartbeat(r, n) is not None for n in names)


def _submit_long(client: SyncChatClient, n: int = 12, max_tokens: int = 600) -> list[str]:
    return [
        client.submit(USER, model=MODEL, max_tokens=max_tokens, ignore_eos=True, seed=i)
        for i in range(n)
    ]


def _wait_generating(r: redis.Redis, name: str, *procs: WorkerProcess) -> None:
    """Until ``name`` holds entries and its engine has produced tokens: mid-batch."""
    _wait(
        lambda: (
            (_heartbeat(r, name) or {}).get("tokens_generated", 0) > 0
            and _pending_by_consumer(r).get(name, 0) > 0
        ),
        60,
        f"{name} running",
        *procs,
    )


def _assert_answered_once(r: redis.Redis, ids: list[str], results: list[Any], tokens: int) -> None:
    """Every request complete (``length`` at ``tokens``), one final each, nothing pending
    or dead-lettered."""
    assert all(
        res.finish_reason == "length" and res.usage.completion_tokens == tokens for res in results
    )
    for rid in ids:
        finals = _finals(r, rid)
        assert len(finals) == 1 and isinstance(finals[0], Done), (rid, finals)
    assert _pending_by_consumer(r) == {}
    assert r.xlen(KEYS.dead) == 0


def test_kill_9_mid_batch_every_request_completes_once_on_the_other_worker(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    r = redis.Redis.from_url(redis_url)
    wa, wb = spawn_worker(redis_url, "wa"), spawn_worker(redis_url, "wb")
    _wait(lambda: _ready(r, "wa", "wb"), 120, "both workers", wa, wb)
    with SyncChatClient(redis_url) as client:
        ids = _submit_long(client)
        _wait_generating(r, "wa", wa, wb)
        held_by_wa = _pending_by_consumer(r)["wa"]
        wa.proc.kill()  # SIGKILL: no drain, no requeue, heartbeat left to expire
        killed_at = time.monotonic()
        _wait(lambda: _pending_by_consumer(r).get("wa", 0) == 0, 15, "wa's entries claimed", wb)
        claim_s = time.monotonic() - killed_at
        results = [client.result(rid, timeout_s=120) for rid in ids]
    print(f"\nkill -9 → claimed: {claim_s:.2f} s ({held_by_wa} entries)")
    assert wa.wait(10) == -signal.SIGKILL
    assert claim_s <= 3.0, f"claim took {claim_s:.2f} s"
    assert sum(res.worker == "wb" for res in results) >= held_by_wa
    _assert_answered_once(r, ids, results, 600)
    assert sum(r.xlen(lane) for lane in KEYS.request_lanes(MODEL)) == 0


def test_sigterm_drains_running_requests_and_exits_clean(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    r = redis.Redis.from_url(redis_url)
    w = spawn_worker(redis_url, "wd", "--grace-period-s", "60")
    _wait(lambda: _ready(r, "wd"), 120, "worker", w)
    with SyncChatClient(redis_url) as client:
        ids = [client.submit(USER, model=MODEL, max_tokens=300, ignore_eos=True) for _ in range(4)]
        _wait(lambda: (_heartbeat(r, "wd") or {}).get("tokens_generated", 0) > 0, 60, "running", w)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.log()[-3000:]
        results = [client.result(rid, timeout_s=5) for rid in ids]
    assert all(res.worker == "wd" and res.usage.completion_tokens == 300 for res in results)
    assert r.get(KEYS.heartbeat("wd")) is None
    assert _pending_by_consumer(r) == {}
    assert "grace period over" not in w.log()


def test_sigterm_past_the_grace_period_hands_work_back_to_another_worker(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    # Long answers: the pipelined engine finishes 6 x 600 tokens of the tiny model on the CPU
    # inside the drain's last pull plus a 0.2 s grace period now and then.
    r = redis.Redis.from_url(redis_url)
    w1 = spawn_worker(redis_url, "w1", "--grace-period-s", "0.2")
    _wait(lambda: _ready(r, "w1"), 120, "w1", w1)
    with SyncChatClient(redis_url) as client:
        ids = [
            client.submit(USER, model=MODEL, max_tokens=1800, ignore_eos=True, seed=i)
            for i in range(6)
        ]
        _wait(lambda: (_heartbeat(r, "w1") or {}).get("tokens_generated", 0) > 0, 60, "running", w1)
        w2 = spawn_worker(redis_url, "w2")
        w1.signal(signal.SIGTERM)
        assert w1.wait(60) == 0, w1.log()[-3000:]
        handed = re.search(r"handing (\d+) requests back", w1.log())
        assert handed is not None, w1.log()[-3000:]
        # Handed back, not lost: queued again with no holder, no answer yet.
        assert _pending_by_consumer(r).get("w1", 0) == 0
        _wait(lambda: _ready(r, "w2"), 120, "w2", w2)
        results = [client.result(rid, timeout_s=120) for rid in ids]
    # What w1 had not finished in its grace period, w2 did (from the start), and what w1
    # never pulled (its KV budget holds fewer of these long requests than were queued).
    assert sum(res.worker == "w2" for res in results) >= int(handed.group(1)) > 0
    assert all(res.usage.completion_tokens == 1800 for res in results)
    for rid in ids:
        assert len(_finals(r, rid)) == 1


def test_two_host_processes_share_one_engine_and_drain_together_on_sigterm(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """``--host-processes 2``: two consumers (``wm``, ``wm.1``) in two processes, each with
    half of the worker's in-flight bound (8 seqs x 1.5 / 2 = 6), one engine process between
    them. Twelve requests fill both; SIGTERM drains both and the worker exits clean."""
    r = redis.Redis.from_url(redis_url)
    w = spawn_worker(redis_url, "wm", "--host-processes", "2", "--grace-period-s", "60")
    _wait(lambda: _ready(r, "wm", "wm.1"), 120, "both host processes", w)
    beats = [_heartbeat(r, "wm") or {}, _heartbeat(r, "wm.1") or {}]
    assert beats[0]["pid"] == w.proc.pid and beats[1]["pid"] != w.proc.pid
    with SyncChatClient(redis_url) as client:
        ids = _submit_long(client, max_tokens=200)
        _wait(lambda: _pending_by_consumer(r) == {"wm": 6, "wm.1": 6}, 60, "both hosts full", w)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.log()[-3000:]
        results = [client.result(rid, timeout_s=5) for rid in ids]
    assert sorted(res.worker for res in results) == ["wm"] * 6 + ["wm.1"] * 6
    assert all(res.usage.completion_tokens == 200 for res in results)
    for rid in ids:
        assert len(_finals(r, rid)) == 1
    assert r.get(KEYS.heartbeat("wm")) is None and r.get(KEYS.heartbeat("wm.1")) is None
    assert _pending_by_consumer(r) == {}
    assert "grace period over" not in w.log()


def test_kill_9_of_one_host_process_ends_its_worker_and_another_answers_everything_once(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """A host process killed mid-batch closes its pipe to the shared engine: the engine
    and the worker's other host leave too (like an engine crash), and the other worker
    claims every entry they held."""
    r = redis.Redis.from_url(redis_url)
    wa = spawn_worker(redis_url, "wa", "--host-processes", "2")
    wb = spawn_worker(redis_url, "wb")
    _wait(lambda: _ready(r, "wa", "wa.1", "wb"), 120, "all workers", wa, wb)
    with SyncChatClient(redis_url) as client:
        ids = _submit_long(client)
        _wait_generating(r, "wa.1", wa, wb)
        pid = int((_heartbeat(r, "wa.1") or {})["pid"])
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        _wait(
            lambda: not {"wa", "wa.1"} & set(_pending_by_consumer(r)),
            15,
            "wa's entries claimed",
            wb,
        )
        claim_s = time.monotonic() - killed_at
        assert wa.wait(30) == 1, wa.log()[-3000:]
        results = [client.result(rid, timeout_s=120) for rid in ids]
    print(f"\nkill -9 of a host process → all of its worker's entries claimed: {claim_s:.2f} s")
    assert claim_s <= 3.0, f"claim took {claim_s:.2f} s"
    _assert_answered_once(r, ids, results, 600)


def test_enqueue_and_status_commands(
    tiny_worker: ThreadWorker, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"prompt": "Where is my refund?", "max_tokens": 3})
        + "\n"
        + json.dumps({"messages": [{"role": "user", "content": "Hi"}], "priority": "high"})
        + "\n"
    )
    rc = main(
        [
            "enqueue",
            "--redis",
            redis_url,
            "--model",
            MODEL,
            "--max-tokens",
            "4",
            "--json",
            "--file",
            str(chats),
            "Reset my password please",
        ]
    )
    assert rc == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 3
    assert [x["completion_tokens"] <= 4 for x in lines] == [True] * 3
    assert lines[1]["completion_tokens"] <= 3 and all(x["worker"] == "tw" for x in lines)

    # The flush at the start of this test removed the heartbeat; it is back within a beat.
    _wait(lambda: _ready(redis.Redis.from_url(redis_url), "tw"), 5, "heartbeat")
    assert main(["status", "--redis", redis_url, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report[0]["model"] == MODEL and report[0]["queued"] == 0
    assert report[0]["workers"] == ["tw"]
    assert main(["status", "--redis", redis_url]) == 0
    assert MODEL in capsys.readouterr().out


def test_worker_command_rejects_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "--redis", "redis://localhost:1/0"]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["worker", "--model", "x", "--redis", "http://nope"]) == 2
