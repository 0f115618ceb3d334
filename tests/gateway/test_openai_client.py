"""The official ``openai`` Python package against a real gateway, worker and Redis."""

from __future__ import annotations

import uuid

import openai
import pytest

from tests.gateway.conftest import MODEL, GatewayProcess, create_key

pytestmark = pytest.mark.timeout(180)


def _tenant() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


def _client(gateway: GatewayProcess, key: str, **kw: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, **kw)  # type: ignore[arg-type]


HELLO = [{"role": "user", "content": "Hello! Where is my order?"}]


def test_sync_completion(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, create_key(module_redis, _tenant()))
    out = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, seed=1)
    assert out.object == "chat.completion"
    assert out.model == MODEL
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert out.usage is not None
    assert out.usage.completion_tokens >= 1
    assert out.usage.prompt_tokens > 5
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    assert out.usage.prompt_tokens_details is not None
    assert out.usage.prompt_tokens_details.cached_tokens is not None
    # The same seed gives the same answer through the queue.
    again = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, seed=1)
    assert again.choices[0].message.content == choice.message.content


def test_sync_stream_with_usage(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, create_key(module_redis, _tenant()))
    full = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=12, seed=3, temperature=0.0
    )
    stream = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=12,
        seed=3,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


async def test_async_completion_and_stream(gateway: GatewayProcess, module_redis: str) -> None:
    key = create_key(module_redis, _tenant())
    async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key) as client:
        out = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_completion_tokens=6, temperature=0.0
        )
        assert out.choices[0].message.content
        assert out.usage is not None and out.usage.completion_tokens >= 1
        stream = await client.chat.completions.create(
            model=MODEL, messages=HELLO, max_completion_tokens=6, temperature=0.0, stream=True
        )
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(parts) == out.choices[0].message.content


def test_models_list(gateway: GatewayProcess, module_redis: str) -> None:
    client = _client(gateway, create_key(module_redis, _tenant()))
    models = client.models.list()
    ids = [m.id for m in models.data]
    assert ids == [MODEL]
    # the worker's heartbeat carries its engine's context length
    assert models.data[0].context_length == 2048  # type: ignore[attr-defined]
    assert client.models.retrieve(MODEL).id == MODEL


def test_errors_map_to_client_exceptions(gateway: GatewayProcess, module_redis: str) -> None:
    key = create_key(module_redis, _tenant())
    client = _client(gateway, key, max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        _client(gateway, "cq-000000000000-" + "x" * 43).chat.completions.create(
            model=MODEL, messages=HELLO
        )
    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nobody-serves-this", messages=HELLO)
    assert nf.value.code == "model_not_found"
    cases = [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"n": 17}, "n"),
        ({"temperature": 9.0}, "temperature"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
        ({"max_tokens": 0}, "max_tokens"),
        (
            {"tools": [{"type": "function", "function": {"name": "no spaces"}}]},
            "tools[0].function.name",
        ),
    ]
    for kwargs, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model=MODEL, messages=HELLO, **kwargs)  # type: ignore[call-overload]
        assert bad.value.param == param, (kwargs, bad.value.body)
        assert param in str(bad.value)


def test_rate_limit_error_and_builtin_retry(gateway: GatewayProcess, module_redis: str) -> None:
    tenant = _tenant()
    key = create_key(module_redis, tenant, rpm=60)  # one request a second, a minute's burst
    client = _client(gateway, key, max_retries=0)
    # Calls faster than one a second empty the bucket (a minute's worth), whatever the
    # machine's speed: the first refusal comes within ~60 calls.
    limited: openai.RateLimitError | None = None
    for _ in range(200):
        try:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
        except openai.RateLimitError as err:
            limited = err
            break
    assert limited is not None
    headers = limited.response.headers
    assert 0 < int(headers["retry-after-ms"]) <= 1000
    assert headers["retry-after"] == "1"
    assert limited.code == "rate_limit_exceeded"
    # The client's own retry waits as told and gets through.
    patient = _client(gateway, key, max_retries=3)
    out = patient.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1)
    assert out.choices[0].message.content is not None


ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "integer", "minimum": 0, "maximum": 999},
        "status": {"enum": ["open", "shipped", "returned"]},
    },
    "required": ["order_id", "status"],
    "additionalProperties": False,
}


def test_response_format_json_schema_is_guaranteed(
    gateway: GatewayProcess, module_redis: str
) -> None:
    """The tiny checkpoint has random weights: only constrained decoding makes this JSON."""
    import json

    client = _client(gateway, create_key(module_redis, _tenant()))
    for temperature in (0.0, 1.0):
        out = client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=60,
            temperature=temperature,
            seed=2,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "order", "schema": ORDER_SCHEMA, "strict": True},
            },
        )
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        value = json.loads(choice.message.content or "")
        assert set(value) == {"order_id", "status"}
        assert value["status"] in ("open", "shipped", "returned")


def test_penalties_bias_and_json_object_through_the_gateway(
    gateway: GatewayProcess, module_redis: str
) -> None:
    client = _client(gateway, create_key(module_redis, _tenant()))
    plain = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=8, temperature=0.0
    )
    biased = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=8,
        temperature=0.0,
        presence_penalty=1.0,
        frequency_penalty=1.0,
        logit_bias={"65": 100},  # token 65 wins every step it is allowed
        extra_body={"repetition_penalty": 1.1, "min_p": 0.05},
    )
    assert biased.choices[0].message.content != plain.choices[0].message.content
    json_object = client.chat.completions.create(
        model=MODEL,
        messages=HELLO,
        max_tokens=24,
        temperature=0.0,
        response_format={"type": "json_object"},
    )
    assert (json_object.choices[0].message.content or "").startswith("{")


def test_bad_sampling_values_are_refused_naming_the_field(
    gateway: GatewayProcess, module_redis: str
) -> None:
    client = _client(gateway, create_key(module_redis, _tenant()))
    for kwargs, param in (
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"logit_bias": {"5": 500}}, "logit_bias"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=4, **kwargs)
        assert info.value.body["param"] == param, info.value.body  # type: ignore[index]


def test_a_schema_the_worker_cannot_compile_is_refused(
    gateway: GatewayProcess, module_redis: str
) -> None:
    client = _client(gateway, create_key(module_redis, _tenant()))
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=4,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "no-such-type"}},
            },
        )
    assert "structured" in str(info.value.body), info.value.body
