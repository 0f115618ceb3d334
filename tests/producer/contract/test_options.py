"""SubmitOptions: one options type for submit, submit_many and chat in both clients, its
sampling part the engine's own SamplingParams; keywords are read in one place."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from gpu_engine.sequence import SamplingParams
from producer import ChatClient, ProtocolError, SyncChatClient
from producer.contract.codec import decode_envelope, make_envelope
from producer.contract.keys import STREAM_FIELD, Keys
from producer.contract.options import SubmitOptions

KEYS = Keys()
CHAT = [{"role": "user", "content": "Wo ist meine Bestellung? 📦"}]
OPTIONS = SubmitOptions(
    model="tiny",
    params=SamplingParams(max_tokens=12, temperature=0.3, stop=("END",), seed=5),
    priority="high",
    stream=True,
    tenant="acme",
)


def test_keywords_and_options_make_the_same_envelope() -> None:
    by_options = make_envelope(CHAT, OPTIONS, request_id="r1")
    by_keywords = make_envelope(
        CHAT,
        model="tiny",
        max_tokens=12,
        temperature=0.3,
        stop="END",
        seed=5,
        priority="high",
        stream=True,
        tenant="acme",
        request_id="r1",
    )
    assert replace(by_options, created_ms=0) == replace(by_keywords, created_ms=0)
    assert by_options.params == OPTIONS.params  # the engine's type, carried as it is


def test_keywords_override_the_options_they_name() -> None:
    env = make_envelope(CHAT, OPTIONS, max_tokens=3, priority="low")
    assert env.params == replace(OPTIONS.params, max_tokens=3) and env.priority == "low"
    assert env.params.seed == 5 and env.stream  # the rest kept


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"model": "m", "beam_width": 4}, "beam_width"),
        ({"max_tokens": 5}, "model"),
        ({"model": "m", "stop": 5}, "stop"),
        ({"model": "m", "max_tokens": 0}, "params.max_tokens"),
        ({"model": "m", "deadline_s": 0}, "deadline_s"),
        ({"model": "m", "n": 17}, "params.n"),
        ({"model": "m", "logprobs": 21}, "params.logprobs"),
        ({"model": "m", "presence_penalty": 3.0}, "params.presence_penalty"),
    ],
)
def test_a_bad_option_is_refused_naming_it(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ProtocolError) as info:
        make_envelope(CHAT, **kwargs)
    assert info.value.field == field


async def _queued(redis_client: Any, priority: str) -> list[Any]:
    entries = await redis_client.xrange(KEYS.requests("tiny", priority))
    return [decode_envelope(fields[STREAM_FIELD.encode()]) for _, fields in entries]


async def test_both_clients_and_submit_many_take_submit_options(
    redis_url: str, redis_client: Any
) -> None:
    async with ChatClient(redis_url) as client:
        await client.submit(CHAT, OPTIONS)
        await client.submit_many([CHAT, {"messages": CHAT, "max_tokens": 4}], OPTIONS)
    with SyncChatClient(redis_url) as sync:
        sync.submit(CHAT, OPTIONS, temperature=0.0)
        sync.submit_many([CHAT], OPTIONS)
    envs = await _queued(redis_client, "high")
    assert len(envs) == 5
    assert [e.params.max_tokens for e in envs] == [12, 12, 4, 12, 12]
    assert [e.params.temperature for e in envs] == [0.3, 0.3, 0.3, 0.0, 0.3]
    assert all(e.stream and e.tenant == "acme" and e.params.stop == ("END",) for e in envs)
