"""Tool-call parsers for each supported format: calls out of the answer text as it streams,
text that is not a valid call kept as text, and the format chosen from the chat template."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from testkit.checkpoints import CHATML_TEMPLATE, HERMES_TEMPLATE, LLAMA3_JSON_TEMPLATE
from workers.tool_calls import (
    HermesParser,
    Llama3JsonParser,
    ToolCallParser,
    ToolFormat,
    template_tool_format,
)

NAMES = frozenset({"lookup_order", "start_return"})


def run(
    parser: ToolCallParser, text: str, cuts: tuple[int, ...] | list[int] = ()
) -> tuple[str, list[tuple[str, object]]]:
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    content, calls = "", []
    for a, b in itertools.pairwise(bounds):
        c, more = parser.feed(text[a:b])
        content, calls = content + c, calls + more
    c, more = parser.finish()
    content, calls = content + c, calls + more
    assert all(call.id.startswith("call_") for call in calls)
    return content, [(call.name, json.loads(call.arguments)) for call in calls]


HERMES_TWO = (
    'Let me check.<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A1"}}\n'
    '</tool_call>\n<tool_call>\n{"name": "start_return", "arguments": {"order_id": "A1", '
    '"reason": "broken"}}\n</tool_call>'
)


def test_hermes_calls_among_text() -> None:
    content, calls = run(HermesParser(NAMES), HERMES_TWO)
    assert content == "Let me check.\n"
    assert calls == [
        ("lookup_order", {"order_id": "A1"}),
        ("start_return", {"order_id": "A1", "reason": "broken"}),
    ]


@given(st.lists(st.integers(0, 400), max_size=10))
def test_hermes_any_cut_into_deltas_gives_the_same_calls(cuts: list[int]) -> None:
    assert run(HermesParser(NAMES), HERMES_TWO, cuts) == run(HermesParser(NAMES), HERMES_TWO)


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "delete_everything", "arguments": {}}</tool_call>',  # not a tool
        '<tool_call>{"name": "lookup_order", "arguments": "A1"}</tool_call>',  # not an object
        "<tool_call>not json</tool_call>",
        "a < b and <tool_ca",
    ],
)
def test_hermes_text_that_is_no_valid_call_stays_text(text: str) -> None:
    assert run(HermesParser(NAMES), text) == (text, [])


def test_hermes_call_left_open_at_the_end_counts_when_whole() -> None:
    text = '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "B2"}}'
    assert run(HermesParser(NAMES), text) == ("", [("lookup_order", {"order_id": "B2"})])
    cut = '<tool_call>{"name": "lookup_order", "argu'
    assert run(HermesParser(NAMES), cut) == (cut, [])


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        ('{"name": "lookup_order", "parameters": {"order_id": "A1"}}', "",
         [("lookup_order", {"order_id": "A1"})]),
        (' {"name": "lookup_order", "parameters": {"order_id": "A1"}}; {"name": "start_return", '
         '"arguments": {"order_id": "A1"}}', "",
         [("lookup_order", {"order_id": "A1"}), ("start_return", {"order_id": "A1"})]),
        ("Your order shipped.", "Your order shipped.", []),
        ('{"name": "lookup_order", "parameters": {"order_id": "A1"}} and more', None, []),
        ('{"nam', None, []),
    ],
)  # fmt: skip
def test_llama3_json_answers(text: str, content: str | None, calls: list[object]) -> None:
    for cuts in ([], [1, 5, 17, 30]):
        assert run(Llama3JsonParser(NAMES), text, cuts) == (
            text if content is None else content,
            calls,
        )


def test_the_format_comes_from_the_chat_template() -> None:
    assert template_tool_format(HERMES_TEMPLATE) == (ToolFormat.HERMES, False)
    assert template_tool_format(LLAMA3_JSON_TEMPLATE) == (ToolFormat.LLAMA3_JSON, False)
    # A template that ignores tools: chatq describes them itself, in the hermes format.
    assert template_tool_format(CHATML_TEMPLATE) == (ToolFormat.HERMES, True)
    assert template_tool_format("{% for t in tools %}[TOOL]{{ t }}{% endfor %}") == (None, False)
