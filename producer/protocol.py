"""The wire protocol: request envelope, result entries and error codes.

Producer and workers both import this module and nothing else defines wire types. Requests
travel as one msgpack map in field ``m`` of a stream entry; results are stream entries with a
type field ``t`` (``chunk`` / ``done`` / ``error``) and a msgpack body ``m``. Decoding never
uses pickle, bounds every buffer, and turns every malformed input into :class:`ProtocolError`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

import msgpack

from producer.errors import ProtocolError
from producer.keys import PRIORITIES

PROTOCOL_VERSION = 1
ROLES = frozenset({"system", "user", "assistant", "tool"})
FINISH_REASONS = frozenset({"stop", "length", "abort", "deadline"})

_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-/@]{1,128}$")


class ErrorCode(str, Enum):
    """Codes carried by ``error`` results and :class:`ProtocolError`."""

    INVALID_REQUEST = "invalid_request"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_VERSION = "unsupported_version"
    PROMPT_TOO_LONG = "prompt_too_long"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    CANCELLED = "cancelled"
    QUEUE_FULL = "queue_full"
    DEAD_LETTER = "dead_letter"
    MODEL_NOT_FOUND = "model_not_found"
    INTERNAL = "internal"


@dataclass(frozen=True)
class Limits:
    """Bounds every request is validated against (defaults suit a chat service)."""

    max_payload_bytes: int = 1 << 20
    max_messages: int = 256
    max_content_chars: int = 200_000
    max_total_chars: int = 400_000
    min_max_tokens: int = 1
    max_max_tokens: int = 32_768
    max_temperature: float = 2.0
    max_top_k: int = 1_000
    max_stop: int = 8
    max_stop_chars: int = 256
    max_tenant_chars: int = 64
    max_idempotency_key_chars: int = 128
    max_callback_url_chars: int = 2_048


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class Params:
    """Sampling parameters as they travel; the engine's ``SamplingParams`` mirrors these."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(frozen=True)
class Envelope:
    """One chat request. ``deadline_ms`` and ``created_ms`` are Unix epoch milliseconds."""

    id: str
    model: str
    messages: tuple[Message, ...]
    params: Params = field(default_factory=Params)
    priority: str = "normal"
    tenant: str | None = None
    deadline_ms: int | None = None
    created_ms: int = 0
    stream: bool = False
    idempotency_key: str | None = None
    callback_url: str | None = None
    v: int = PROTOCOL_VERSION

    def expired(self, now_ms: int | None = None) -> bool:
        now = now_ms if now_ms is not None else now_unix_ms()
        return self.deadline_ms is not None and now >= self.deadline_ms

    def validate(self, limits: Limits = DEFAULT_LIMITS) -> Envelope:
        """Raise :class:`ProtocolError` naming the first bad field; return self if valid."""
        _validate_map(self.to_wire(), limits)
        return self

    def to_wire(self) -> dict[str, Any]:
        # Built field by field: dataclasses.asdict deep-copies recursively and was most of
        # the cost of a submit.
        p = self.params
        return {
            "v": self.v,
            "id": self.id,
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "params": {
                "max_tokens": p.max_tokens,
                "temperature": p.temperature,
                "top_p": p.top_p,
                "top_k": p.top_k,
                "stop": list(p.stop),
                "seed": p.seed,
                "ignore_eos": p.ignore_eos,
            },
            "priority": self.priority,
            "tenant": self.tenant,
            "deadline_ms": self.deadline_ms,
            "created_ms": self.created_ms,
            "stream": self.stream,
            "idempotency_key": self.idempotency_key,
            "callback_url": self.callback_url,
        }


def estimate_cost_tokens(env: Envelope) -> int:
    """Backlog cost of a request in tokens: prompt estimate + max_tokens.

    Producer (enqueue) and worker (finalize) both use this, so the per-model backlog in
    Redis returns to zero exactly. ~4 characters per token plus a few template tokens per
    message; the worker's admission uses real token counts instead.
    """
    chars = 0
    for m in env.messages:
        chars += len(m.content)
    return chars // 4 + 8 * len(env.messages) + env.params.max_tokens


def now_unix_ms() -> int:
    return time.time_ns() // 1_000_000


def new_request_id() -> str:
    return uuid.uuid4().hex


def make_envelope(
    messages: Sequence[Mapping[str, str] | Message],
    *,
    model: str,
    params: Params | None = None,
    priority: str = "normal",
    tenant: str | None = None,
    deadline_s: float | None = None,
    stream: bool = False,
    idempotency_key: str | None = None,
    callback_url: str | None = None,
    request_id: str | None = None,
    limits: Limits = DEFAULT_LIMITS,
    validate: bool = True,
) -> Envelope:
    """Build and validate an envelope; ``deadline_s`` is relative to now. ``validate=False``
    leaves the bounds check to :func:`encode_validated` (one wire map for both)."""
    created = now_unix_ms()
    msgs: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            msgs.append(m)
        elif isinstance(m, Mapping) and set(m) == {"role", "content"}:
            msgs.append(Message(role=m["role"], content=m["content"]))
        else:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST.value,
                "each message must be a mapping with exactly 'role' and 'content'",
                field=f"messages[{i}]",
            )
    if deadline_s is not None and (
        not isinstance(deadline_s, int | float) or deadline_s != deadline_s or deadline_s <= 0
    ):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST.value,
            "must be a positive number of seconds",
            field="deadline_s",
        )
    env = Envelope(
        id=request_id or new_request_id(),
        model=model,
        messages=tuple(msgs),
        params=params or Params(),
        priority=priority,
        tenant=tenant,
        deadline_ms=None if deadline_s is None else created + int(deadline_s * 1000),
        created_ms=created,
        stream=stream,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
    )
    return env.validate(limits) if validate else env


def encode_envelope(env: Envelope) -> bytes:
    packed: bytes = msgpack.packb(env.to_wire(), use_bin_type=True)
    return packed


def encode_validated(env: Envelope, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Validate ``env`` (:class:`ProtocolError` naming the first bad field) and encode it."""
    wire = env.to_wire()
    _validate_map(wire, limits)
    packed: bytes = msgpack.packb(wire, use_bin_type=True)
    return packed


def decode_envelope(data: object, limits: Limits = DEFAULT_LIMITS) -> Envelope:
    """Decode and validate one request payload; any defect raises :class:`ProtocolError`."""
    obj = unpack_bounded(data, limits.max_payload_bytes)
    return _validate_map(obj, limits)


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


# --- validation --------------------------------------------------------------------------

_TOP_FIELDS = frozenset(
    {
        "v",
        "id",
        "model",
        "messages",
        "params",
        "priority",
        "tenant",
        "deadline_ms",
        "created_ms",
        "stream",
        "idempotency_key",
        "callback_url",
    }
)
_PARAM_FIELDS = frozenset(
    {"max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "ignore_eos"}
)
_DEFAULT_PARAMS = Params()


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
    name: str,
    max_chars: int,
    *,
    optional: bool = False,
    pattern: re.Pattern[str] | None = None,
) -> str | None:
    value = obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _bad(name, "must be a string")
    if not value or len(value) > max_chars:
        raise _bad(name, f"must be 1 to {max_chars} characters")
    if pattern is not None and not pattern.match(value):
        raise _bad(name, f"has characters outside {pattern.pattern}")
    return value


def _validate_params(raw: object, limits: Limits) -> Params:
    if raw is None:
        return Params()
    if not isinstance(raw, dict):
        raise _bad("params", "must be a map")
    if not _PARAM_FIELDS.issuperset(raw):
        unknown = set(raw) - _PARAM_FIELDS
        raise _bad(f"params.{sorted(map(str, unknown))[0]}", "unknown field")
    d = _DEFAULT_PARAMS
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
    stop = raw.get("stop", [])
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > limits.max_stop:
        raise _bad("params.stop", f"must be a list of at most {limits.max_stop} strings")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not 1 <= len(s) <= limits.max_stop_chars:
            raise _bad(
                f"params.stop[{i}]", f"must be a string of 1 to {limits.max_stop_chars} chars"
            )
    seed = raw.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2**63):
        raise _bad("params.seed", "must be an integer in [0, 2**63) or null")
    ignore_eos = raw.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise _bad("params.ignore_eos", "must be a boolean")
    return Params(
        max_tokens=max_tokens,
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=top_k,
        stop=tuple(stop),
        seed=seed,
        ignore_eos=ignore_eos,
    )


def _validate_messages(raw: object, limits: Limits) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise _bad("messages", "must be a non-empty list")
    if len(raw) > limits.max_messages:
        raise _bad("messages", f"has {len(raw)} messages; the limit is {limits.max_messages}")
    out: list[Message] = []
    total = 0
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or len(m) != 2 or "role" not in m or "content" not in m:
            raise _bad(f"messages[{i}]", "must be a map with exactly 'role' and 'content'")
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
        out.append(Message(role=role, content=content))
    if total > limits.max_total_chars:
        raise _bad(
            "messages",
            f"total content is {total} characters; the limit is {limits.max_total_chars}",
            ErrorCode.PAYLOAD_TOO_LARGE,
        )
    return tuple(out)


def _validate_map(obj: object, limits: Limits) -> Envelope:
    env = _fast_envelope(obj, limits)
    return env if env is not None else _check_map(obj, limits)


def _check_map(obj: object, limits: Limits) -> Envelope:
    """Every check in order; raises :class:`ProtocolError` naming the first bad field."""
    if not isinstance(obj, dict):
        raise ProtocolError(ErrorCode.INVALID_REQUEST.value, "envelope must be a map")
    v = obj.get("v")
    if not _is_int(v):
        raise _bad("v", "must be an integer protocol version")
    if v != PROTOCOL_VERSION:
        raise _bad(
            "v",
            f"version {v} is not supported (this side speaks {PROTOCOL_VERSION})",
            ErrorCode.UNSUPPORTED_VERSION,
        )
    if not _TOP_FIELDS.issuperset(obj):
        unknown = set(obj) - _TOP_FIELDS
        raise _bad(sorted(map(str, unknown))[0], "unknown field")
    request_id = _str(obj, "id", "id", 64, pattern=_ID_RE)
    model = _str(obj, "model", "model", 128, pattern=_NAME_RE)
    messages = _validate_messages(obj.get("messages"), limits)
    params = _validate_params(obj.get("params"), limits)
    priority = obj.get("priority", "normal")
    if priority not in PRIORITIES:
        raise _bad("priority", f"must be one of {list(PRIORITIES)}")
    tenant = _str(obj, "tenant", "tenant", limits.max_tenant_chars, optional=True)
    deadline_ms = obj.get("deadline_ms")
    if deadline_ms is not None and (not _is_int(deadline_ms) or not 0 < deadline_ms < 2**53):
        raise _bad("deadline_ms", "must be a positive integer (Unix ms) or null")
    created_ms = obj.get("created_ms", 0)
    if not _is_int(created_ms) or not 0 <= created_ms < 2**53:
        raise _bad("created_ms", "must be a non-negative integer (Unix ms)")
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad("stream", "must be a boolean")
    idem = _str(
        obj, "idempotency_key", "idempotency_key", limits.max_idempotency_key_chars, optional=True
    )
    callback_url = _str(
        obj, "callback_url", "callback_url", limits.max_callback_url_chars, optional=True
    )
    if callback_url is not None and not callback_url.startswith(("http://", "https://")):
        raise _bad("callback_url", "must be an http:// or https:// URL")
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
        v=v,
    )


# The same checks as ``_validate_map`` on the common shape, with exact types (msgpack gives
# exactly dict / list / str / int / float / bool / None), and the objects built without the
# frozen dataclasses' per-field ``object.__setattr__``: most of a worker's validation cost.
# Anything unusual (a wrong type, a value out of bounds, ``stop`` as one string, an int
# subclass...) returns None and goes through the full check, which names the bad field; so
# this path accepts nothing the full check refuses and builds the same Envelope.


def _frozen(cls: type[Any], fields: dict[str, Any]) -> Any:
    """An instance of frozen dataclass ``cls`` with every field in ``fields`` (no __init__)."""
    obj = object.__new__(cls)
    obj.__dict__.update(fields)
    return obj


def _short_str(x: object, max_chars: int) -> bool:
    return type(x) is str and 0 < len(x) <= max_chars


def _fast_params(raw: object, limits: Limits) -> Params | None:
    if raw is None:
        return _DEFAULT_PARAMS
    if type(raw) is not dict or not _PARAM_FIELDS.issuperset(raw):
        return None
    get = raw.get
    d = _DEFAULT_PARAMS
    max_tokens = get("max_tokens", d.max_tokens)
    temperature = get("temperature", d.temperature)
    top_p = get("top_p", d.top_p)
    top_k = get("top_k", d.top_k)
    stop = get("stop", [])
    seed = get("seed")
    ignore_eos = get("ignore_eos", False)
    if not (
        type(max_tokens) is int
        and limits.min_max_tokens <= max_tokens <= limits.max_max_tokens
        and type(top_k) is int
        and 0 <= top_k <= limits.max_top_k
        and type(ignore_eos) is bool
        and (seed is None or (type(seed) is int and 0 <= seed < 2**63))
        and type(stop) is list
        and len(stop) <= limits.max_stop
    ):
        return None
    # A float out of range is refused here, NaN and infinities too (comparisons fail).
    t = type(temperature)
    if not ((t is float or t is int) and 0.0 <= temperature <= limits.max_temperature):
        return None
    t = type(top_p)
    if not ((t is float or t is int) and 0.0 < top_p <= 1.0):
        return None
    max_stop_chars = limits.max_stop_chars
    for s in stop:
        if not (type(s) is str and 0 < len(s) <= max_stop_chars):
            return None
    params: Params = _frozen(
        Params,
        {
            "max_tokens": max_tokens,
            "temperature": float(temperature),
            "top_p": float(top_p),
            "top_k": top_k,
            "stop": tuple(stop),
            "seed": seed,
            "ignore_eos": ignore_eos,
        },
    )
    return params


def _fast_envelope(obj: object, limits: Limits) -> Envelope | None:
    """``_validate_map(obj)`` for the common shape; None: let the full check decide."""
    if type(obj) is not dict or not _TOP_FIELDS.issuperset(obj):
        return None
    get = obj.get
    v = get("v")
    request_id = get("id")
    model = get("model")
    raw_messages = get("messages")
    priority = get("priority", "normal")
    tenant = get("tenant")
    deadline_ms = get("deadline_ms")
    created_ms = get("created_ms", 0)
    stream = get("stream", False)
    idem = get("idempotency_key")
    callback_url = get("callback_url")
    if not (
        type(v) is int
        and v == PROTOCOL_VERSION
        and _short_str(request_id, 64)
        and _ID_RE.match(request_id)  # type: ignore[arg-type]
        and _short_str(model, 128)
        and _NAME_RE.match(model)  # type: ignore[arg-type]
        and type(raw_messages) is list
        and 0 < len(raw_messages) <= limits.max_messages
        and type(priority) is str
        and priority in PRIORITIES
        and (tenant is None or _short_str(tenant, limits.max_tenant_chars))
        and (deadline_ms is None or (type(deadline_ms) is int and 0 < deadline_ms < 2**53))
        and type(created_ms) is int
        and 0 <= created_ms < 2**53
        and type(stream) is bool
        and (idem is None or _short_str(idem, limits.max_idempotency_key_chars))
        and (
            callback_url is None
            or (
                _short_str(callback_url, limits.max_callback_url_chars)
                and callback_url.startswith(("http://", "https://"))  # type: ignore[union-attr]
            )
        )
    ):
        return None
    messages: list[Message] = []
    total = 0
    max_content_chars = limits.max_content_chars
    for m in raw_messages:
        if type(m) is not dict or len(m) != 2:
            return None
        role = m.get("role")
        content = m.get("content")
        if not (
            type(role) is str
            and role in ROLES
            and type(content) is str
            and len(content) <= max_content_chars
        ):
            return None
        total += len(content)
        messages.append(_frozen(Message, {"role": role, "content": content}))
    if total > limits.max_total_chars:
        return None
    params = _fast_params(get("params"), limits)
    if params is None:
        return None
    env: Envelope = _frozen(
        Envelope,
        {
            "id": request_id,
            "model": model,
            "messages": tuple(messages),
            "params": params,
            "priority": priority,
            "tenant": tenant,
            "deadline_ms": deadline_ms,
            "created_ms": created_ms,
            "stream": stream,
            "idempotency_key": idem,
            "callback_url": callback_url,
            "v": v,
        },
    )
    return env


# --- results ------------------------------------------------------------------------------

RESULT_TYPE_FIELD = "t"
RESULT_BODY_FIELD = "m"


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class Timings:
    """Milliseconds from enqueue (``created_ms``): until the engine took the request
    (``queued_ms``), until the first token, until done; ``engine_ms`` is the time inside the
    engine (submitted → finished), so ``total_ms - engine_ms`` is what the queue path adds."""

    queued_ms: float = 0.0
    first_token_ms: float = 0.0
    total_ms: float = 0.0
    engine_ms: float = 0.0


@dataclass(frozen=True)
class Chunk:
    """A streamed text delta; ``index`` counts chunks from 0 so readers can resume."""

    index: int
    delta: str


@dataclass(frozen=True)
class Done:
    text: str
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    worker: str = ""


@dataclass(frozen=True)
class Error:
    code: str
    message: str
    worker: str = ""


ResultEntry = Chunk | Done | Error


def encode_result(entry: ResultEntry) -> dict[str, bytes]:
    """Stream fields for one result entry."""
    kind = {Chunk: "chunk", Done: "done", Error: "error"}[type(entry)]
    body: bytes = msgpack.packb(asdict(entry), use_bin_type=True)
    return {RESULT_TYPE_FIELD: kind.encode(), RESULT_BODY_FIELD: body}


def decode_result(fields: Mapping[Any, Any]) -> ResultEntry:
    """Inverse of :func:`encode_result`; keys/values may be bytes or str."""
    norm = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    kind = norm.get(RESULT_TYPE_FIELD)
    if isinstance(kind, bytes):
        kind = kind.decode()
    body = unpack_bounded(norm.get(RESULT_BODY_FIELD, b""), 64 << 20)
    try:
        if kind == "chunk":
            return Chunk(index=int(body["index"]), delta=str(body["delta"]))
        if kind == "done":
            return Done(
                text=body["text"],
                finish_reason=body["finish_reason"],
                usage=Usage(**body.get("usage", {})),
                timings=Timings(**body.get("timings", {})),
                worker=body.get("worker", ""),
            )
        if kind == "error":
            return Error(code=body["code"], message=body["message"], worker=body.get("worker", ""))
    except (KeyError, TypeError, ValueError) as err:
        raise ProtocolError(ErrorCode.INTERNAL.value, f"malformed {kind} result") from err
    raise ProtocolError(ErrorCode.INTERNAL.value, f"unknown result type {kind!r}")
