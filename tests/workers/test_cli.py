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

from producer.contract.keys import GROUP, HEARTBEAT_TTL_S, Keys
from producer.contract.results import Done, decode_result
from producer.sync_client import SyncChatClient
from tests.workers.conftest import MODEL, ThreadWorker, WorkerProcess
from workers.cli import main

KEYS = Keys()
USER = [{"role": "user", "content": "My package has not arrived yet."}]
USER_HI = [{"role": "user", "content": "Hi"}]


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


def _server_ms(r: redis.Redis) -> int:
    seconds, micros = r.time()
    return int(seconds) * 1000 + int(micros) // 1000


def _heartbeat_expiry_ms(r: redis.Redis, *names: str) -> int:
    """Server-clock time (ms) at which the last of ``names``' heartbeats expires (call after
    their processes are gone: no beat can move it any more)."""
    pipe = r.pipeline(transaction=False)
    pipe.time()
    for name in names:
        pipe.pttl(KEYS.heartbeat(name))
    (seconds, micros), *ttls = pipe.execute()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return now_ms + max(max(int(t), 0) for t in ttls)


def _claim_times_ms(r: redis.Redis, consumer: str) -> list[int]:
    """Server-clock times (ms) at which ``consumer`` claimed the entries it holds that were
    delivered before (XCLAIM resets an entry's idle time): TIME minus each one's idle."""
    pipe = r.pipeline(transaction=False)
    pipe.time()
    lanes = KEYS.request_lanes(MODEL)
    for lane in lanes:
        pipe.xpending_range(lane, GROUP, "-", "+", 1000, consumername=consumer)
    (seconds, micros), *replies = pipe.execute(raise_on_error=False)
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    return [
        now_ms - int(p["time_since_delivered"])
        for reply in replies
        if not isinstance(reply, Exception)
        for p in reply
        if int(p["times_delivered"]) > 1
    ]


# How long after a dead worker's heartbeat expired a live worker may take to claim its
# entries, on the server's clock. The claimer checks every heartbeat interval; the margin is
# one heartbeat TTL, the most a live worker's loop may stall before the others deem it dead
# too (so a slower claim is a bug, while a loaded test machine stays far inside it).
CLAIM_MARGIN_MS = HEARTBEAT_TTL_S * 1000


def _assert_claimed_after_expiry(
    r: redis.Redis, claimer: str, expiry_ms: int, *, check_order: bool = True
) -> list[int]:
    """The claim came after the dead worker's heartbeat expired (never while it could still
    be alive), and within the margin; returns the claims' offsets from expiry (ms)."""
    claims = _claim_times_ms(r, claimer)
    assert claims, f"{claimer} holds no claimed entries"
    offsets = [c - expiry_ms for c in claims]
    # 2 ms: TIME (µs), PTTL and idle times (ms) are each rounded down.
    if check_order:
        assert min(offsets) >= -2, f"claimed before the heartbeat expired: {offsets}"
    assert max(offsets) <= CLAIM_MARGIN_MS, f"claimed {max(offsets)} ms after expiry"
    return offsets


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


def _each_holds(r: redis.Redis, *names: str) -> bool:
    pending = _pending_by_consumer(r)
    return all(pending.get(n, 0) > 0 for n in names)


def _all_delivered(r: redis.Redis) -> bool:
    """Every request lane's entries were read by the group (none waits to be pulled)."""
    for lane in KEYS.request_lanes(MODEL):
        try:
            groups = r.xinfo_groups(lane)
        except redis.ResponseError:
            continue  # no such lane yet
        last = r.xinfo_stream(lane)["last-generated-id"]
        if any(g["name"] in (GROUP, GROUP.encode()) and g["last-delivered-id"] != last
               for g in groups):  # fmt: skip
            return False
    return True


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


def _wait_generating(
    r: redis.Redis, name: str, *procs: WorkerProcess, engine_hosts: tuple[str, ...] = ()
) -> None:
    """Until ``name`` holds entries and its engine has produced tokens: mid-batch. The
    tokens may come from any of ``engine_hosts`` (default: ``name`` alone), the host
    processes sharing ``name``'s engine: under load a host's requests can wait in the shared
    engine behind another host's for as long as those take to finish."""
    hosts = engine_hosts or (name,)
    _wait(
        lambda: (
            any((_heartbeat(r, h) or {}).get("tokens_generated", 0) > 0 for h in hosts)
            and _pending_by_consumer(r).get(name, 0) > 0
        ),
        120,
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
    assert r.xlen(KEYS.dead()) == 0


def test_kill_9_mid_batch_every_request_completes_once_on_the_other_worker(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    r = redis.Redis.from_url(redis_url)
    wa, wb = spawn_worker(redis_url, "wa"), spawn_worker(redis_url, "wb")
    _wait(lambda: _ready(r, "wa", "wb"), 120, "both workers", wa, wb)
    with SyncChatClient(redis_url) as client:
        # Twice what one worker may hold (8 seqs x 1.5): wa gets some whoever reads first.
        ids = _submit_long(client, n=24, max_tokens=300)
        _wait_generating(r, "wa", wa, wb)
        held_by_wa = _pending_by_consumer(r)["wa"]
        wa.proc.kill()  # SIGKILL: no drain, no requeue, heartbeat left to expire
        assert wa.wait(10) == -signal.SIGKILL
        expiry_ms = _heartbeat_expiry_ms(r, "wa")
        _wait(lambda: _pending_by_consumer(r).get("wa", 0) == 0, 60, "wa's entries claimed", wb)
        offsets = _assert_claimed_after_expiry(r, "wb", expiry_ms)
        results = [client.result(rid, timeout_s=120) for rid in ids]
    print(f"\nkill -9 → claimed {max(offsets)} ms after the heartbeat expired ({held_by_wa})")
    assert sum(res.worker == "wb" for res in results) >= held_by_wa
    _assert_answered_once(r, ids, results, 300)
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
    them. Twelve requests, all pulled and some held by each host (the split depends on who
    pulls first and on the shared engine's queue); SIGTERM drains both and the worker exits
    clean."""
    r = redis.Redis.from_url(redis_url)
    w = spawn_worker(redis_url, "wm", "--host-processes", "2", "--grace-period-s", "60")
    _wait(lambda: _ready(r, "wm", "wm.1"), 120, "both host processes", w)
    beats = [_heartbeat(r, "wm") or {}, _heartbeat(r, "wm.1") or {}]
    assert beats[0]["pid"] == w.proc.pid and beats[1]["pid"] != w.proc.pid
    with SyncChatClient(redis_url) as client:
        ids = _submit_long(client, max_tokens=200)
        _wait(lambda: _all_delivered(r) and _each_holds(r, "wm", "wm.1"), 60, "both hosts busy", w)
        w.signal(signal.SIGTERM)
        assert w.wait(60) == 0, w.log()[-3000:]
        results = [client.result(rid, timeout_s=5) for rid in ids]
    assert {res.worker for res in results} == {"wm", "wm.1"}
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
        # More than all three consumers may hold together (wb 12, wa and wa.1 6 each): each
        # of them gets work, however late it reads.
        ids = _submit_long(client, n=30, max_tokens=300)
        _wait_generating(r, "wa.1", wa, wb, engine_hosts=("wa", "wa.1"))
        pid = int((_heartbeat(r, "wa.1") or {})["pid"])
        os.kill(pid, signal.SIGKILL)
        assert wa.wait(60) == 1, wa.log()[-3000:]
        # Host 0 left too, deleting its own beat on the way out (its entries may be claimed
        # at once, before this reads the clock: no order check); the killed host's expires.
        expiry_ms = _heartbeat_expiry_ms(r, "wa", "wa.1")
        _wait(
            lambda: not {"wa", "wa.1"} & set(_pending_by_consumer(r)),
            60,
            "wa's entries claimed",
            wb,
        )
        offsets = _assert_claimed_after_expiry(r, "wb", expiry_ms, check_order=False)
        results = [client.result(rid, timeout_s=120) for rid in ids]
    print(f"\nkill -9 of a host process → claimed {max(offsets)} ms after the beats expired")
    _assert_answered_once(r, ids, results, 300)


def test_kill_9_of_the_engine_child_ends_the_worker_and_another_answers_everything_once(
    redis_url: str, spawn_worker: Callable[..., WorkerProcess]
) -> None:
    """The engine process killed mid-batch: its worker notices (the pipe closes), exits
    non-zero without acknowledging anything, and a worker started afterwards claims every
    entry and answers each once."""
    r = redis.Redis.from_url(redis_url)
    we = spawn_worker(redis_url, "we")
    _wait(lambda: _ready(r, "we"), 120, "we", we)
    with SyncChatClient(redis_url) as client:
        ids = _submit_long(client, n=6)
        _wait_generating(r, "we", we)
        found = re.search(r"worker we serving \S+ \(engine pid (\d+)\)", we.log())
        assert found is not None, we.log()[-3000:]
        os.kill(int(found.group(1)), signal.SIGKILL)
        assert we.wait(60) == 1, we.log()[-3000:]
        assert all(_finals(r, rid) == [] for rid in ids)  # nothing answered, nothing lost
        assert sum(_pending_by_consumer(r).values()) + sum(
            r.xlen(lane) - (r.xpending(lane, GROUP) or {}).get("pending", 0)
            for lane in KEYS.request_lanes(MODEL)
        ) == len(ids)
        spawn_worker(redis_url, "wf")
        results = [client.result(rid, timeout_s=180) for rid in ids]
    assert all(res.worker == "wf" for res in results)
    _assert_answered_once(r, ids, results, 600)


def test_enqueue_and_status_commands(
    tiny_worker: ThreadWorker, redis_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    chats = tmp_path / "chats.jsonl"
    chats.write_text(
        json.dumps({"prompt": "Where is my refund?", "max_tokens": 3, "ignore_eos": True})
        + "\n"
        + json.dumps({"messages": USER_HI, "priority": "high", "ignore_eos": True})
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
    assert len(lines) == 3 and all(x["worker"] == "tw" for x in lines)
    # The file's lines ignore EOS: exactly their own max_tokens (3), or the option's (4).
    assert [(x["completion_tokens"], x["finish_reason"]) for x in lines[1:]] == [
        (3, "length"),
        (4, "length"),
    ]
    # The argument's chat may stop early, but then only on EOS.
    first = lines[0]
    assert 0 < first["completion_tokens"] <= 4 and first["prompt_tokens"] > 0
    assert first["finish_reason"] == "stop" or first["completion_tokens"] == 4, first

    # The flush at the start of this test removed the heartbeat; it is back within a beat.
    _wait(lambda: _ready(redis.Redis.from_url(redis_url), "tw"), 30, "heartbeat")
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
