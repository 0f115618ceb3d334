"""Result entries: what a worker writes to a request's result stream ``<prefix>:res:<id>``.

Each entry has a type field ``t`` (``chunk`` / ``done`` / ``error``) and a msgpack body
``m``. A streaming request gets ``chunk`` entries (text deltas, ``index`` from 0), then
exactly one final ``done`` or ``error``; a request without ``stream`` gets the final only.
``docs/schema/`` holds a JSON Schema of each body.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgpack

from producer.contract.codec import unpack_bounded
from producer.contract.codes import FINISH_REASONS, ErrorCode
from producer.contract.logprobs import TokenLogprob, logprobs_from_wire, logprobs_wire
from producer.contract.tools import ToolCall
from producer.errors import ProtocolError

RESULT_TYPE_FIELD = "t"
RESULT_BODY_FIELD = "m"
MAX_RESULT_BODY_BYTES = 64 << 20


@dataclass(frozen=True)
class Usage:
    """Token counts of a finished request (``cached_tokens``: prompt tokens served from the
    prefix cache)."""

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
    """A streamed delta; ``index`` counts chunks from 0 so readers can resume. ``delta`` is
    answer text; ``reasoning`` text of the model's reasoning (``<think>``) and
    ``tool_calls`` calls the model finished making (in the order made, across chunks).

    ``tokens``: the ids of the tokens generated since the previous chunk (the text they make
    may be partly held back for a later delta: a character still incomplete, a stop string
    that may be forming). All chunks' tokens in order are everything generated so far, which
    is how a worker that claims a half-finished request resumes it.

    ``logprobs``: with ``params.logprobs``, one entry per token of ``tokens``
    (:mod:`producer.contract.logprobs`). ``choice``: which answer of a request for
    ``params.n`` > 1 the chunk continues (0 to n - 1; each answer's chunks are in order,
    the answers' interleaved; ``index`` counts all of them)."""

    index: int
    delta: str
    tokens: tuple[int, ...] = ()
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    choice: int = 0


@dataclass(frozen=True)
class Choice:
    """One answer of a request for ``params.n`` > 1 (:attr:`Done.choices`): its text, why
    it ended, its reasoning, tool calls and logprobs, as :class:`Done` has them."""

    index: int
    text: str
    finish_reason: str
    reasoning_content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Done:
    """The final answer: the whole text, why it ended, token counts and timings; the
    model's reasoning apart from the text, and the tool calls it made (finish reason
    ``tool_calls``); with ``params.logprobs``, one ``logprobs`` entry per generated token
    (``usage.completion_tokens`` of them). A request for ``params.n`` > 1 answers has them
    all in ``choices`` (the fields above are the first one's; ``usage`` counts the prompt
    once and every answer's tokens)."""

    text: str
    finish_reason: str
    usage: Usage = field(default_factory=Usage)
    timings: Timings = field(default_factory=Timings)
    worker: str = ""
    reasoning_content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    logprobs: tuple[TokenLogprob, ...] = ()
    choices: tuple[Choice, ...] = ()


@dataclass(frozen=True)
class Error:
    """The final error: ``code`` is one of :class:`ErrorCode`'s values."""

    code: str
    message: str
    worker: str = ""


ResultEntry = Chunk | Done | Error

# One packer for every body (``msgpack.packb`` builds a Packer per call); workers call these
# from their one loop only.
_pack = msgpack.Packer(use_bin_type=True).pack


def encode_result(entry: ResultEntry) -> dict[str, bytes]:
    """Stream fields for one result entry (the reference encoder; workers use
    :func:`result_fields`, the same bytes built field by field)."""
    kind = {Chunk: "chunk", Done: "done", Error: "error"}[type(entry)]
    fields = asdict(entry)
    # The optional parts are left out when empty (readers take them as empty).
    for name in _OPTIONAL_PARTS:
        if name in fields and not fields[name]:
            del fields[name]
    body: bytes = msgpack.packb(fields, use_bin_type=True)
    return {RESULT_TYPE_FIELD: kind.encode(), RESULT_BODY_FIELD: body}


def result_fields(entry: ResultEntry) -> dict[str, bytes]:
    """``encode_result(entry)``: the stream fields of one result entry."""
    kind = (
        b"chunk" if isinstance(entry, Chunk) else b"done" if isinstance(entry, Done) else b"error"
    )
    return {RESULT_TYPE_FIELD: kind, RESULT_BODY_FIELD: result_body(entry)}


def result_body(entry: ResultEntry) -> bytes:
    """``encode_result(entry)``'s msgpack body, built field by field (same bytes, without
    ``dataclasses.asdict``'s deep copies)."""
    body: dict[str, Any]
    if isinstance(entry, Done):
        u, t = entry.usage, entry.timings
        return done_body(
            entry.text,
            entry.finish_reason,
            u.prompt_tokens,
            u.completion_tokens,
            u.cached_tokens,
            t.queued_ms,
            t.first_token_ms,
            t.total_ms,
            t.engine_ms,
            entry.worker,
            reasoning_content=entry.reasoning_content,
            tool_calls=entry.tool_calls,
            logprobs=entry.logprobs,
            choices=entry.choices,
        )
    if isinstance(entry, Chunk):
        return chunk_body(
            entry.index,
            entry.delta,
            entry.tokens,
            reasoning=entry.reasoning,
            tool_calls=entry.tool_calls,
            logprobs=entry.logprobs,
            choice=entry.choice,
        )
    else:
        body = {"code": entry.code, "message": entry.message, "worker": entry.worker}
    packed: bytes = _pack(body)
    return packed


def chunk_body(
    index: int,
    delta: str,
    tokens: Sequence[int],
    *,
    reasoning: str = "",
    tool_calls: tuple[ToolCall, ...] = (),
    logprobs: Sequence[TokenLogprob] = (),
    choice: int = 0,
) -> bytes:
    """The msgpack body of a ``chunk`` result (``encode_result``'s bytes; its optional
    parts only when not empty)."""
    body: dict[str, Any] = {"index": index, "delta": delta, "tokens": list(tokens)}
    if reasoning:
        body["reasoning"] = reasoning
    if tool_calls:
        body["tool_calls"] = [asdict(c) for c in tool_calls]
    if logprobs:
        body["logprobs"] = logprobs_wire(logprobs)
    if choice:
        body["choice"] = choice
    packed: bytes = _pack(body)
    return packed


def done_body(
    text: str,
    finish_reason: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int,
    queued_ms: float,
    first_token_ms: float,
    total_ms: float,
    engine_ms: float,
    worker: str,
    *,
    reasoning_content: str = "",
    tool_calls: tuple[ToolCall, ...] = (),
    logprobs: Sequence[TokenLogprob] = (),
    choices: Sequence[Choice] = (),
) -> bytes:
    """The msgpack body of a ``done`` result from its fields (``encode_result``'s bytes):
    the aggregator's path builds no Done / Usage / Timings objects."""
    body: dict[str, Any] = {
        "text": text,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cached_tokens": cached_tokens,
        },
        "timings": {
            "queued_ms": queued_ms,
            "first_token_ms": first_token_ms,
            "total_ms": total_ms,
            "engine_ms": engine_ms,
        },
        "worker": worker,
    }
    if reasoning_content:
        body["reasoning_content"] = reasoning_content
    if tool_calls:
        body["tool_calls"] = [asdict(c) for c in tool_calls]
    if logprobs:
        body["logprobs"] = logprobs_wire(logprobs)
    if choices:
        body["choices"] = [asdict(c) for c in choices]
    packed: bytes = _pack(body)
    return packed


def decode_result(fields: Mapping[Any, Any]) -> ResultEntry:
    """Inverse of :func:`encode_result`; keys/values may be bytes or str. A body that does
    not follow its schema (``docs/schema/result-*.schema.json``) raises
    :class:`ProtocolError` naming the field; fields this side does not know are ignored."""
    norm = {(k.decode() if isinstance(k, bytes) else k): v for k, v in fields.items()}
    kind = norm.get(RESULT_TYPE_FIELD)
    if isinstance(kind, bytes):
        kind = kind.decode()
    body = unpack_bounded(norm.get(RESULT_BODY_FIELD, b""), MAX_RESULT_BODY_BYTES)
    if kind not in _DECODERS:
        raise ProtocolError(ErrorCode.INTERNAL.value, f"unknown result type {kind!r}")
    if not isinstance(body, dict):
        raise ProtocolError(ErrorCode.INTERNAL.value, f"malformed {kind} result: not a map")
    return _DECODERS[kind](_Body(kind, body))


def _is_count(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_millis(x: object) -> bool:
    return ((isinstance(x, float) and math.isfinite(x)) or _is_count(x)) and x >= 0  # type: ignore[operator]


class _Body:
    """One result body, read field by field; a bad field raises naming it."""

    def __init__(self, kind: str, body: dict[Any, Any], prefix: str = "") -> None:
        self.kind, self.body, self.prefix = kind, body, prefix

    def get(self, name: str, ok: Callable[[Any], bool], what: str, default: Any = None) -> Any:
        """``name``'s value, checked by ``ok``; ``default`` (None: required) if absent."""
        if name not in self.body:
            if default is None:
                raise self.bad(name, "is required")
            return default
        value = self.body[name]
        if not ok(value):
            raise self.bad(name, f"must be {what}")
        return value

    def part(self, name: str) -> _Body:
        inner = self.get(name, lambda x: isinstance(x, dict), "a map", {})
        return _Body(self.kind, inner, f"{self.prefix}{name}.")

    def bad(self, name: str, message: str) -> ProtocolError:
        return ProtocolError(
            ErrorCode.INTERNAL.value,
            f"malformed {self.kind} result: {message}",
            field=self.prefix + name,
        )


def _chunk(b: _Body) -> Chunk:
    return Chunk(
        index=b.get("index", _is_count, "a non-negative integer"),
        delta=b.get("delta", _is_str, "a string"),
        tokens=tuple(b.get("tokens", _is_token_list, "a list of token ids", [])),
        reasoning=b.get("reasoning", _is_str, "a string", ""),
        tool_calls=_calls(b),
        logprobs=_logprobs(b),
        choice=b.get("choice", _is_count, "a non-negative integer", 0),
    )


def _is_token_list(x: object) -> bool:
    return isinstance(x, list) and all(_is_count(t) for t in x)


def _calls(b: _Body) -> tuple[ToolCall, ...]:
    raw = b.get("tool_calls", lambda x: isinstance(x, list), "a list", [])
    calls = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not all(isinstance(c.get(k), str) for k in _CALL_KEYS):
            raise b.bad(f"tool_calls[{i}]", "must be a map of strings id, name, arguments")
        calls.append(ToolCall(c["id"], c["name"], c["arguments"]))
    return tuple(calls)


def _done(b: _Body) -> Done:
    usage, timings = b.part("usage"), b.part("timings")
    return Done(
        text=b.get("text", _is_str, "a string"),
        finish_reason=b.get("finish_reason", FINISH_REASONS.__contains__, str(FINISH_REASONS)),
        usage=Usage(
            **{f: usage.get(f, _is_count, "a non-negative integer", 0) for f in _USAGE_FIELDS}
        ),
        timings=Timings(
            **{f: float(timings.get(f, _is_millis, "a number >= 0", 0.0)) for f in _TIMINGS}
        ),
        worker=b.get("worker", _is_str, "a string", ""),
        reasoning_content=b.get("reasoning_content", _is_str, "a string", ""),
        tool_calls=_calls(b),
        logprobs=_logprobs(b),
        choices=_choices(b),
    )


def _choices(b: _Body) -> tuple[Choice, ...]:
    raw = b.get("choices", lambda x: isinstance(x, list), "a list", [])
    out = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise b.bad(f"choices[{i}]", "must be a map")
        c = _Body(b.kind, item, f"{b.prefix}choices[{i}].")
        out.append(
            Choice(
                index=c.get("index", _is_count, "a non-negative integer"),
                text=c.get("text", _is_str, "a string"),
                finish_reason=c.get(
                    "finish_reason", FINISH_REASONS.__contains__, str(FINISH_REASONS)
                ),
                reasoning_content=c.get("reasoning_content", _is_str, "a string", ""),
                tool_calls=_calls(c),
                logprobs=_logprobs(c),
            )
        )
    return tuple(out)


def _logprobs(b: _Body) -> tuple[TokenLogprob, ...]:
    if "logprobs" not in b.body:
        return ()
    return logprobs_from_wire(b.body["logprobs"], b.bad)


def _error(b: _Body) -> Error:
    return Error(
        code=b.get("code", lambda x: isinstance(x, str) and x != "", "a non-empty string"),
        message=b.get("message", _is_str, "a string"),
        worker=b.get("worker", _is_str, "a string", ""),
    )


def _is_str(x: object) -> bool:
    return isinstance(x, str)


_CALL_KEYS = ("id", "name", "arguments")
_OPTIONAL_PARTS = ("reasoning", "reasoning_content", "tool_calls", "logprobs", "choice", "choices")
_USAGE_FIELDS = tuple(f.name for f in fields(Usage))
_TIMINGS = tuple(f.name for f in fields(Timings))
_DECODERS: dict[str, Callable[[_Body], ResultEntry]] = {
    "chunk": _chunk,
    "done": _done,
    "error": _error,
}
