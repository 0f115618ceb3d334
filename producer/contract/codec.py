"""Envelopes to and from msgpack: build, validate and encode on the producer; decode and
validate on the worker. No pickle anywhere; every buffer bounded; every malformed input a
:class:`ProtocolError`."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from producer.contract.codes import ErrorCode
from producer.contract.envelope import ID_PATTERN, Envelope, Message, new_request_id, now_unix_ms
from producer.contract.limits import DEFAULT_LIMITS, Limits
from producer.contract.options import SubmitOptions
from producer.contract.tools import tool_calls_from_api
from producer.contract.validation import validate_envelope, validate_map
from producer.errors import ProtocolError

# An envelope that failed validation is still parsed up to this size, to read its id (so
# its requester gets the error instead of a silent dead letter).
SALVAGE_MAX_BYTES = 64 << 20


def make_envelope(
    messages: Sequence[Mapping[str, Any] | Message],
    options: SubmitOptions | None = None,
    *,
    request_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    validate: bool = True,
    **kwargs: Any,
) -> Envelope:
    """Build (and validate) an envelope from ``options`` and/or keyword options (see
    :class:`SubmitOptions`). ``validate=False`` leaves the bounds check to
    :func:`encode_validated` (one wire map for both)."""
    opts = (
        options
        if options is not None and not kwargs
        else SubmitOptions.from_kwargs(kwargs, options)
    )
    created = now_unix_ms()
    deadline_s = _deadline_s(opts.deadline_s, limits)
    env = Envelope(
        id=request_id or new_request_id(),
        model=opts.model,
        messages=_messages(messages),
        params=opts.params,
        priority=opts.priority,
        tenant=opts.tenant,
        deadline_ms=None if deadline_s is None else created + int(deadline_s * 1000),
        created_ms=created,
        stream=opts.stream,
        idempotency_key=opts.idempotency_key,
        callback_url=opts.callback_url,
        result_ttl_s=opts.result_ttl_s,
        tools=opts.tools,
        tool_choice=opts.tool_choice,
        chat_template_kwargs=opts.chat_template_kwargs,
    )
    return validate_envelope(env, limits) if validate else env


def _deadline_s(deadline_s: object, limits: Limits) -> float | None:
    """``deadline_s`` checked: a finite number of seconds no request could be answered in
    less than (``limits.min_deadline_s``: below it the deadline is certain to pass before
    any answer) and within ``limits.max_deadline_s`` (so ``deadline_ms`` stays a valid
    Unix time). Booleans are not numbers here."""
    if deadline_s is None:
        return None
    lo, hi = limits.min_deadline_s, limits.max_deadline_s
    if (
        isinstance(deadline_s, bool)
        or not isinstance(deadline_s, int | float)
        or not math.isfinite(deadline_s)
        or not lo <= deadline_s <= hi
    ):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST.value,
            f"must be a number of seconds in [{lo}, {hi}] (no answer can come sooner than {lo} s)",
            field="deadline_s",
        )
    return float(deadline_s)


def _messages(messages: Sequence[Mapping[str, Any] | Message]) -> tuple[Message, ...]:
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, Mapping) and set(m) == {"role", "content"}:
            out.append(Message(role=m["role"], content=m["content"]))
        elif (
            isinstance(m, Mapping)
            and "role" in m
            and ("content" in m or "tool_calls" in m)
            and _MESSAGE_KEYS.issuperset(m)
        ):
            out.append(_tool_message(m, i))
        else:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST.value,
                "each message must be a mapping of 'role', 'content' and optional "
                "'tool_calls', 'tool_call_id'",
                field=f"messages[{i}]",
            )
    return tuple(out)


_MESSAGE_KEYS = frozenset({"role", "content", "tool_calls", "tool_call_id"})


def _tool_message(m: Mapping[str, Any], i: int) -> Message:
    """A message with tool fields (an assistant's calls may be in OpenAI's shape; its
    content may be None, as OpenAI sends it with calls)."""
    calls = m.get("tool_calls")
    content = m.get("content")
    return Message(
        role=m["role"],
        content="" if content is None else content,
        tool_calls=() if calls is None else tool_calls_from_api(calls, f"messages[{i}].tool_calls"),
        tool_call_id=m.get("tool_call_id"),
    )


def encode_envelope(env: Envelope) -> bytes:
    packed: bytes = msgpack.packb(env.to_wire(), use_bin_type=True)
    return packed


def encode_validated(env: Envelope, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate ``env`` (:class:`ProtocolError` naming the first bad field) and encode it;
    the encoded size is checked against ``limits.max_payload_bytes`` too."""
    wire = env.to_wire()
    validate_map(wire, limits)
    try:
        packed: bytes = msgpack.packb(wire, use_bin_type=True)
    except UnicodeEncodeError as err:  # a lone surrogate: not text UTF-8 can carry
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST.value,
            "is not valid Unicode text (a lone surrogate cannot be encoded as UTF-8)",
            field=unencodable_field(wire),
        ) from err
    if len(packed) > limits.max_payload_bytes:
        raise ProtocolError(
            ErrorCode.PAYLOAD_TOO_LARGE.value,
            f"encoded request is {len(packed)} bytes; the limit is {limits.max_payload_bytes}",
            field="messages",
        )
    return packed


def unencodable_field(obj: Any, path: str = "") -> str | None:
    """The dotted path of the first string in ``obj`` that UTF-8 cannot encode."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path or None
        return None
    items: Any = ()
    if isinstance(obj, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in obj.items())
    elif isinstance(obj, list | tuple):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(obj))
    for where, value in items:
        found = unencodable_field(value, where)
        if found is not None:
            return found
    return None


def decode_envelope(data: object, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode and validate one request payload; any defect raises :class:`ProtocolError`."""
    return validate_map(unpack_bounded(data, limits.max_payload_bytes), limits)


def unpack_bounded(data: object, max_bytes: int) -> Any:
    """msgpack-decode ``data`` (bytes) with every length bounded by ``max_bytes``."""
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, bytes | bytearray | memoryview):
        raise ProtocolError(ErrorCode.INVALID_REQUEST.value, "payload must be bytes")
    if len(data) > max_bytes:
        raise ProtocolError(
            ErrorCode.PAYLOAD_TOO_LARGE.value,
            f"payload is {len(data)} bytes; the limit is {max_bytes}",
        )
    # unpackb reads one whole buffer (already bounded above) and caps every container and
    # string length by that same bound; ext types (incl. timestamps) are refused.
    try:
        return msgpack.unpackb(
            data if type(data) is bytes else bytes(data),
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=max_bytes,
            max_map_len=max_bytes,
            max_ext_len=0,
        )
    except Exception as err:  # msgpack raises many types: ValueError, ExtraData, StackError...
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST.value, f"not a valid msgpack document ({type(err).__name__})"
        ) from err


def salvage_request_id(payload: bytes | None, limits: Limits) -> str | None:
    """The ``id`` of an envelope that failed validation, so its requester gets the error.

    An over-limit payload is still parsed (up to :data:`SALVAGE_MAX_BYTES`) just to read
    its id."""
    data = payload or b""
    try:
        obj = unpack_bounded(data, max(limits.max_payload_bytes, min(len(data), SALVAGE_MAX_BYTES)))
    except ProtocolError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and ID_PATTERN.fullmatch(rid) else None
