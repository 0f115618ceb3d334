"""``chatq result``, ``chatq purge``, ``chatq dead ...`` and ``chatq status``'s live workers,
against a real Redis and a real worker on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from producer import ChatClient, RequestFailed, ResultTimeout, SyncChatClient
from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.keys import GROUP, STREAM_FIELD, Keys
from producer.contract.reservation import reservation_value
from tests.workers.conftest import MODEL, ThreadWorker, tiny_settings
from workers.cli import main
from workers.reclaim import Reclaimer

KEYS = Keys()
DEAD_MODEL = "tiny-dead"
FAST_TTL_S = 0.3  # short heartbeats: a reclaimer may claim after seeing Redis healthy this long
USER = [{"role": "user", "content": "Is my refund done?"}]


def _wait_heartbeat(url: str, name: str, timeout_s: float = 10.0) -> None:
    """The test's flush removed it; the worker beats it back within one interval."""
    r = redis.Redis.from_url(url)
    deadline = time.monotonic() + timeout_s
    while r.get(KEYS.heartbeat(name)) is None:
        assert time.monotonic() < deadline, "no heartbeat"
        time.sleep(0.05)


def test_result_by_id_and_status_lists_live_workers(
    tiny_worker: ThreadWorker, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _wait_heartbeat(redis_url, "tw")
    assert main(["status", "--redis", redis_url]) == 0
    out = capsys.readouterr().out
    assert "no requests queued yet" in out and "live workers" in out
    (row,) = [line.split() for line in out.splitlines() if line.startswith("tw ")]
    assert row[1:4] == [MODEL, "cpu", "serving"] and "of" in row  # KV used: N% of total

    argv = ["enqueue", "--redis", redis_url, "--model", MODEL, "--max-tokens", "4"]
    assert main([*argv, "--no-wait", "Where is my parcel?"]) == 0
    (rid,) = capsys.readouterr().out.split()
    assert main(["result", rid, "--redis", redis_url, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["id"] == rid and res["worker"] == "tw" and 1 <= res["completion_tokens"] <= 4
    assert main(["result", rid, "--redis", redis_url, "--stream"]) == 0
    assert capsys.readouterr().out.strip() == res["text"].strip()
    assert main(["result", "never-queued-id", "--redis", redis_url, "--timeout-s", "0"]) == 2
    assert "no result for never-queued-id" in capsys.readouterr().err


def test_cancel_by_id_and_token(
    tiny_worker: ThreadWorker, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chatq cancel`: 0 cancelled, 1 already finished, 3 no such request (nothing written),
    2 a wrong token; the token comes from `chatq enqueue --no-wait --json`."""
    r = redis.Redis.from_url(redis_url)
    argv = ["enqueue", "--redis", redis_url, "--max-tokens", "4", "--no-wait", "--json"]
    assert main([*argv, "--model", "stranded", "--allow-unserved", "Where is it?"]) == 0
    queued = json.loads(capsys.readouterr().out)
    assert main([*argv, "--model", MODEL, "Where is my parcel?"]) == 0
    answered = json.loads(capsys.readouterr().out)
    assert main(["result", answered["id"], "--redis", redis_url]) == 0
    capsys.readouterr()

    def cancel(rid: str, token: str) -> tuple[int, str]:
        code = main(["cancel", rid, "--token", token, "--redis", redis_url])
        out, err = capsys.readouterr()
        return code, out + err

    assert cancel(queued["id"], queued["cancel_token"]) == (0, f"cancelled {queued['id']}\n")
    assert r.get(KEYS.cancelled(queued["id"])) == queued["cancel_token"].encode()
    code, said = cancel(queued["id"], "not-the-token")
    assert code == 2 and "not_owner" in said and "cancel_token" in said
    code, said = cancel(answered["id"], answered["cancel_token"])
    assert code == 1 and "already has its final result" in said
    code, said = cancel("never-queued", "some-token")
    assert code == 3 and "no request 'never-queued'" in said
    assert r.exists(KEYS.cancelled(answered["id"]), KEYS.cancelled("never-queued")) == 0
    assert r.xlen(KEYS.cancel()) == 1  # the one cancel


def test_purge_drops_queued_requests_and_tells_their_requesters(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    r = redis.Redis.from_url(redis_url)
    lane = KEYS.requests("stranded", "normal")
    with SyncChatClient(redis_url, allow_unserved=True) as client:
        rids = [client.submit(USER, model="stranded", max_tokens=8) for _ in range(3)]
        client.submit(USER, model="stranded", max_tokens=8, priority="high")
        # One entry is held by a (dead) worker: pending ones stay for the reclaimers.
        r.xgroup_create(lane, GROUP, id="0")
        r.xreadgroup(GROUP, "w-gone", {lane: ">"}, count=1)
        argv = ["purge", "stranded", "--redis", redis_url, "--lane", "normal"]
        assert main(argv) == 2  # not a terminal and no --yes: it would ask, so it refuses
        assert "--yes" in capsys.readouterr().err
        assert main([*argv, "--yes"]) == 0
        assert "purged 2 queued requests" in capsys.readouterr().out
        for rid in rids[1:]:
            with pytest.raises(RequestFailed) as info:
                client.result(rid, timeout_s=1)
            assert info.value.code == "cancelled" and "chatq purge" in info.value.message
    assert r.xlen(lane) == 1  # the pending one
    assert r.xlen(KEYS.requests("stranded", "high")) == 1  # the other lane is kept
    assert r.hget(KEYS.backlog("stranded"), "requests") == b"2"  # pending + high
    # The all-models total (ENQUEUE's total bound) gives the purged cost back too.
    assert r.hget(KEYS.totals(), "tokens") == r.hget(KEYS.backlog("stranded"), "tokens")
    assert main(["purge", "stranded", "--redis", redis_url, "--yes", "--lane", "normal"]) == 0
    assert "nothing queued" in capsys.readouterr().out


async def _dead_letter(redis_url: str, model: str) -> str:
    """A request that 'killed' three workers, dead-lettered by the real reclaim path."""
    r = aioredis.Redis.from_url(redis_url)
    async with ChatClient(redis_url, allow_unserved=True) as client:
        rid = await client.submit(USER, model=model, max_tokens=4)
    lane = KEYS.requests(model, "normal")
    await r.xgroup_create(lane, GROUP, id="0")
    await r.xreadgroup(GROUP, "w0", {lane: ">"}, count=1)
    for holder in ("w1", "w2", "w3"):
        rec = Reclaimer(r, KEYS, holder, max_deliveries=3, heartbeat_ttl_s=FAST_TTL_S)
        while not rec.may_reclaim():  # it claims once it saw Redis healthy for a TTL
            await rec.beat({})
            await asyncio.sleep(FAST_TTL_S / 4)
        await rec.reclaim(model)
        await rec.retire()  # "killed" while running it
    await r.aclose()
    return rid


def test_dead_letters_list_show_requeue_drop(
    redis_url: str, tiny_checkpoint: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    r = redis.Redis.from_url(redis_url)
    rid = asyncio.run(_dead_letter(redis_url, DEAD_MODEL))  # a model no worker serves yet
    other = asyncio.run(_dead_letter(redis_url, "gone-model"))
    base = ["dead", "--redis", redis_url]
    assert main([*base, "list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {d["request_id"] for d in listed} == {rid, other}
    assert main([*base, "show", rid]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["messages"] == USER and shown["params"]["max_tokens"] == 4

    assert main([*base, "drop", other]) == 0
    assert main([*base, "drop", other]) == 2  # gone
    assert "no dead letter" in capsys.readouterr().err
    # Requeued, it runs again under the same id on a live worker.
    assert main([*base, "requeue", rid]) == 0
    settings = tiny_settings(
        redis_url, tiny_checkpoint("llama"), name="dl", served_model_name=DEAD_MODEL
    )
    handle = ThreadWorker(settings).start()
    try:
        with SyncChatClient(redis_url) as client:
            res = client.result(rid, timeout_s=60)
    finally:
        handle.stop()
    assert res.worker == "dl" and res.usage.completion_tokens >= 1
    assert r.xlen(KEYS.dead()) == 0 and r.hget(KEYS.backlog(DEAD_MODEL), "dead") == b"0"
    # Charged again on requeue (both letters' charges went back when they were buried),
    # given back at its final: the all-models totals are empty again.
    assert r.hget(KEYS.totals(), "tokens") == b"0" and r.hget(KEYS.totals(), "models") == b"0"


def _parked(r: redis.Redis, count: int, timeout_s: float = 30.0) -> str:
    """The newest dead letter's entry id, once there are ``count``."""
    deadline = time.monotonic() + timeout_s
    while r.xlen(KEYS.dead()) < count:
        assert time.monotonic() < deadline, "nothing parked in the dead letters"
        time.sleep(0.05)
    ((entry_id, _),) = r.xrevrange(KEYS.dead(), count=1)
    return entry_id.decode()


def test_dead_requeue_refuses_a_copy_added_by_hand(
    tiny_worker: ThreadWorker, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """#17: a producer adds, with raw XADD, an envelope carrying a victim's id; the worker
    parks it in the dead letters. `chatq dead requeue` of that letter moved the victim's
    reservation to the copy, which then answered under the victim's id (and, for an
    answered victim, deleted its answer first). Now it is refused and changes nothing,
    whether the victim is still queued or answered."""
    r = redis.Redis.from_url(redis_url)
    with SyncChatClient(redis_url, allow_unserved=True) as client:
        queued = client.submit(USER, model="stranded", max_tokens=4)  # nobody serves it
        answered = client.submit(USER, model=MODEL, max_tokens=4)
        answer = client.result(answered, timeout_s=60)
        totals = r.hgetall(KEYS.totals())
        for n, victim in enumerate((queued, answered), start=1):
            reservation = r.get(KEYS.reservation(victim))
            forged = make_envelope([{"role": "user", "content": "FORGED ANSWER please"}],
                                   model=MODEL, request_id=str(victim), max_tokens=4)  # fmt: skip
            r.xadd(KEYS.requests(MODEL, "high"), {STREAM_FIELD: encode_envelope(forged)})
            letter = _parked(r, n)
            assert main(["dead", "--redis", redis_url, "requeue", letter]) == 2
            said = capsys.readouterr().err
            assert f"not the entry request {str(victim)!r} was queued as" in said
            assert r.get(KEYS.reservation(victim)) == reservation
            assert r.xlen(KEYS.dead()) == n  # kept, for the operator to look at and drop
        assert r.xlen(KEYS.requests("stranded", "normal")) == 1  # the victim's own entry
        assert r.exists(KEYS.result(queued), KEYS.final(queued)) == 0
        assert client.result(answered, timeout_s=0.1).text == answer.text
        kinds = [f[b"t"] for _, f in r.xrange(KEYS.result(answered))]
        assert kinds.count(b"done") == 1 and b"error" not in kinds
        assert r.hgetall(KEYS.totals()) == totals  # nothing charged
    assert r.xlen(KEYS.requests(MODEL, "high")) == 0


def test_dead_requeue_when_the_reservation_is_gone(
    tiny_worker: ThreadWorker, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reservation expires with its request's result (a dead letter older than that): a
    letter a worker recorded as the request's own is requeued under a new reservation (no
    cancel token); a parked entry whose id nobody reserved is refused and reserves nothing."""
    r = redis.Redis.from_url(redis_url)
    rid = asyncio.run(_dead_letter(redis_url, "gone-model"))
    r.delete(KEYS.reservation(rid))
    assert main(["dead", "--redis", redis_url, "requeue", rid]) == 0
    ((entry_id, _),) = r.xrange(KEYS.requests("gone-model", "normal"))
    lane = KEYS.requests("gone-model", "normal")
    assert r.get(KEYS.reservation(rid)) == reservation_value(lane, entry_id.decode()).encode()
    forged = make_envelope(USER, model=MODEL, request_id="nobody-reserved-it", max_tokens=4)
    r.xadd(KEYS.requests(MODEL, "normal"), {STREAM_FIELD: encode_envelope(forged)})
    letter = _parked(r, 1)
    assert main(["dead", "--redis", redis_url, "requeue", letter]) == 2
    assert "not the entry request 'nobody-reserved-it'" in capsys.readouterr().err
    assert r.exists(KEYS.reservation("nobody-reserved-it")) == 0
    assert r.xlen(KEYS.requests(MODEL, "normal")) == 0


def test_purge_of_a_copy_added_by_hand_leaves_the_victim_alone(
    redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """#17: a producer adds, with raw XADD, a copy of a victim's id (with a made-up cost) to
    another lane of the victim's model, under the victim's own stream id (read from the
    reservation). Purging that lane cancelled the victim (its final went to the victim's id)
    and took the made-up cost off the counters. Now the copy is dropped without either: the
    victim stays queued, its charge stays counted."""
    r = redis.Redis.from_url(redis_url)
    with SyncChatClient(redis_url, allow_unserved=True) as client:
        victim = client.submit(USER, model="stranded", max_tokens=8)
        forged = make_envelope(USER, model="stranded", request_id=str(victim), max_tokens=8)
        high = KEYS.requests("stranded", "high")
        entry_id = r.get(KEYS.reservation(victim)).split(b" ")[0].rsplit(b"/", 1)[1]
        r.xadd(high, {STREAM_FIELD: encode_envelope(forged), "c": 10**9}, id=entry_id)
        counters = [r.hgetall(KEYS.backlog("stranded")), r.hgetall(KEYS.totals())]
        assert main(["purge", "stranded", "--redis", redis_url, "--lane", "high", "--yes"]) == 0
        said = capsys.readouterr().out
        assert "purged 0 queued requests" in said and "dropped 1 entries added without" in said
        assert r.xlen(high) == 0
        assert [r.hgetall(KEYS.backlog("stranded")), r.hgetall(KEYS.totals())] == counters
        assert r.exists(KEYS.final(victim), KEYS.result(victim)) == 0
        assert r.xlen(KEYS.requests("stranded", "normal")) == 1  # the victim's own entry
        with pytest.raises(ResultTimeout):
            client.result(victim, timeout_s=0.2)
