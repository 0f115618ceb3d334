"""Logprobs through the gateway with the official ``openai`` client: real HTTP, a real
worker on the tiny checkpoint, real Redis; OpenAI's shapes, streamed and not."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.gateway.conftest import MODEL, GatewayProcess, create_key

pytestmark = pytest.mark.timeout(180)

HELLO = [{"role": "user", "content": "Hello! Where is my order?"}]


def _client(gateway: GatewayProcess, redis_url: str) -> openai.OpenAI:
    key = create_key(redis_url, f"t-{uuid.uuid4().hex[:8]}")
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def test_logprobs_in_a_completion(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, module_redis)
    out = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=6, temperature=0.0,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True},
    )  # type: ignore[call-overload]  # fmt: skip
    choice = out.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    content = choice.logprobs.content
    assert len(content) == out.usage.completion_tokens == 6  # type: ignore[union-attr]
    for entry in content:
        assert entry.logprob <= 0 and entry.bytes is not None
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == values[0]  # greedy: the likeliest token
        assert entry.token == entry.top_logprobs[0].token
    text = b"".join(bytes(e.bytes or []) for e in content).decode("utf-8", errors="replace")
    assert text.startswith(choice.message.content or "")
    # Not asked for: null, as OpenAI sends it.
    plain = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert plain.choices[0].logprobs is None
    # logprobs alone: each token's own, no alternatives.
    bare = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, logprobs=True)
    assert bare.choices[0].logprobs is not None
    assert all(e.top_logprobs == [] for e in bare.choices[0].logprobs.content or [])


def test_logprobs_in_a_stream(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, module_redis)
    kwargs = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0.0,
              "logprobs": True, "top_logprobs": 2}  # fmt: skip
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    streamed = [
        e for c in chunks if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]  # fmt: skip
    assert full.choices[0].logprobs is not None
    assert streamed == full.choices[0].logprobs.content  # every token, once, in order
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content


def test_logprobs_refusals_name_the_field(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, module_redis)
    cases = [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=HELLO, **kwargs)  # type: ignore[call-overload]
        assert bad.value.param == param, (kwargs, bad.value.body)


def test_n_choices_in_a_completion(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, module_redis)
    kwargs = {"model": MODEL, "messages": HELLO, "max_tokens": 5, "temperature": 1.0,
              "seed": 9, "extra_body": {"ignore_eos": True}}  # fmt: skip
    out = client.chat.completions.create(n=3, logprobs=True, **kwargs)  # type: ignore[call-overload]
    one = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" for c in out.choices)
    assert all(len(c.logprobs.content or []) == 5 for c in out.choices)  # type: ignore[union-attr]
    assert out.choices[0].message.content == one.choices[0].message.content  # seed + 0
    assert out.usage is not None and one.usage is not None
    assert out.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt once
    assert out.usage.completion_tokens == 3 * 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + 15


def test_n_choices_in_a_stream(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, module_redis)
    kwargs = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 1.0,
              "seed": 5, "n": 2}  # fmt: skip
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    chunks = list(
        client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs
        )  # type: ignore[call-overload]
    )
    texts = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    roles = []
    for c in chunks:
        for choice in c.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.delta.role:
                roles.append(choice.index)
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert sorted(roles) == [0, 1]
    for choice in full.choices:  # same seed, same answers, each with one finish_reason
        assert texts[choice.index] == choice.message.content
        assert finishes[choice.index] == [choice.finish_reason]
    assert chunks[-1].usage is not None and full.usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_n_refusals_name_the_field(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, module_redis)
    for n in (0, 17, -1):
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=HELLO, n=n)  # type: ignore[call-overload]
        assert bad.value.param == "n", bad.value.body
        assert "[1, 16]" in str(bad.value)
