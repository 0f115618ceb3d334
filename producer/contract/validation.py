"""Validation of a request envelope's map: every field checked, the first bad one named.

:func:`validate_map` is what both sides run: the producer before it sends, the worker on
every entry it reads. It tries :func:`producer.contract.fast_path.fast_envelope` first (the
common shape, exact types) and falls back to :func:`check_map`, every check in order, which
names the first bad field in a :class:`ProtocolError` (``params.max_tokens``,
``messages[2].role``). ``docs/schema/envelope.schema.json`` states the same rules as a JSON
Schema; a property test keeps the two in agreement.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from gpu_engine.sequence import (
    MAX_N,
    MAX_TOP_LOGPROBS,
    STRUCTURED_KINDS,
    SamplingParams,
    StructuredOutput,
)
from producer.contract.codes import ErrorCode
from producer.contract.envelope import (
    DEFAULT_SAMPLING,
    ID_PATTERN,
    NAME_PATTERN,
    PROTOCOL_VERSION,
    ROLES,
    WIRE_SAMPLING_FIELDS,
    Envelope,
    Message,
)
from producer.contract.fast_path import TOP_FIELDS, fast_envelope
from producer.contract.keys import PRIORITIES
from producer.contract.limits import DEFAULT_LIMITS, Limits
from producer.contract.tools import (
    ToolCall,
    check_call_id,
    check_template_kwargs,
    check_tool_calls,
    check_tool_choice,
    check_tools,
)
from producer.errors import ProtocolError

_PARAM_FIELDS = frozenset(WIRE_SAMPLING_FIELDS)
# Fields only the full check reads (the fast path leaves an envelope with any to it).
TOOL_FIELDS = frozenset({"tools", "tool_choice", "chat_template_kwargs"})
ALL_FIELDS = TOP_FIELDS | TOOL_FIELDS
_MESSAGE_FIELDS = frozenset({"role", "content", "tool_calls", "tool_call_id"})


def validate_map(obj: object, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """The :class:`Envelope` of a decoded wire map; :class:`ProtocolError` naming the first
    bad field."""
    env = fast_envelope(obj, limits)
    return env if env is not None else check_map(obj, limits)


def validate_envelope(env: Envelope, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Raise :class:`ProtocolError` naming the first bad field; return ``env`` if valid."""
    validate_map(env.to_wire(), limits)
    return env


def _bad(
    field_name: str, message: str, code: ErrorCode = ErrorCode.INVALID_REQUEST
) -> ProtocolError:
    return ProtocolError(code.value, message, field=field_name)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_num(x: object) -> bool:
    if isinstance(x, float):
        return math.isfinite(x)
    return isinstance(x, int) and not isinstance(x, bool)


def _str(
    obj: Mapping[str, Any],
    key: str,
    max_chars: int,
    *,
    optional: bool = False,
    pattern: re.Pattern[str] | None = None,
) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _bad(key, "must be a string")
    if not value or len(value) > max_chars:
        raise _bad(key, f"must be 1 to {max_chars} characters")
    if pattern is not None and not pattern.fullmatch(value):
        raise _bad(key, f"has characters outside {pattern.pattern}")
    return value


def _check_params(raw: object, limits: Limits) -> SamplingParams:
    if raw is None:
        return DEFAULT_SAMPLING
    if not isinstance(raw, dict):
        raise _bad("params", "must be a map")
    if not _PARAM_FIELDS.issuperset(raw):
        unknown = set(raw) - _PARAM_FIELDS
        raise _bad(f"params.{sorted(map(str, unknown))[0]}", "unknown field")
    d = DEFAULT_SAMPLING
    max_tokens = raw.get("max_tokens", d.max_tokens)
    if not _is_int(max_tokens) or not limits.min_max_tokens <= max_tokens <= limits.max_max_tokens:
        raise _bad(
            "params.max_tokens",
            f"must be an integer in [{limits.min_max_tokens}, {limits.max_max_tokens}]",
        )
    temperature = raw.get("temperature", d.temperature)
    if not _is_num(temperature) or not 0.0 <= temperature <= limits.max_temperature:
        raise _bad("params.temperature", f"must be a number in [0, {limits.max_temperature}]")
    top_p = raw.get("top_p", d.top_p)
    if not _is_num(top_p) or not 0.0 < top_p <= 1.0:
        raise _bad("params.top_p", "must be a number in (0, 1]")
    top_k = raw.get("top_k", d.top_k)
    if not _is_int(top_k) or not 0 <= top_k <= limits.max_top_k:
        raise _bad("params.top_k", f"must be an integer in [0, {limits.max_top_k}] (0 = off)")
    stop = _check_stop(raw.get("stop", []), limits)
    seed = raw.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise _bad("params.seed", "must be an integer in [0, 2**63) or null")
    ignore_eos = raw.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("params.ignore_eos", "must be a boolean")
    extras = _check_extra_params(raw, limits)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        stop=stop,
        seed=seed,
        ignore_eos=ignore_eos,
        **extras,
    )


def _check_extra_params(raw: dict[Any, Any], limits: Limits) -> dict[str, Any]:
    """The optional sampling fields (penalties, min_p, logit_bias, stop_token_ids,
    structured, logprobs, n) present in ``raw``, checked and converted to SamplingParams' types."""
    out: dict[str, Any] = {}
    for name in ("presence_penalty", "frequency_penalty"):
        if name in raw:
            value = raw[name]
            if not _is_num(value) or not -2.0 <= value <= 2.0:
                raise _bad(f"params.{name}", "must be a number in [-2, 2]")
            out[name] = float(value)
    if "repetition_penalty" in raw:
        value = raw["repetition_penalty"]
        if not _is_num(value) or not 0.0 < value <= 2.0:
            raise _bad("params.repetition_penalty", "must be a number in (0, 2]")
        out["repetition_penalty"] = float(value)
    if "min_p" in raw:
        value = raw["min_p"]
        if not _is_num(value) or not 0.0 <= value <= 1.0:
            raise _bad("params.min_p", "must be a number in [0, 1]")
        out["min_p"] = float(value)
    if "logit_bias" in raw:
        out["logit_bias"] = _check_logit_bias(raw["logit_bias"], limits)
    if "stop_token_ids" in raw:
        ids = raw["stop_token_ids"]
        if not isinstance(ids, list) or len(ids) > limits.max_stop_token_ids:
            raise _bad(
                "params.stop_token_ids",
                f"must be a list of at most {limits.max_stop_token_ids} token ids",
            )
        for i, t in enumerate(ids):
            if not _is_int(t) or not 0 <= t < 2**31:
                raise _bad(f"params.stop_token_ids[{i}]", "must be a token id in [0, 2**31)")
        out["stop_token_ids"] = tuple(ids)
    if "structured" in raw:
        out["structured"] = _check_structured(raw["structured"], limits)
    if "logprobs" in raw:
        value = raw["logprobs"]
        if not _is_int(value) or not 0 <= value <= MAX_TOP_LOGPROBS:
            raise _bad(
                "params.logprobs",
                f"must be an integer in [0, {MAX_TOP_LOGPROBS}] (alternatives per token)",
            )
        out["logprobs"] = value
    if "n" in raw:
        value = raw["n"]
        if not _is_int(value) or not 1 <= value <= MAX_N:
            raise _bad("params.n", f"must be an integer in [1, {MAX_N}] (answers to generate)")
        out["n"] = value
    return out


def _check_logit_bias(raw: object, limits: Limits) -> tuple[tuple[int, float], ...]:
    if not isinstance(raw, dict) or len(raw) > limits.max_logit_bias:
        raise _bad(
            "params.logit_bias",
            f"must be a map of at most {limits.max_logit_bias} token ids to numbers",
        )
    pairs = []
    for key, bias in raw.items():
        if not isinstance(key, str) or not key.isdigit() or len(key) > 10:
            raise _bad("params.logit_bias", f"keys must be token ids as decimal strings: {key!r}")
        if not _is_num(bias) or not -100.0 <= bias <= 100.0:
            raise _bad(f"params.logit_bias.{key}", "must be a number in [-100, 100]")
        pairs.append((int(key), float(bias)))
    return tuple(sorted(pairs))


def _check_structured(raw: object, limits: Limits) -> StructuredOutput:
    if not isinstance(raw, dict) or set(raw) - {"kind", "spec", "prefix", "suffix"}:
        raise _bad("params.structured", "must be a map with kind, spec, prefix, suffix")
    kind, spec = raw.get("kind"), raw.get("spec", "")
    if kind not in STRUCTURED_KINDS:
        raise _bad("params.structured.kind", f"must be one of {', '.join(STRUCTURED_KINDS)}")
    if not isinstance(spec, str) or len(spec) > limits.max_structured_chars:
        raise _bad(
            "params.structured.spec",
            f"must be a string of at most {limits.max_structured_chars} characters",
        )
    if kind == "json" and spec:
        try:
            schema = json.loads(spec)
        except ValueError as err:
            raise _bad("params.structured.spec", f"is not valid JSON: {err}") from None
        if not isinstance(schema, (dict, bool)):
            raise _bad("params.structured.spec", "must be a JSON schema (an object)")
    elif kind != "json" and not spec:
        raise _bad("params.structured.spec", f"must be set for kind {kind}")
    affixes = [raw.get(name, "") for name in ("prefix", "suffix")]
    for name, text in zip(("prefix", "suffix"), affixes, strict=True):
        if not isinstance(text, str) or len(text) > limits.max_structured_affix_chars:
            raise _bad(
                f"params.structured.{name}",
                f"must be a string of at most {limits.max_structured_affix_chars} characters",
            )
    return StructuredOutput(kind, spec, *affixes)


def _check_stop(stop: object, limits: Limits) -> tuple[str, ...]:
    if isinstance(stop, str):  # one stop string
        if not 1 <= len(stop) <= limits.max_stop_chars:
            raise _bad("params.stop", f"must be a string of 1 to {limits.max_stop_chars} chars")
        return (stop,)
    if not isinstance(stop, list) or len(stop) > limits.max_stop:
        raise _bad("params.stop", f"must be a list of at most {limits.max_stop} strings")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not 1 <= len(s) <= limits.max_stop_chars:
            raise _bad(
                f"params.stop[{i}]", f"must be a string of 1 to {limits.max_stop_chars} chars"
            )
    return tuple(stop)


def _check_messages(raw: object, limits: Limits) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "must be a non-empty list")
    if len(raw) > limits.max_messages:
        raise _bad("messages", f"has {len(raw)} messages; the limit is {limits.max_messages}")
    out: list[Message] = []
    total = 0
    for i, m in enumerate(raw):
        if (
            not isinstance(m, dict)
            or "role" not in m
            or "content" not in m
            or not _MESSAGE_FIELDS.issuperset(m)
        ):
            raise _bad(
                f"messages[{i}]",
                "must be a map of 'role', 'content' and optional 'tool_calls', 'tool_call_id'",
            )
        role, content = m["role"], m["content"]
        if not isinstance(role, str) or role not in ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {sorted(ROLES)}")
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content", "must be a string")
        if len(content) > limits.max_content_chars:
            raise _bad(
                f"messages[{i}].content",
                f"has {len(content)} characters; the limit is {limits.max_content_chars}",
                ErrorCode.PAYLOAD_TOO_LARGE,
            )
        total += len(content)
        out.append(_message(m, i, role, content))
    if total > limits.max_total_chars:
        raise _bad(
            "messages",
            f"total content is {total} characters; the limit is {limits.max_total_chars}",
            ErrorCode.PAYLOAD_TOO_LARGE,
        )
    return tuple(out)


def _message(m: dict[Any, Any], i: int, role: str, content: str) -> Message:
    """A message with its tool fields: calls only on an assistant turn, a call id only on
    a tool turn."""
    tool_calls: tuple[ToolCall, ...] = ()
    if "tool_calls" in m:
        if role != "assistant":
            raise _bad(f"messages[{i}].tool_calls", "is only allowed on an assistant message")
        tool_calls = check_tool_calls(m["tool_calls"], f"messages[{i}].tool_calls")
    tool_call_id = None
    if "tool_call_id" in m:
        if role != "tool":
            raise _bad(f"messages[{i}].tool_call_id", "is only allowed on a tool message")
        tool_call_id = check_call_id(m["tool_call_id"], f"messages[{i}].tool_call_id")
    if not tool_calls and tool_call_id is None:
        return Message(role=role, content=content)
    return Message(role=role, content=content, tool_calls=tool_calls, tool_call_id=tool_call_id)


def _check_version(obj: dict[Any, Any]) -> int:
    v = obj.get("v")
    if not _is_int(v):
        raise _bad("v", "must be an integer protocol version")
    if v != PROTOCOL_VERSION:
        raise _bad(
            "v",
            f"version {v} is not supported (this side speaks {PROTOCOL_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    if not ALL_FIELDS.issuperset(obj):
        unknown = set(obj) - ALL_FIELDS
        raise _bad(sorted(map(str, unknown))[0], "unknown field")
    assert isinstance(v, int)
    return v


def _check_times(obj: dict[Any, Any]) -> tuple[int | None, int]:
    deadline_ms = obj.get("deadline_ms")
    if deadline_ms is not None and (not _is_int(deadline_ms) or not 0 < deadline_ms < 2**53):
        raise _bad("deadline_ms", "must be a positive integer (Unix ms) or null")
    created_ms = obj.get("created_ms", 0)
    if not _is_int(created_ms) or not 0 <= created_ms < 2**53:
        raise _bad("created_ms", "must be a non-negative integer (Unix ms)")
    return deadline_ms, created_ms


def check_map(obj: object, limits: Limits) -> Envelope:
    """Every check in order; raises :class:`ProtocolError` naming the first bad field."""
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST.value, "envelope must be a map")
    v = _check_version(obj)
    request_id = _str(obj, "id", 64, pattern=ID_PATTERN)
    model = _str(obj, "model", 128, pattern=NAME_PATTERN)
    messages = _check_messages(obj.get("messages"), limits)
    params = _check_params(obj.get("params"), limits)
    priority = obj.get("priority", "normal")
    if priority not in PRIORITIES:
        raise _bad("priority", f"must be one of {list(PRIORITIES)}")
    tenant = _str(obj, "tenant", limits.max_tenant_chars, optional=True)
    deadline_ms, created_ms = _check_times(obj)
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    idem = _str(obj, "idempotency_key", limits.max_idempotency_key_chars, optional=True)
    callback_url = _str(obj, "callback_url", limits.max_callback_url_chars, optional=True)
    if callback_url is not None and not callback_url.startswith(("http://", "https://")):
        raise _bad("callback_url", "must be an http:// or https:// URL")
    result_ttl_s = obj.get("result_ttl_s")
    if result_ttl_s is not None and (
        not _is_int(result_ttl_s) or not 0 < result_ttl_s <= limits.max_result_ttl_s
    ):
        raise _bad("result_ttl_s", f"must be an integer in [1, {limits.max_result_ttl_s}] or null")
    tools = check_tools(obj.get("tools"))
    tool_choice = check_tool_choice(obj.get("tool_choice"), tools)
    template_kwargs = check_template_kwargs(obj.get("chat_template_kwargs"))
    assert request_id is not None and model is not None
    return Envelope(
        id=request_id,
        model=model,
        messages=messages,
        params=params,
        priority=priority,
        tenant=tenant,
        deadline_ms=deadline_ms,
        created_ms=created_ms,
        stream=stream,
        idempotency_key=idem,
        callback_url=callback_url,
        result_ttl_s=result_ttl_s,
        tools=tools,
        tool_choice=tool_choice,
        chat_template_kwargs=template_kwargs,
        v=v,
    )
