"""The pure halves of client calls, shared by :class:`producer.client.ChatClient` and
:class:`producer.sync_client.SyncChatClient` so both speak the contract through one code
path: validate and encode before touching Redis, walk a result stream, and convert redis-py
errors at the boundary (the enqueue call itself is in :mod:`producer.batch`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import urlsplit

import redis

from producer.connection import CLUSTER_SCHEME
from producer.contract.codec import encode_validated, make_envelope
from producer.contract.codes import ErrorCode
from producer.contract.enqueue import idempotency_scope, scope_partition
from producer.contract.envelope import ID_PATTERN, Envelope, Message, new_request_id
from producer.contract.logprobs import TokenLogprob
from producer.contract.options import SubmitOptions
from producer.contract.results import Choice, Chunk, Done, Error, Usage, decode_result
from producer.contract.text import text
from producer.contract.tools import ToolCall
from producer.errors import (
    ChatqError,
    ProtocolError,
    RedisUnavailable,
    RequestFailed,
)
from producer.settings import ClientSettings

DEFAULT_RESULT_TIMEOUT_S = 300.0
DEFAULT_STREAM_IDLE_TIMEOUT_S = 60.0
# Result-stream entries read per XREAD; a streamed answer has one entry per chunk.
READ_COUNT = 512

Messages = Sequence[Mapping[str, Any] | Message]


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
    reasoning_content: str = ""  # the model's reasoning (<think>...</think>), apart from text
    tool_calls: tuple[ToolCall, ...] = ()  # calls the model made (finish_reason "tool_calls")
    # With logprobs=k: each generated token's log probability and its k likeliest rivals.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Every answer (n of them; the fields above are the first's): text, finish reason,
    # reasoning, tool calls and logprobs each.
    choices: tuple[Choice, ...] = ()

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
            reasoning_content=done.reasoning_content,
            tool_calls=done.tool_calls,
            logprobs=done.logprobs,
            choices=done.choices or (_first_choice(done),),
        )


def _first_choice(done: Done) -> Choice:
    """The one answer of a request for n = 1, as a :class:`Choice`."""
    return Choice(
        0, done.text, done.finish_reason, done.reasoning_content, done.tool_calls, done.logprobs
    )


def build_envelope(
    settings: ClientSettings,
    messages: Messages,
    options: SubmitOptions | None = None,
    kwargs: Mapping[str, Any] | None = None,
    request_id: str | None = None,
    partition: int | None = None,
) -> tuple[Envelope, bytes]:
    """Validate a submit call into an envelope and its msgpack payload (no Redis involved):
    ``options`` with keyword ``kwargs`` applied (see :class:`SubmitOptions`); ``request_id``
    (checked) or a new random id. With several partitions a new id is drawn in the partition
    of the request's idempotency scope (a retry lands where the first submit did), else in
    ``partition`` when given (a batch's requests share one), else anywhere."""
    env = make_envelope(
        messages,
        options,
        request_id=None if request_id is None else check_request_id(request_id),
        limits=settings.limits,
        validate=False,
        **(kwargs or {}),
    )
    _check_cluster_fields(settings, env)
    if request_id is None and settings.partitions > 1:
        env = _in_partition(env, settings.partitions, partition)
    return env, encode_validated(env, settings.limits)


def _check_cluster_fields(settings: ClientSettings, env: Envelope) -> None:
    """On a Redis Cluster a final that queues a webhook or frees a tenant's slot would name
    keys of another slot, which the cluster refuses at the end of the work: refuse the
    fields up front (docs/reliability.md, "Redis Cluster")."""
    if urlsplit(settings.redis_url).scheme != CLUSTER_SCHEME:
        return
    for name in ("callback_url", "tenant"):
        if getattr(env, name) is not None:
            raise ProtocolError(
                ErrorCode.INVALID_REQUEST.value,
                "is not supported on a Redis Cluster (it needs one Redis)",
                field=name,
            )


def new_id_for(
    settings: ClientSettings,
    messages: Messages,
    options: SubmitOptions | None,
    kwargs: Mapping[str, Any],
) -> str:
    """A new id for a submit that keeps its id across retries: in the partition its
    idempotency key decides (see :func:`build_envelope`)."""
    if settings.partitions == 1:
        return new_request_id()
    return build_envelope(settings, messages, options, kwargs)[0].id


def _in_partition(env: Envelope, partitions: int, partition: int | None) -> Envelope:
    """``env`` with a new id drawn in its idempotency scope's partition, else ``partition``."""
    if env.idempotency_key is not None:
        scope = idempotency_scope(env.model, env.tenant, env.idempotency_key)
        partition = scope_partition(scope, partitions)
    if partition is None:
        return env
    return dataclasses.replace(env, id=new_request_id(partition, partitions))


def check_request_id(request_id: str) -> str:
    # Same rule as the envelope's id; keeps callers from addressing arbitrary keys.
    if not isinstance(request_id, str) or not ID_PATTERN.fullmatch(request_id):
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
        self.new_chunks: list[Chunk] = []  # what the last ``feed`` brought, whole

    def feed(self, entries: Sequence[tuple[Any, Mapping[Any, Any]]]) -> list[str]:
        """Read entries; the text deltas they bring, of the first answer (``new_chunks``
        has the whole chunks: reasoning, tool calls, logprobs, and every answer's of a
        request for n > 1)."""
        chunks: list[Chunk] = []
        for entry_id, fields in entries:
            self.last_id = entry_id
            entry = decode_result(fields)
            if isinstance(entry, Chunk):
                self.chunks_seen += 1
                if entry.index >= self.from_index:
                    chunks.append(entry)
                continue
            self.final = entry
            unstreamed = self.chunks_seen == 0 and self.from_index == 0
            if isinstance(entry, Done) and unstreamed:
                chunks += _whole_chunks(entry)
            break
        self.new_chunks = chunks
        return [c.delta for c in chunks if c.delta and not c.choice]

    def outcome(self) -> ChatResult:
        """The finished result, or raise :class:`RequestFailed` for an ``error`` final."""
        if isinstance(self.final, Error):
            raise RequestFailed(self.final.code, self.final.message)
        assert self.final is not None
        return ChatResult.from_done(self.request_id, self.final)


def _whole_chunks(done: Done) -> list[Chunk]:
    """A final read without chunks (not streamed) as one chunk per answer that has parts."""
    whole = [
        Chunk(
            0, c.text, reasoning=c.reasoning_content, tool_calls=c.tool_calls,
            logprobs=c.logprobs, choice=c.index,
        )
        for c in done.choices or (_first_choice(done),)
    ]  # fmt: skip
    return [c for c in whole if c.delta or c.reasoning or c.tool_calls]


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
    redis_url: str | None,
    prefix: str | None,
    settings: ClientSettings | None,
    allow_unserved: bool | None = None,
    partitions: int | None = None,
) -> ClientSettings:
    base = settings or ClientSettings()
    changes: dict[str, Any] = {}
    if partitions is not None:
        changes["partitions"] = partitions
    if redis_url is not None:
        changes["redis_url"] = redis_url
    if prefix is not None:
        changes["prefix"] = prefix
    if allow_unserved is not None:
        changes["allow_unserved"] = allow_unserved
    return replace(base, **changes) if changes else base
