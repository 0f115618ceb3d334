"""examples/node: a Node producer (ioredis + @msgpack/msgpack) speaking the Redis contract to
a real worker on the tiny checkpoint: multi-byte chats streamed and answered, an idempotency
key resolving to the same requests, the backlog refusal past the bound (its cost counted
in UTF-8 bytes by ENQUEUE, not in JavaScript's UTF-16 units), and the backlog back to 0."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from producer import ChatClient
from producer.contract.keys import Keys
from tests.workers.conftest import MODEL, ThreadWorker, tiny_settings, tiny_worker  # noqa: F401

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"
KEYS = Keys()
CHATS = ["Où est ma commande ? 🚚📦", "你好，我的订单什么时候到？", "Danke schön! ✨"]


def cost(content: str, max_tokens: int) -> int:
    """docs/protocol.md's rule for one user message."""
    return len(content.encode("utf-8")) // 4 + 8 + max_tokens


def run_node(redis_url: str, *args: str) -> list[dict[str, Any]]:
    node = shutil.which("node")
    assert node is not None, "node is not installed (scripts/setup.sh needs Node and npm)"
    assert (EXAMPLE / "node_modules").is_dir(), "run scripts/setup.sh (npm ci in examples/node)"
    proc = subprocess.run(
        [node, "producer.mjs", "--redis", redis_url, "--model", MODEL, *args],
        cwd=EXAMPLE,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def by_event(events: list[dict[str, Any]], name: str) -> dict[int, dict[str, Any]]:
    return {e["n"]: e for e in events if e["event"] == name}


async def test_node_producer_streams_answers_and_resubmits_idempotently(
    tiny_worker: ThreadWorker,  # noqa: F811
    redis_url: str,
    redis_client: Any,
) -> None:
    chats = [arg for chat in CHATS[:2] for arg in ("--chat", chat)]
    args = [*chats, "--stream", "--max-tokens", "6", "--idempotency-key", "order-77"]
    events = run_node(redis_url, *args)
    queued, done = by_event(events, "queued"), by_event(events, "done")
    assert sorted(queued) == sorted(done) == [0, 1]
    assert not any(q["existing"] for q in queued.values())
    for n, final in done.items():
        deltas = [e["delta"] for e in events if e["event"] == "chunk" and e["n"] == n]
        assert "".join(deltas) == final["text"]
        assert [e["index"] for e in events if e["event"] == "chunk" and e["n"] == n] == list(
            range(len(deltas))
        )
        assert 0 < final["usage"]["completion_tokens"] <= 6
        assert final["finish_reason"] in ("stop", "length") and final["worker"] == "tw"
    # The Python client reads the same answers from the same result streams.
    async with ChatClient(redis_url) as client:
        for final in done.values():
            assert (await client.result(final["id"], timeout_s=5)).text == final["text"]

    again = run_node(redis_url, *args)
    requeued = by_event(again, "queued")
    assert all(q["existing"] for q in requeued.values())
    assert {n: q["id"] for n, q in requeued.items()} == {n: q["id"] for n, q in queued.items()}
    assert {n: d["text"] for n, d in by_event(again, "done").items()} == {
        n: d["text"] for n, d in done.items()
    }
    await _backlog_is_empty(redis_client)


async def test_node_producer_is_refused_past_the_backlog_bound(
    tiny_worker: ThreadWorker,  # noqa: F811
    redis_url: str,
    redis_client: Any,
) -> None:
    first, second, third = CHATS
    bound = cost(first, 4) + 1  # the first fits an empty backlog; nothing more does
    chats = [arg for chat in CHATS for arg in ("--chat", chat)]
    events = run_node(redis_url, *chats, "--max-tokens", "4", "--max-backlog-tokens", str(bound))
    assert sorted(by_event(events, "queued")) == [0] and sorted(by_event(events, "done")) == [0]
    refused = by_event(events, "queue_full")
    assert sorted(refused) == [1, 2]
    # Charged by ENQUEUE in UTF-8 bytes (你好… is 3 bytes a character, 1 UTF-16 unit).
    assert refused[1]["queued_tokens"] == cost(first, 4)
    assert refused[1]["cost_tokens"] == cost(second, 4)
    assert refused[2]["cost_tokens"] == cost(third, 4)
    assert 0.05 <= refused[1]["retry_after_s"] <= 60
    await _backlog_is_empty(redis_client)


async def _backlog_is_empty(redis_client: Any) -> None:
    """Every charge was given back: the model's backlog is at 0 tokens, 0 requests."""
    backlog = await redis_client.hgetall(KEYS.backlog(MODEL))
    assert backlog[b"tokens"] == b"0" and backlog[b"requests"] == b"0", backlog


def test_node_producer_speaks_the_partitioned_contract(
    redis_url: str, redis_client: Any, tiny_checkpoint: Any
) -> None:
    """With 2 partitions (one Redis): ids land in both, an idempotency key's request in its
    scope's partition (ENQUEUE refuses any other), every chat answered, a rerun resolved."""
    two = Keys(partitions=2)
    settings = tiny_settings(redis_url, tiny_checkpoint("llama"), name="node-p2", partitions=2)
    worker = ThreadWorker(settings).start()
    try:
        chats = [arg for i in range(6) for arg in ("--chat", f"Hello number {i}")]
        args = [*chats, "--partitions", "2", "--max-tokens", "4", "--idempotency-key", "p2"]
        events = run_node(redis_url, *args)
        done = by_event(events, "done")
        assert sorted(done) == list(range(6))
        assert {two.partition_of(d["id"]) for d in done.values()} == {0, 1}
        again = by_event(run_node(redis_url, *args), "queued")
        assert all(q["existing"] for q in again.values())
        assert {q["id"] for q in again.values()} == {d["id"] for d in done.values()}
    finally:
        worker.stop()
