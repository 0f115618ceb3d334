"""The request envelope: one chat request as it travels in a request stream.

A request is one msgpack map in field ``m`` of a stream entry (``docs/protocol.md`` lists
every field with its type, bounds and default). :class:`Envelope` is that map as Python
objects; its ``params`` are the engine's own :class:`~gpu_engine.sequence.SamplingParams`
(plain data, no torch), so one type carries sampling options from the client API to the
engine.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gpu_engine.sequence import SamplingParams
from producer.contract.keys import partition_of
from producer.contract.tools import (
    ToolCall,
    ToolChoice,
    ToolSpec,
    template_tool_calls,
    tool_choice_wire,
)

PROTOCOL_VERSION = 1
ROLES = frozenset({"system", "user", "assistant", "tool"})
# Request ids become parts of key names, so they keep to a safe alphabet.
ID_PATTERN = re.compile(r"[A-Za-z0-9_.:\-]{1,64}")
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.\-/@]{1,128}")
# The sampling fields every envelope carries.
BASIC_SAMPLING_FIELDS = (
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "ignore_eos",
)
# Carried only when set (a worker that predates one refuses it as an unknown field rather
# than ignoring it).
EXTRA_SAMPLING_FIELDS = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "stop_token_ids",
    "structured",
    "logprobs",
    "n",
)
WIRE_SAMPLING_FIELDS = BASIC_SAMPLING_FIELDS + EXTRA_SAMPLING_FIELDS
DEFAULT_SAMPLING = SamplingParams()


def frozen(cls: type[Any], fields: dict[str, Any]) -> Any:
    """An instance of frozen dataclass ``cls`` with every field in ``fields``, built without
    ``__init__`` (no per-field ``object.__setattr__``, no ``__post_init__``): for values
    the contract's validation has checked, or will check before anything is sent."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


@dataclass(frozen=True)
class Message:
    """One chat turn: ``role`` is one of :data:`ROLES`. An assistant turn may carry the
    ``tool_calls`` it made; a ``tool`` turn answers the call ``tool_call_id``."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            wire["tool_calls"] = [c.to_wire() for c in self.tool_calls]
        if self.tool_call_id is not None:
            wire["tool_call_id"] = self.tool_call_id
        return wire

    def to_template(self) -> dict[str, Any]:
        """The message as chat templates read it (OpenAI's shape)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = template_tool_calls(self.tool_calls)
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


@dataclass(frozen=True)
class Envelope:
    """One chat request. ``deadline_ms`` and ``created_ms`` are Unix epoch milliseconds."""

    id: str
    model: str
    messages: tuple[Message, ...]
    params: SamplingParams = DEFAULT_SAMPLING
    priority: str = "normal"
    tenant: str | None = None
    deadline_ms: int | None = None
    created_ms: int = 0
    stream: bool = False
    idempotency_key: str | None = None
    callback_url: str | None = None
    # How long the result stream is kept (s); None: the worker's default (RESULT_TTL_S).
    # The job API keeps results for a day; carried only when set, so workers that predate
    # the field keep serving every other request.
    result_ttl_s: int | None = None
    # Tools the model may call and how it must choose (``producer.contract.tools``), and
    # extra names for the chat template (``enable_thinking``...). Carried only when set.
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    chat_template_kwargs: Mapping[str, Any] | None = None
    v: int = PROTOCOL_VERSION

    @property
    def plain(self) -> bool:
        """No tools, tool messages or template names: the common, fastest shape."""
        return (
            not self.tools
            and self.chat_template_kwargs is None
            and all(not m.tool_calls and m.tool_call_id is None for m in self.messages)
        )

    def expired(self, now_ms: int | None = None) -> bool:
        now = now_ms if now_ms is not None else now_unix_ms()
        return self.deadline_ms is not None and now >= self.deadline_ms

    def to_wire(self) -> dict[str, Any]:
        """The envelope as its msgpack map (field by field: ``dataclasses.asdict``
        deep-copies recursively, most of the cost of a submit)."""
        p = self.params
        params: dict[str, Any] = {
            "max_tokens": p.max_tokens,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "stop": list(p.stop),
            "seed": p.seed,
            "ignore_eos": p.ignore_eos,
        }
        if p != DEFAULT_SAMPLING:
            params.update(extra_params_wire(p))
        wire: dict[str, Any] = {
            "v": self.v,
            "id": self.id,
            "model": self.model,
            "messages": [
                {"role": m.role, "content": m.content}
                if not m.tool_calls and m.tool_call_id is None
                else m.to_wire()
                for m in self.messages
            ],
            "params": params,
            "priority": self.priority,
            "tenant": self.tenant,
            "deadline_ms": self.deadline_ms,
            "created_ms": self.created_ms,
            "stream": self.stream,
            "idempotency_key": self.idempotency_key,
            "callback_url": self.callback_url,
        }
        if self.result_ttl_s is not None:
            wire["result_ttl_s"] = self.result_ttl_s
        if self.tools:
            wire["tools"] = [t.to_wire() for t in self.tools]
        if self.tool_choice != "auto":
            wire["tool_choice"] = tool_choice_wire(self.tool_choice)
        if self.chat_template_kwargs is not None:
            wire["chat_template_kwargs"] = dict(self.chat_template_kwargs)
        return wire


class RequestId(str):
    """A request id as ``submit`` returns it: the id itself (a ``str``), carrying the
    request's ``cancel_token`` ("" when this caller does not hold it: an idempotent replay,
    or an id typed in). Only the token's SHA-1 is in Redis; ``cancel`` needs the token."""

    cancel_token: str

    def __new__(cls, request_id: str, cancel_token: str = "") -> RequestId:
        obj = super().__new__(cls, request_id)
        obj.cancel_token = cancel_token
        return obj


def extra_params_wire(p: SamplingParams) -> dict[str, Any]:
    """The :data:`EXTRA_SAMPLING_FIELDS` of ``p`` that differ from their defaults, as wire
    values (``logit_bias``: token id as a decimal string -> bias, as OpenAI's)."""
    d = DEFAULT_SAMPLING
    out: dict[str, Any] = {}
    for name in EXTRA_SAMPLING_FIELDS:
        value = getattr(p, name)
        if value == getattr(d, name):
            continue
        if name == "logit_bias":
            value = {str(t): b for t, b in value}
        elif name == "stop_token_ids":
            value = list(value)
        elif name == "structured":
            value = value.to_wire()
        out[name] = value
    return out


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000


def new_request_id(partition: int = 0, partitions: int = 1) -> str:
    """A fresh random request id (a UUID's hex digits) in ``partition`` of ``partitions``
    (drawn again until it lands there: about ``partitions`` draws)."""
    while True:
        request_id = uuid.uuid4().hex
        if partition_of(request_id, partitions) == partition:
            return request_id
