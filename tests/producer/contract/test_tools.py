"""Tools in the contract: what the envelope carries, each bad value refused naming its field
(by the validator and the JSON Schema alike), and reasoning / tool calls in results."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest

from producer.contract.codec import decode_envelope, encode_envelope, make_envelope
from producer.contract.results import Chunk, Done, decode_result, encode_result, result_fields
from producer.contract.tools import ToolCall, ToolSpec
from producer.contract.validation import validate_map
from producer.errors import ProtocolError

SCHEMA = json.loads(
    (Path(__file__).resolve().parents[3] / "docs/schema/envelope.schema.json").read_text()
)
TOOL = {
    "type": "function",
    "function": {"name": "lookup_order", "parameters": {"type": "object"}},
}
CALL = {"id": "c1", "type": "function", "function": {"name": "lookup_order", "arguments": "{}"}}
CHAT: list[dict[str, Any]] = [
    {"role": "user", "content": "Where is A1?"},
    {"role": "assistant", "content": None, "tool_calls": [CALL]},
    {"role": "tool", "content": "shipped", "tool_call_id": "c1"},
]


def test_openai_shaped_tools_and_calls_travel_in_the_wire_shape() -> None:
    env = make_envelope(
        CHAT,
        model="m",
        tools=[TOOL],
        tool_choice={"type": "function", "function": {"name": "lookup_order"}},
        chat_template_kwargs={"enable_thinking": False},
    )
    assert env.tools == (ToolSpec("lookup_order", "", {"type": "object"}),)
    assert env.messages[1].tool_calls == (ToolCall("c1", "lookup_order", "{}"),)
    assert env.messages[1].content == ""
    assert env.messages[2].tool_call_id == "c1"
    wire = env.to_wire()
    assert wire["tools"] == [{"name": "lookup_order", "parameters": {"type": "object"}}]
    assert wire["tool_choice"] == {"name": "lookup_order"}
    assert wire["messages"][1]["tool_calls"] == [
        {"id": "c1", "name": "lookup_order", "arguments": "{}"}
    ]
    jsonschema.validate(wire, SCHEMA)
    assert decode_envelope(encode_envelope(env)) == env
    assert not env.plain and make_envelope(CHAT[:1], model="m").plain


def _wire(**changes: Any) -> dict[str, Any]:
    wire = make_envelope(CHAT, model="m", tools=[TOOL]).to_wire()
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"tools": [{"name": "bad name"}]}, "tools[0].name"),
        ({"tools": [{"name": "f", "kind": 1}]}, "tools[0]"),
        ({"tools": [{"name": "f"}, {"name": "f"}]}, "tools[1].name"),  # not in the schema
        ({"tools": [{"name": "f", "parameters": []}]}, "tools[0].parameters"),
        ({"tool_choice": "always"}, "tool_choice"),
        ({"tool_choice": {"name": "other"}}, "tool_choice.name"),  # not in the schema
        ({"tools": [], "tool_choice": "required"}, "tool_choice"),  # not in the schema
        ({"chat_template_kwargs": {"x": [1]}}, "chat_template_kwargs.x"),
        ({"chat_template_kwargs": {"tools": 1}}, "chat_template_kwargs.tools"),
        ({"chat_template_kwargs": {"1x": 1}}, "chat_template_kwargs"),
    ],
)  # fmt: skip
def test_bad_tool_fields_are_refused_naming_them(changes: dict[str, Any], field: str) -> None:
    wire = _wire(**changes)
    with pytest.raises(ProtocolError) as info:
        validate_map(wire)
    assert info.value.field == field
    # Rules across fields (unique names, a choice among the tools) are the validator's own
    # (docs/protocol.md lists them); the schema refuses the rest.
    if field not in ("tools[1].name", "tool_choice.name", "tool_choice"):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wire, SCHEMA)


@pytest.mark.parametrize(
    ("message", "field"),
    [
        ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls"),
        ({"role": "assistant", "content": "", "tool_calls": [{"id": "c"}]},
         "messages[0].tool_calls[0]"),
        ({"role": "assistant", "content": "", "tool_calls": [
            {"id": "c", "name": "f", "arguments": 3}]}, "messages[0].tool_calls[0].arguments"),
        ({"role": "user", "content": "x", "tool_call_id": "c1"}, "messages[0].tool_call_id"),
        ({"role": "tool", "content": "x", "tool_call_id": "a b"}, "messages[0].tool_call_id"),
    ],
)  # fmt: skip
def test_bad_tool_messages_are_refused_naming_them(message: dict[str, Any], field: str) -> None:
    wire = _wire(messages=[message])
    with pytest.raises(ProtocolError) as info:
        validate_map(wire)
    assert info.value.field == field
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(wire, SCHEMA)


def test_reasoning_and_tool_calls_round_trip_in_results() -> None:
    call = ToolCall("call_1", "lookup_order", '{"order_id": "A1"}')
    entries = [
        Chunk(0, "", reasoning="thinking", tool_calls=(call,)),
        Done("Done.", "tool_calls", reasoning_content="why", tool_calls=(call,)),
    ]
    for entry in entries:
        assert result_fields(entry) == encode_result(entry)
        assert decode_result(encode_result(entry)) == entry
    # Empty parts are left out: a plain result's bytes are what they always were.
    plain = msgpack.unpackb(encode_result(Done("x", "stop"))["m"])
    assert "tool_calls" not in plain and "reasoning_content" not in plain
    bad = {"t": b"done", "m": msgpack.packb({"text": "", "finish_reason": "stop",
                                             "tool_calls": [{"id": 1}]})}  # fmt: skip
    with pytest.raises(ProtocolError) as info:
        decode_result(bad)
    assert info.value.field == "tool_calls[0]"
