"""The pure halves of client calls, shared by :class:`producer.client.ChatClient` and
:class:`producer.sync_client.SyncChatClient` so both speak the wire protocol through one
code path: validate and encode before touching Redis, walk a result stream, and convert
redis-py errors at the boundary (the enqueue call itself is in :mod:`producer.batch`).
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis

from producer.errors import (
    ChatqError,
    ProtocolError,
    RedisUnavailable,
    RequestFailed,
)
from producer.keys import CANCEL_MAXLEN, CANCELLED_TTL_S, Keys
from producer.protocol import (
    Chunk,
    Done,
    Envelope,
    Error,
    ErrorCode,
    Message,
    Params,
    Usage,
    decode_result,
    encode_validated,
    make_envelope,
)
from producer.settings import ClientSettings

DEFAULT_RESULT_TIMEOUT_S = 300.0
DEFAULT_STREAM_IDLE_TIMEOUT_S = 60.0
# Retry-After when the queue is full but no drain rate was ever measured (no request of the
# model finished yet), and the bounds any computed value is clamped to.
FALLBACK_RETRY_AFTER_S = 1.0
MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 60.0
# Result-stream entries read per XREAD; a streamed answer has one entry per chunk.
READ_COUNT = 512


@dataclass(frozen=True)
class ChatResult:
    """A finished chat. Timings are milliseconds from enqueue (``queued_ms``: until a worker
    admitted it; ``first_token_ms``: until the first token; ``total_ms``: until done)."""

    id: str
    text: str
    finish_reason: str
    usage: Usage
    worker: str
    queued_ms: float
    first_token_ms: float
    total_ms: float
    engine_ms: float = 0.0  # inside the engine; total_ms - engine_ms = what the queue added

    @classmethod
    def from_done(cls, request_id: str, done: Done) -> ChatResult:
        t = done.timings
        return cls(
            id=request_id,
            text=done.text,
            finish_reason=done.finish_reason,
            usage=done.usage,
            worker=done.worker,
            queued_ms=t.queued_ms,
            first_token_ms=t.first_token_ms,
            total_ms=t.total_ms,
            engine_ms=t.engine_ms,
        )


def retry_after_s(
    queued_tokens: int, cost_tokens: int, limit_tokens: int, rate_tps: float
) -> float:
    """Seconds until ``cost_tokens`` more fit under the bound at the measured drain rate.

    The excess over the bound has to drain first; with no measured rate (``rate_tps <= 0``)
    the answer is :data:`FALLBACK_RETRY_AFTER_S`. Clamped to [0.05 s, 60 s].
    """
    if rate_tps > 0:
        excess = max(queued_tokens + cost_tokens - limit_tokens, 1)
        wait_s = excess / rate_tps
    else:
        wait_s = FALLBACK_RETRY_AFTER_S
    return min(max(wait_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)


def build_envelope(
    settings: ClientSettings,
    messages: Sequence[Mapping[str, str] | Message],
    *,
    model: str,
    max_tokens: int = 256,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: str | Sequence[str] = (),
    priority: str = "normal",
    deadline_s: float | None = None,
    idempotency_key: str | None = None,
    stream: bool = False,
    ignore_eos: bool = False,
    tenant: str | None = None,
    callback_url: str | None = None,
) -> tuple[Envelope, bytes]:
    """Validate a submit call into an envelope and its msgpack payload (no Redis involved)."""
    if isinstance(stop, str):
        stops: tuple[str, ...] = (stop,)
    elif isinstance(stop, Sequence):
        stops = tuple(stop)
    else:
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST.value, "must be a string or a list of strings", field="stop"
        )
    params = Params(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=stops,
        seed=seed,
        ignore_eos=ignore_eos,
    )
    env = make_envelope(
        messages,
        model=model,
        params=params,
        priority=priority,
        tenant=tenant,
        deadline_s=deadline_s,
        stream=stream,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
        limits=settings.limits,
        validate=False,
    )
    payload = encode_validated(env, settings.limits)
    if len(payload) > settings.limits.max_payload_bytes:
        raise ProtocolError(
            ErrorCode.PAYLOAD_TOO_LARGE.value,
            f"encoded request is {len(payload)} bytes; the limit is "
            f"{settings.limits.max_payload_bytes}",
            field="messages",
        )
    return env, payload


_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")


def check_request_id(request_id: str) -> str:
    # Same rule as the envelope's id; keeps callers from addressing arbitrary keys.
    if not isinstance(request_id, str) or not _REQUEST_ID_RE.match(request_id):
        raise ProtocolError(
            ErrorCode.INVALID_REQUEST.value, "is not a chatq request id", field="request_id"
        )
    return request_id


class ResultCursor:
    """Walks one request's result stream: chunk deltas from ``from_index``, then the final.

    A request submitted without ``stream=True`` has no chunk entries; its final text is then
    yielded as one delta, so ``stream()`` works for every request.
    """

    def __init__(self, request_id: str, from_index: int = 0) -> None:
        if from_index < 0:
            raise ProtocolError(ErrorCode.INVALID_REQUEST.value, "must be >= 0", field="from_index")
        self.request_id = request_id
        self.from_index = from_index
        self.last_id: bytes | str = "0-0"
        self.chunks_seen = 0
        self.final: Done | Error | None = None

    def feed(self, entries: Sequence[tuple[Any, Mapping[Any, Any]]]) -> list[str]:
        deltas: list[str] = []
        for entry_id, fields in entries:
            self.last_id = entry_id
            entry = decode_result(fields)
            if isinstance(entry, Chunk):
                self.chunks_seen += 1
                if entry.index >= self.from_index:
                    deltas.append(entry.delta)
                continue
            self.final = entry
            unstreamed = self.chunks_seen == 0 and self.from_index == 0
            if isinstance(entry, Done) and unstreamed and entry.text:
                deltas.append(entry.text)
            break
        return deltas

    def outcome(self) -> ChatResult:
        """The finished result, or raise :class:`RequestFailed` for an ``error`` final."""
        if isinstance(self.final, Error):
            raise RequestFailed(self.final.code, self.final.message)
        assert self.final is not None
        return ChatResult.from_done(self.request_id, self.final)


def block_ms(deadline: float, socket_timeout_s: float | None) -> int:
    """XREAD BLOCK for the time left before ``deadline`` (monotonic s), never 0 (= forever),
    and short enough that the socket timeout cannot fire first: Redis answers a timed-out
    BLOCK from its event loop, up to ~100 ms (one serverCron tick at hz 10) late."""
    left_s = deadline - time.monotonic()
    if socket_timeout_s is not None:
        left_s = min(left_s, max(socket_timeout_s / 2 - 0.1, socket_timeout_s / 4))
    return max(int(left_s * 1000), 1)


def streams_entries(reply: Any) -> list[tuple[str, list[tuple[Any, Mapping[Any, Any]]]]]:
    """(stream key, entries) of an XREAD reply, in either RESP2 (list) or RESP3 (dict) shape."""
    if not reply:
        return []
    if isinstance(reply, Mapping):
        return [
            (text(key), list(value[0] if value and isinstance(value[0], list) else value))
            for key, value in reply.items()
        ]
    return [(text(key), list(entries)) for key, entries in reply]


def stream_entries(reply: Any) -> list[tuple[Any, Mapping[Any, Any]]]:
    """Entries of a single-stream XREAD reply."""
    streams = streams_entries(reply)
    return streams[0][1] if streams else []


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@contextlib.contextmanager
def redis_errors() -> Iterator[None]:
    """Convert redis-py errors at the library boundary."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as err:
        raise RedisUnavailable(f"redis unavailable: {err}") from err
    except redis.RedisError as err:
        raise ChatqError(f"redis error: {err}") from err


def resolve_settings(
    redis_url: str | None, prefix: str | None, settings: ClientSettings | None
) -> ClientSettings:
    base = settings or ClientSettings()
    changes: dict[str, Any] = {}
    if redis_url is not None:
        changes["redis_url"] = redis_url
    if prefix is not None:
        changes["prefix"] = prefix
    return replace(base, **changes) if changes else base


def queue_cancel(pipe: Any, keys: Keys, request_id: str) -> None:
    """Add a cancel's commands to a MULTI pipeline (sync or asyncio; same method names):
    was there a final result already, the marker intake checks, the entry running requests'
    workers read."""
    pipe.exists(keys.final(request_id))
    pipe.set(keys.cancelled(request_id), b"1", ex=CANCELLED_TTL_S)
    pipe.xadd(keys.cancel, {"id": request_id}, maxlen=CANCEL_MAXLEN, approximate=True)
