"""Every script call touches one hash slot: the keys of each call layout, and the names the
scripts build from the prefix and the partition's tag, all hash to one Redis Cluster slot."""

from __future__ import annotations

from redis.crc import key_slot

from producer.contract.cancel import cancel_call
from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.enqueue import enqueue_call, idempotency_scope, scope_partition
from producer.contract.envelope import new_request_id
from producer.contract.finalize import (
    FINAL_KEYS,
    FinalBatch,
    FinalHooks,
    dead_letter_call,
    dead_letter_raw_call,
    requeue_call,
)
from producer.contract.keys import PRIORITIES, Keys, partition_tag

P = 3
KEYS = Keys("chatq", partitions=P)
MODELS = ("tiny", "other/model-7B")


def _one_slot(names: list[str]) -> int:
    slots = {key_slot(name.encode()) for name in names}
    assert len(slots) == 1, names
    return slots.pop()


def _ids(partition: int, n: int = 20) -> list[str]:
    return [new_request_id(partition, P) for _ in range(n)] + [
        rid for rid in (f"order-{i}" for i in range(200)) if KEYS.partition_of(rid) == partition
    ][:n]


def test_partition_tags_put_three_partitions_on_three_masters() -> None:
    # the slot ranges `redis-cli --cluster create` (and testkit.cluster) give 3 masters
    thirds = {key_slot(KEYS.requests("m", "high", p).encode()) * 3 // 16384 for p in range(3)}
    assert thirds == {0, 1, 2}


def test_enqueue_touches_one_slot_per_partition() -> None:
    for p in range(P):
        encoded = []
        for model in MODELS:
            for rid in _ids(p, 5):
                env = make_envelope(
                    [{"role": "user", "content": "hi"}], model=model, request_id=rid
                )
                encoded.append((env, encode_envelope(env)))
        call = enqueue_call(KEYS, None, encoded, partition=p)
        prefix, tag = call.args[4], call.args[5]
        assert tag == partition_tag(p) and call.args[6] == p and call.args[7] == P
        built = [f"{prefix}:bounds:{tag}", f"{prefix}:served:{tag}"]
        for env, _ in encoded:
            assert KEYS.partition_of(env.id) == p
            built += [f"{prefix}:{kind}:{tag}:{env.id}" for kind in ("id", "final", "res")]
            built += [f"{prefix}:req:{tag}:{env.model}:{prio}" for prio in PRIORITIES]
        assert _one_slot([*call.keys, *built]) == key_slot(KEYS.totals(p).encode())


def test_an_idempotency_scope_and_its_drawn_id_share_a_slot() -> None:
    for key in ("a", "b", "retry-42", "ünïcode"):
        scope = idempotency_scope("tiny", "tenant", key)
        p = scope_partition(scope, P)
        rid = new_request_id(p, P)
        _one_slot(
            [KEYS.idempotency(scope, p), KEYS.reservation(rid), KEYS.requests("tiny", "low", p)]
        )


def test_cancel_and_the_names_it_builds_share_the_ids_slot() -> None:
    for p in range(P):
        for rid in _ids(p):
            keys, args = cancel_call(KEYS, rid, "token")
            tag = args[5]
            built = [f"chatq:{kind}:{tag}:{rid}" for kind in ("id", "final", "cancelled")]
            _one_slot([*keys, *built, f"chatq:cancel:{tag}", KEYS.result(rid)])


def test_worker_scripts_touch_one_slot() -> None:
    for p in range(P):
        lanes = KEYS.request_lanes("tiny", p)
        _one_slot(lanes)  # PULL
        _one_slot([lanes[0], KEYS.heartbeat("w1", p), KEYS.heartbeat("w2", p)])  # RECLAIM
        _one_slot([KEYS.heartbeat("w1", p), KEYS.served(p)])  # BEAT
        _one_slot([lanes[1], KEYS.backlog("tiny", p), KEYS.totals(p)])  # PURGE
        for rid in _ids(p, 5):
            _one_slot(requeue_call(KEYS, "tiny", rid, lanes[2], "1-0", "w", b"m", 3)[0])
            _one_slot(dead_letter_call(KEYS, rid, "tiny", lanes[0], "1-0", "w", b"e", 3, [])[0])
            _one_slot(dead_letter_raw_call(KEYS, "tiny", lanes[0], "1-0", "w", 3, [])[0])
            # DEAD_REQUEUE
            _one_slot([KEYS.dead(p), lanes[0], KEYS.backlog("tiny", p), KEYS.final(rid),
                       KEYS.result(rid), KEYS.models(p), KEYS.totals(p)])  # fmt: skip


def test_finalize_many_calls_are_split_by_partition() -> None:
    batch = FinalBatch(KEYS, "w")
    sent = 0
    for p in (2, 0, 1, 0, 2):
        for rid in _ids(p, 3):
            lane = KEYS.requests("tiny", "normal", p)
            batch.add(rid, lane, "1-0", KEYS.backlog("tiny", p), "done", b"x", 1)
            sent += 1
    calls = list(batch.calls())
    assert len(calls) == batch.num_calls() == P
    assert sum((len(keys) - 1) // FINAL_KEYS for keys, _ in calls) == sent
    for keys, _ in calls:
        _one_slot(keys)  # the last key stands in for the webhook queue: no webhook here


def test_one_partition_is_todays_layout_under_one_tag() -> None:
    one = Keys("chatq")
    assert one.partition_of("anything") == 0
    assert one.result("abc") == "chatq:res:{q0}:abc"
    batch = FinalBatch(one, "w")
    hooks = FinalHooks(callback_url="https://example.test/hook", model="tiny")
    batch.add(
        "abc", one.requests("tiny", "high"), "1-0", one.backlog("tiny"), "done", b"", 1, hooks
    )
    ((keys, _),) = batch.calls()
    assert keys[-1] == one.webhook_queue  # a webhook to queue: the queue is the last key
