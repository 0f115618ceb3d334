"""The gateway charges a tenant the same cost ENQUEUE charges the backlog: the Python twin
``cost_tokens`` equals the charge ENQUEUE stores in the entry (field ``c``)."""

from __future__ import annotations

import uuid

import pytest

from producer import ChatClient
from producer.contract.enqueue import cost_tokens
from producer.contract.keys import Keys

CHATS = [
    ["Hi"],
    ["You are a shop assistant.", "Where is my order #1234? 🚚"],
    ["配送はいつですか？", "ü" * 37, ""],
]


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("contents", CHATS)
async def test_cost_twin_matches_enqueue(module_redis: str, contents: list[str], n: int) -> None:
    messages = [{"role": "user", "content": c} for c in contents]
    model = f"nobody-{uuid.uuid4().hex[:8]}"  # no worker: the entry stays in its lane
    async with ChatClient(module_redis) as client:
        await client.submit(messages, model=model, max_tokens=37, n=n)
        entries = await client.redis.xrange(Keys().requests(model, "normal"))
    charged = int(entries[0][1][b"c"])
    assert charged == cost_tokens(contents, 37, n)
    # ...and both are docs/protocol.md's rule, computed here, not by the code under test:
    # n answers share the prompt, each may take max_tokens.
    prompt = sum(len(c.encode()) for c in contents) // 4 + 8 * len(contents)
    assert charged == prompt + n * 37
