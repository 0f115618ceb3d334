"""Tool calls and the reasoning split through the gateway with the official ``openai``
client: real Redis, real workers, real HTTP.

The workers serve scripted checkpoints (``testkit.checkpoints.build_scripted_checkpoint``):
tiny models whose greedy answer is a fixed script, so the answer's tool call or reasoning is
known and every layer between the engine and the client is the real one.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from testkit.checkpoints import build_scripted_checkpoint
from tests.gateway.conftest import GatewayProcess, create_key, wait_until
from tests.workers.conftest import ThreadWorker, tiny_settings

pytestmark = pytest.mark.timeout(240)

TOOLS_MODEL = "scripted-tools"
THINK_MODEL = "scripted-think"
CALL_JSON = '\n{"name": "lookup_order", "arguments": {"order_id": "A1"}}\n'
TOOLS_SCRIPT = ["Let me check.", "<tool_call>", CALL_JSON, "</tool_call>"]
THINK_SCRIPT = ["<think>", "The customer asks about A1.", "</think>", "Order A1 shipped."]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "description": "Look up an order by its id.",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"type": "string"}},
                "required": ["order_id"],
            },
        },
    }
]
ASK = [{"role": "user", "content": "Where is order A1?"}]


@pytest.fixture(scope="module")
def scripted_workers(
    module_redis: str, tmp_path_factory: pytest.TempPathFactory, gateway: GatewayProcess
) -> Iterator[GatewayProcess]:
    """Two workers (tool-call script, reasoning script) beside the package's gateway."""
    handles = []
    for model, script in ((TOOLS_MODEL, TOOLS_SCRIPT), (THINK_MODEL, THINK_SCRIPT)):
        ckpt = build_scripted_checkpoint(tmp_path_factory.mktemp(model), script)
        settings = tiny_settings(module_redis, ckpt, name=f"w-{model}", served_model_name=model)
        handles.append(ThreadWorker(settings).start())

    def served() -> bool:
        ids = {m["id"] for m in httpx.get(gateway.url + "/v1/models").json()["data"]}
        return {TOOLS_MODEL, THINK_MODEL} <= ids

    wait_until(served, timeout_s=60)
    yield gateway
    for handle in handles:
        handle.stop()


@pytest.fixture
def client(scripted_workers: GatewayProcess, module_redis: str) -> openai.OpenAI:
    key = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
    return openai.OpenAI(base_url=scripted_workers.url + "/v1", api_key=key)


def test_a_tool_call_comes_back_as_tool_calls(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "lookup_order"
    assert json.loads(call.function.arguments) == {"order_id": "A1"}


def test_a_streamed_tool_call_arrives_as_tool_call_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=0,
        max_tokens=16,
        stream=True,  # type: ignore[arg-type]
    )
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            call = calls.setdefault(d.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += d.id or ""
            call["name"] += d.function.name or "" if d.function else ""
            call["arguments"] += d.function.arguments or "" if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Let me check."
    assert finish == "tool_calls"
    assert list(calls) == [0]
    assert calls[0]["name"] == "lookup_order" and calls[0]["id"].startswith("call_")
    assert json.loads(calls[0]["arguments"]) == {"order_id": "A1"}


def test_the_conversation_goes_on_with_the_call_and_its_result(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=ASK,
        tools=TOOLS,
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
    )
    message = first.choices[0].message
    call = (message.tool_calls or [])[0]
    turns: list[Any] = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
    ]
    again = client.chat.completions.create(
        model=TOOLS_MODEL,
        messages=turns,
        tools=TOOLS,
        temperature=0,
        max_tokens=16,  # type: ignore[arg-type]
    )
    # The prompt grew by the call and its result (rendered by the template), and was served.
    assert again.usage is not None and first.usage is not None
    assert again.usage.prompt_tokens > first.usage.prompt_tokens + 10
    # tool_choice "none": the tools are not offered, and the answer is text only.
    plain = client.chat.completions.create(
        model=TOOLS_MODEL, messages=turns, tools=TOOLS, tool_choice="none", temperature=0,  # type: ignore[arg-type]
        max_tokens=16,
    )  # fmt: skip
    assert plain.choices[0].message.tool_calls is None
    assert plain.choices[0].finish_reason == "stop"
    assert "<tool_call>" in (plain.choices[0].message.content or "")


ENUM_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup_order",
            "parameters": {
                "type": "object",
                "properties": {"order_id": {"enum": ["A1", "B2"]}},
                "required": ["order_id"],
            },
        },
    },
    {"type": "function", "function": {"name": "escalate"}},
]


@pytest.mark.parametrize(
    ("choice", "names"),
    [
        ("required", {"lookup_order", "escalate"}),
        ({"type": "function", "function": {"name": "lookup_order"}}, {"lookup_order"}),
        ({"type": "function", "function": {"name": "escalate"}}, {"escalate"}),
    ],
)
def test_a_forced_tool_choice_makes_a_valid_call_whatever_the_model(
    client: openai.OpenAI, choice: Any, names: set[str]
) -> None:
    """The reasoning model's script is no call at all: constrained decoding makes one."""
    out = client.chat.completions.create(
        model=THINK_MODEL, messages=ASK, tools=ENUM_TOOLS, tool_choice=choice, temperature=0,  # type: ignore[arg-type]
        max_tokens=160,  # a character a token: this tokenizer has no merges for the call
    )  # fmt: skip
    choice_out = out.choices[0]
    assert choice_out.finish_reason == "tool_calls", choice_out.message
    (call,) = choice_out.message.tool_calls or []
    assert call.function.name in names
    arguments = json.loads(call.function.arguments)
    if call.function.name == "lookup_order":
        assert arguments in ({"order_id": "A1"}, {"order_id": "B2"})
    else:
        assert arguments == {}


def test_strict_tools_are_refused(client: openai.OpenAI) -> None:
    strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=TOOLS_MODEL, messages=ASK, tools=strict)  # type: ignore[arg-type]
    assert info.value.body["param"] == "tools[0].function.strict"  # type: ignore[index]


def _reasoning(message: Any) -> Any:
    return (message.model_extra or {}).get("reasoning_content")


def test_split_answers_carry_logprobs_and_come_n_at_a_time(client: openai.OpenAI) -> None:
    """Answers split into text and tool calls: n choices, each with one logprobs entry per
    generated token (the call's markup included), streamed and not."""
    kwargs = {"model": TOOLS_MODEL, "messages": ASK, "tools": TOOLS, "temperature": 0,
              "max_tokens": 16, "logprobs": True, "n": 2}  # fmt: skip
    full = client.chat.completions.create(**kwargs)  # type: ignore[call-overload]
    assert [c.index for c in full.choices] == [0, 1]
    for c in full.choices:
        assert c.finish_reason == "tool_calls" and c.message.content == "Let me check."
        assert c.message.tool_calls[0].function.name == "lookup_order"
    counts = [len(c.logprobs.content) for c in full.choices]
    assert counts[0] == counts[1] and sum(counts) == full.usage.completion_tokens
    stream = client.chat.completions.create(
        stream=True, stream_options={"include_usage": True}, **kwargs
    )  # type: ignore[call-overload]
    streamed, names = [0, 0], [[], []]
    for chunk in stream:
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed[choice.index] += len(choice.logprobs.content or [])
            names[choice.index] += [d.function.name for d in choice.delta.tool_calls or []]
    assert streamed == counts
    assert names == [["lookup_order"], ["lookup_order"]]


def test_reasoning_is_apart_from_the_answer(client: openai.OpenAI) -> None:
    out = client.chat.completions.create(
        model=THINK_MODEL, messages=ASK, temperature=0, max_tokens=16
    )
    message = out.choices[0].message
    assert message.content == "Order A1 shipped."
    assert _reasoning(message) == "The customer asks about A1."
    stream = client.chat.completions.create(
        model=THINK_MODEL, messages=ASK, temperature=0, max_tokens=16, stream=True
    )
    reasoning, content = "", ""
    for chunk in stream:
        if chunk.choices:
            reasoning += _reasoning(chunk.choices[0].delta) or ""
            content += chunk.choices[0].delta.content or ""
    assert (reasoning, content) == ("The customer asks about A1.", "Order A1 shipped.")


def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model=THINK_MODEL, messages=ASK, max_tokens=4)
    off = client.chat.completions.create(
        model=THINK_MODEL, messages=ASK, max_tokens=4,
        extra_body={"chat_template_kwargs": {"enable_thinking": False}},
    )  # fmt: skip
    # The template closes an empty think block in the prompt when thinking is off.
    assert off.usage is not None and plain.usage is not None
    assert off.usage.prompt_tokens > plain.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=THINK_MODEL, messages=ASK, extra_body={"chat_template_kwargs": {"messages": 1}}
        )
    assert info.value.body["param"] == "chat_template_kwargs.messages"  # type: ignore[index]


def test_smollm2_makes_the_forced_call_valid(
    gateway: GatewayProcess, module_redis: str, scripted_workers: GatewayProcess
) -> None:
    """The embedded SmolLM2-135M (its template has no tools: chatq describes them) makes a
    valid forced call: the required tool, its arguments matching the schema's pattern. A
    real 135M model on the CPU: ~30 generated tokens, the slowest test here for that."""
    pytest.importorskip("gguf")
    from gpu_engine.errors import EngineError
    from gpu_engine.gguf import default_model_path

    try:
        model_dir = default_model_path()
    except EngineError as err:
        pytest.skip(str(err))
    settings = tiny_settings(
        module_redis, model_dir, name="w-smollm2", served_model_name="smollm2-tools",
        kv_cache_tokens=4096,
    )  # fmt: skip
    handle = ThreadWorker(settings).start()
    try:
        wait_until(
            lambda: (
                "smollm2-tools"
                in {m["id"] for m in httpx.get(gateway.url + "/v1/models").json()["data"]}
            ),
            timeout_s=60,
        )
        key = create_key(module_redis, f"t-{uuid.uuid4().hex[:8]}")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, timeout=300)
        tools = [
            {
                "type": "function",
                "function": {
                    "name": "lookup_order",
                    "description": "Look up an order by its id.",
                    "parameters": {
                        "type": "object",
                        "properties": {"order_id": {"type": "string", "pattern": "^NW-[0-9]{4}$"}},
                        "required": ["order_id"],
                    },
                },
            }
        ]
        out = client.chat.completions.create(
            model="smollm2-tools",
            messages=[{"role": "user", "content": "Where is my order NW-1001?"}],
            tools=tools,  # type: ignore[arg-type]
            tool_choice="required",
            temperature=0,
            max_tokens=64,
        )
        (call,) = out.choices[0].message.tool_calls or []
        assert out.choices[0].finish_reason == "tool_calls"
        assert call.function.name == "lookup_order"
        order_id = json.loads(call.function.arguments)["order_id"]
        assert re.fullmatch(r"NW-[0-9]{4}", order_id), order_id
    finally:
        handle.stop()
