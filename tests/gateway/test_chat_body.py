"""The OpenAI body → submit options mapping: every field used, neutral, or refused by name."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.chat_body import parse_chat_body
from gateway.errors import Code, GatewayError

BASE: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def parse(**fields: Any) -> Any:
    return parse_chat_body({**BASE, **fields}, default_max_tokens=64)


def refused(body: dict[str, Any]) -> GatewayError:
    with pytest.raises(GatewayError) as err:
        parse_chat_body(body, default_max_tokens=64)
    assert err.value.answer.status == 400
    return err.value


def test_maps_fields_onto_submit_options() -> None:
    chat = parse(
        max_completion_tokens=9,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["x"],
        user="u1",
        priority="high",
        deadline_s=5,
        top_k=3,
        ignore_eos=True,
        n=1,
        presence_penalty=0,
        frequency_penalty=0.0,
        logprobs=False,
        response_format={"type": "text"},
        tools=None,
    )
    assert chat.options == {
        "model": "m",
        "max_tokens": 9,
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["x"],
        "priority": "high",
        "deadline_s": 5,
        "top_k": 3,
        "ignore_eos": True,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
    }
    assert chat.user == "u1" and not chat.stream
    assert chat.param_names["params.max_tokens"] == "max_completion_tokens"
    assert parse().options["max_tokens"] == 64


def test_n_becomes_the_n_option() -> None:
    assert parse(n=16).options["n"] == 16 and parse(n=16).n == 16
    assert "n" not in parse(n=1).options and parse().n == 1


def test_logprobs_and_top_logprobs_become_the_logprobs_option() -> None:
    """``logprobs: true`` asks for the chosen tokens' log probabilities (0 alternatives),
    ``top_logprobs`` (0-20, only with it) for that many alternatives per token."""
    assert parse(logprobs=True, top_logprobs=20).options["logprobs"] == 20
    assert parse(logprobs=True).options["logprobs"] == 0
    assert parse(logprobs=True).logprobs
    for off in (parse(logprobs=False), parse(logprobs=None), parse()):
        assert "logprobs" not in off.options and not off.logprobs
    err = refused({**BASE, "top_logprobs": 2})
    assert err.param == "top_logprobs" and "requires logprobs: true" in err.message


def test_sampling_extras_and_response_format_become_submit_options() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    chat = parse(
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.2,
        min_p=0.1,
        stop_token_ids=[7],
        logit_bias={"12": -100},
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
    )
    opts = chat.options
    assert opts["presence_penalty"] == 0.5 and opts["frequency_penalty"] == -0.5
    assert opts["repetition_penalty"] == 1.2 and opts["min_p"] == 0.1
    assert opts["stop_token_ids"] == [7] and opts["logit_bias"] == {"12": -100}
    assert opts["structured"]["kind"] == "json"
    assert json.loads(opts["structured"]["spec"]) == schema
    any_object = parse(response_format={"type": "json_object"}).options["structured"]
    assert any_object == {"kind": "json", "spec": ""}
    assert "structured" not in parse(response_format={"type": "text"}).options


def test_messages_roles_and_text_parts() -> None:
    chat = parse(
        messages=[
            {"role": "developer", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": "ok", "name": None},
        ]
    )
    assert chat.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "ok"},
    ]


def test_tools_calls_and_tool_messages_become_submit_options() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    chat = parse(
        messages=[
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "42", "tool_call_id": "c1"},
        ],
        tools=[{"type": "function", "function": {"name": "f", "strict": False}}],
        tool_choice="auto",
        parallel_tool_calls=True,
        chat_template_kwargs={"enable_thinking": False},
    )
    assert chat.messages[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert chat.options["tools"] == [{"type": "function", "function": {"name": "f"}}]
    assert chat.options["tool_choice"] == "auto"
    assert chat.options["chat_template_kwargs"] == {"enable_thinking": False}
    # The contract's paths are named as the body names them.
    assert chat.param_names["tools[0].name"] == "tools[0].function.name"
    assert chat.param_names["messages[1].tool_calls[0].name"] == (
        "messages[1].tool_calls[0].function.name"
    )


@pytest.mark.parametrize(
    ("fields", "param", "code"),
    [
        ({"n": 0}, "n", Code.INVALID_REQUEST),
        ({"n": 17}, "n", Code.INVALID_REQUEST),
        ({"n": 2.0}, "n", Code.INVALID_REQUEST),
        ({"n": True}, "n", Code.INVALID_REQUEST),
        ({"logprobs": "yes"}, "logprobs", Code.INVALID_REQUEST),
        ({"top_logprobs": 3}, "top_logprobs", Code.INVALID_REQUEST),
        ({"logprobs": False, "top_logprobs": 3}, "top_logprobs", Code.INVALID_REQUEST),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", Code.INVALID_REQUEST),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", Code.INVALID_REQUEST),
        ({"logprobs": True, "top_logprobs": True}, "top_logprobs", Code.INVALID_REQUEST),
        ({"response_format": {"type": "yaml"}}, "response_format.type", Code.UNSUPPORTED_FIELD),
        ({"response_format": "json"}, "response_format", Code.INVALID_REQUEST),
        (
            {"response_format": {"type": "json_schema"}},
            "response_format.json_schema",
            Code.INVALID_REQUEST,
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            Code.INVALID_REQUEST,
        ),
        ({"logit_bias": {"a": 1}}, "logit_bias", Code.INVALID_REQUEST),
        ({"parallel_tool_calls": False}, "parallel_tool_calls", Code.UNSUPPORTED_FIELD),
        ({"tools": {"type": "function"}}, "tools", Code.INVALID_REQUEST),
        (
            {"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]},
            "tools[0].function.strict",
            Code.UNSUPPORTED_FIELD,
        ),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
            "messages[0].tool_calls",
            Code.UNSUPPORTED_FIELD,
        ),
        ({"store": True}, "store", Code.UNSUPPORTED_FIELD),
        (
            {"max_tokens": 5, "max_completion_tokens": 6},
            "max_completion_tokens",
            Code.INVALID_REQUEST,
        ),
        ({"stream": "yes"}, "stream", Code.INVALID_REQUEST),
        ({"stream_options": {"include_usage": True}}, "stream_options", Code.INVALID_REQUEST),
        ({"stream": True, "stream_options": {"x": 1}}, "stream_options.x", Code.UNSUPPORTED_FIELD),
        ({"stop": 5}, "stop", Code.INVALID_REQUEST),
        ({"user": 5}, "user", Code.INVALID_REQUEST),
        ({"model": ""}, "model", Code.INVALID_REQUEST),
        ({"messages": []}, "messages", Code.INVALID_REQUEST),
        (
            {"messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            Code.INVALID_REQUEST,
        ),
        (
            {"messages": [{"role": "user", "content": "x", "name": "bob"}]},
            "messages[0].name",
            Code.UNSUPPORTED_FIELD,
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages[0].content[0].type",
            Code.UNSUPPORTED_FIELD,
        ),
        (
            {"messages": [{"role": "user", "content": 3}]},
            "messages[0].content",
            Code.INVALID_REQUEST,
        ),
    ],
)
def test_refusals_name_the_field(fields: dict[str, Any], param: str, code: Code) -> None:
    err = refused({**BASE, **fields})
    assert err.param == param
    assert err.code is code
    assert param in err.body()["error"]["message"]  # type: ignore[index]


def test_stream_options() -> None:
    chat = parse(stream=True, stream_options={"include_usage": True})
    assert chat.stream and chat.include_usage


def test_extra_fields_only_where_allowed() -> None:
    assert refused({**BASE, "callback_url": "https://x"}).param == "callback_url"
    chat = parse_chat_body(
        {**BASE, "callback_url": "https://x"},
        default_max_tokens=1,
        extra_fields={"callback_url": str},
    )
    assert chat.options["callback_url"] == "https://x"
