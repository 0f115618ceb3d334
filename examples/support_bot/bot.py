"""One customer turn: the model through the gateway (streamed), its tool calls run against
the shop, until it answers in text or hands over to a person.

A customer who gives an order number gets it looked up whatever the model would do: the
first round of that turn forces ``lookup_order`` (``tool_choice`` naming it, which chatq
guarantees by constrained decoding) with the ids the customer wrote as the only allowed
values. The rest of the turn is the model's to decide (``tool_choice: auto``).
"""

from __future__ import annotations

import copy
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from openai import AsyncOpenAI

from examples.support_bot.shop import ORDER_ID, TOOLS, Shop

SYSTEM_PROMPT = (
    "You are the support assistant of Northwind Outfitters, an online outdoor shop. Answer "
    "in one or two short, friendly sentences using the order data you are given. Use "
    "start_return for a return of a delivered order, and escalate when the customer wants a "
    "person or you cannot help."
)
MAX_ROUNDS = 4


@dataclass(frozen=True)
class Event:
    """What the page shows: ``text`` (a delta of the answer), ``tool`` (a call and its
    result), ``handover`` (a person takes over), ``error``, ``done``."""

    kind: str
    data: dict[str, Any]

    def sse(self) -> bytes:
        return f"event: {self.kind}\ndata: {json.dumps(self.data)}\n\n".encode()


class SupportBot:
    """Answers customer turns through the gateway with the shop's tools."""

    def __init__(
        self, client: AsyncOpenAI, model: str, shop: Shop, *, max_tokens: int = 64
    ) -> None:
        self.client = client
        self.model = model
        self.shop = shop
        self.max_tokens = max_tokens

    async def turn(self, history: list[dict[str, str]]) -> AsyncIterator[Event]:
        """Events of one turn; ``history`` is the conversation's user and assistant texts,
        the customer's new message last."""
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT}]
        messages += [{"role": m["role"], "content": m["content"]} for m in history]
        mentioned = sorted(set(ORDER_ID.findall(history[-1]["content"]))) if history else []
        for round_no in range(MAX_ROUNDS):
            force = round_no == 0 and bool(mentioned)
            calls: list[dict[str, Any]] = []
            text = ""
            async for kind, value in self._round(messages, mentioned if force else None):
                if kind == "text":
                    text += value
                    yield Event("text", {"delta": value})
                else:
                    calls.append(value)
            if not calls:
                break
            messages.append({"role": "assistant", "content": text or None, "tool_calls": calls})
            for call in calls:
                name, arguments = call["function"]["name"], call["function"]["arguments"]
                result = self.shop.run(name, arguments)
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
                yield Event("tool", {"name": name, "arguments": arguments, "result": result})
                if name == "escalate":
                    yield Event("handover", json.loads(result))
                    return
        yield Event("done", {})

    async def _round(
        self, messages: list[dict[str, Any]], forced_ids: list[str] | None
    ) -> AsyncIterator[tuple[str, Any]]:
        """One streamed completion: ("text", delta) items, then ("call", call) items."""
        tools, choice = TOOLS, "auto"
        if forced_ids:
            tools = copy.deepcopy(TOOLS)
            lookup = tools[0]["function"]["parameters"]["properties"]["order_id"]
            lookup.pop("pattern")
            lookup["enum"] = forced_ids
            choice = {"type": "function", "function": {"name": "lookup_order"}}
        stream = await self.client.chat.completions.create(
            model=self.model, messages=messages, tools=tools, tool_choice=choice,  # type: ignore[arg-type]
            stream=True, temperature=0, max_tokens=self.max_tokens if not forced_ids else 96,
        )  # fmt: skip
        calls: dict[int, dict[str, Any]] = {}
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            if delta.content:
                yield "text", delta.content
            for d in delta.tool_calls or []:
                call = calls.setdefault(
                    d.index,
                    {"id": "", "type": "function", "function": {"name": "", "arguments": ""}},
                )
                call["id"] += d.id or ""
                if d.function is not None:
                    call["function"]["name"] += d.function.name or ""
                    call["function"]["arguments"] += d.function.arguments or ""
        for index in sorted(calls):
            yield "call", calls[index]
