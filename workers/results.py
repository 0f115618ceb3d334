"""Result writes, queued and sent in one pipeline per flush, through any Redis outage.

Every final result goes through FINALIZE_MANY (write-if-absent + XACK + XDEL + backlog
update in one Lua call), so a request is answered effectively once however many workers
touch it. Streamed chunks go through CHUNKS, ordered before the finals in the same pipeline.
Both are fenced: a write lands only while its request entry is still pending on this
worker, so a worker that lost an entry (paused past its heartbeat, cut off, or alive after
Redis restarted from older data) cannot write behind the back of the worker that took it
over; a fenced chunk tells the aggregator to drop that request (``on_fenced``). Undecodable
entries (no request id to answer) go to the dead-letter stream through DEAD_LETTER_RAW.

Outages: a flush that cannot reach Redis keeps everything queued and says so (it never
raises); the next one is due after a backoff (:meth:`retry_in_s`), and meanwhile a
request's new deltas join its one open chunk. A chunk a flush took is sealed (its index and
text fixed: that flush may have landed it, only its reply lost) and is sent again as it is;
a resend is harmless, as finals are write-if-absent and chunks are appended only past the
stream's last chunk index.

Order: a chunk lands only right behind its predecessor, and a final only behind its
request's last chunk (CHUNKS and FINALIZE_MANY refuse them otherwise, writing nothing). Each
command of a pipeline succeeds or fails on its own: without that, a call that failed (a
NOSCRIPT while another process was loading the scripts after a Redis restart) could be
followed by one that landed, leaving a final before the chunks it ends, or a gap that made
the failed chunk "there already" for good. Refused ones are kept and sent again behind
what they wait for; one whose predecessor is nowhere (Redis lost it) drops its request,
which is then resumed from the chunks the stream kept.

Memory stays bounded however long Redis is away: by the text of
the requests the worker held when Redis went away (intake pulls nothing while writes fail),
in at most one chunk per request per attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.connection import is_cluster
from producer.contract.finalize import (
    CHUNKS_MISSING,
    FENCED,
    FinalBatch,
    FinalHooks,
    dead_letter_fields,
    dead_letter_raw_call,
)
from producer.contract.keys import GROUP, RESULT_TTL_S, STREAM_FIELD, Keys
from producer.contract.logprobs import TokenLogprob
from producer.contract.results import Done, Error, chunk_body, result_body
from producer.contract.scripts import CHUNKS, DEAD_LETTER_RAW, FINALIZE_MANY
from producer.contract.tools import ToolCall
from workers.lanes import Entry

log = logging.getLogger(__name__)

MAX_PAYLOAD_IN_DEAD_LETTER = 64 * 1024
# Backoff between flushes that could not reach Redis: short first (a blip), then capped so
# a worker notices Redis is back within seconds of a long outage.
RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0)
MAX_CHUNKS_PER_CALL = 256  # bounds one CHUNKS script's run time (Redis is single-threaded)
OUT_OF_ORDER = -2  # CHUNKS' reply for a chunk whose predecessor is not the stream's last
CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

Op = Callable[[Any], None]


@dataclass
class PendingChunk:
    """One request's text not yet written: deltas queued since its last written chunk."""

    request_id: str
    lane: str
    entry_id: str
    ttl_s: int
    parts: list[str]
    tokens: list[int]
    index: int = -1  # given when a flush takes it (-1: not yet)
    reasoning: list[str] = field(default_factory=list)  # reasoning deltas (workers.answer)
    tool_calls: list[ToolCall] = field(default_factory=list)  # calls finished meanwhile
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token of tokens
    choice: int = 0  # the answer it continues (n > 1)


@dataclass
class Sent:
    """What one flush took from the queues (put back whole if Redis could not be reached)."""

    chunks: list[PendingChunk] = field(default_factory=list)
    ops: list[Op] = field(default_factory=list)
    finals: FinalBatch | None = None


class ResultWriter:
    """Queues one worker's result writes and sends them in one pipeline per flush."""

    def __init__(self, redis: Redis, keys: Keys, model: str, worker: str) -> None:
        self.redis = redis
        self.keys = keys
        self.model = model
        self.worker = worker
        self._finalize_many = redis.register_script(FINALIZE_MANY)
        self._chunks_script = redis.register_script(CHUNKS)
        self._dead_raw = redis.register_script(DEAD_LETTER_RAW)
        self._ops: list[Op] = []
        # Open chunks: by request id (by "<request id>#k" for answer k > 0 of n > 1).
        self._chunks: dict[str, PendingChunk] = {}
        self._sealed: list[PendingChunk] = []  # taken by a flush that failed: sent as they are
        self._next_index: dict[str, int] = {}  # request id → index of its next chunk
        self._finals = FinalBatch(keys, worker)  # the queued finals, for FINALIZE_MANY
        self._backlog = keys.backlog(model)
        self._lock = asyncio.Lock()
        self._sending: Sent | None = None  # what the flush in progress took
        self._failures = 0  # flushes in a row that could not reach Redis
        self._retry_at_s = 0.0  # monotonic: no flush before (backoff)
        self.on_fenced: Callable[[list[str]], None] | None = None  # ids of lost requests
        self.finals_written = 0  # FINALIZE calls that wrote (not answered before)
        self.finals_fenced = 0  # finals not written: the entry was not pending on us
        self.chunks_fenced = 0
        # Once a flush has run with the scripts loaded, later flushes send EVALSHA without
        # redis-py's SCRIPT EXISTS round trip first; a flush in which Redis answers NOSCRIPT
        # (it restarted, or SCRIPT FLUSH) is sent again whole with the scripts loaded.
        self._scripts_loaded = False

    @property
    def pending(self) -> int:
        return len(self._ops) + len(self._sealed) + len(self._chunks) + len(self._finals)

    @property
    def failing(self) -> bool:
        """The last flush could not reach Redis (intake pulls nothing new meanwhile)."""
        return self._failures > 0

    def retry_in_s(self) -> float | None:
        """Seconds until queued writes should be tried again; None when nothing waits."""
        if not self.pending:
            return None
        return max(0.0, self._retry_at_s - time.monotonic())

    def held_entries(self) -> set[tuple[str, str]]:
        """(lane, entry id) of the entries whose final is queued or being sent: still
        pending in Redis, but answered (reconciliation must not run them again)."""
        held = self._finals.entries()
        if self._sending is not None and self._sending.finals is not None:
            held |= self._sending.finals.entries()
        return held

    # --- queueing ---

    def chunk(
        self,
        entry: Entry,
        request_id: str,
        delta: str,
        tokens: Sequence[int] = (),
        *,
        first_index: int = 0,
        ttl_s: int = RESULT_TTL_S,
        reasoning: str = "",
        tool_calls: tuple[ToolCall, ...] = (),
        logprobs: Sequence[TokenLogprob] = (),
        choice: int = 0,
    ) -> None:
        """Queue ``delta`` (and the ``tokens`` generated since the last chunk) for
        ``request_id``; ``first_index``: its first chunk's index (a resumed request goes on
        from the chunks already in its stream). ``reasoning`` and ``tool_calls``: the
        answer's other parts since the last chunk (requests with tools or reasoning);
        ``logprobs``: the entries of ``tokens`` (requests that asked for them); ``choice``:
        the answer of an n > 1 request it continues (each answer has its open chunk)."""
        self._next_index.setdefault(request_id, first_index)
        key = request_id if not choice else f"{request_id}#{choice}"
        queued = self._chunks.get(key)
        if queued is None:
            queued = self._chunks[key] = PendingChunk(
                request_id, entry.stream, entry.entry_id, ttl_s, [delta], list(tokens),
                choice=choice,
            )  # fmt: skip
        else:
            queued.parts.append(delta)
            queued.tokens += tokens
        if reasoning:
            queued.reasoning.append(reasoning)
        if tool_calls:
            queued.tool_calls += tool_calls
        if logprobs:
            queued.logprobs += logprobs

    def final(
        self,
        entry: Entry,
        request_id: str,
        result: Done | Error,
        *,
        model: str | None = None,
        hooks: FinalHooks | None = None,
    ) -> None:
        """FINALIZE ``entry`` with ``result`` (a no-op write if a final already exists);
        ``model``: the backlog its charge goes back to, when not this worker's model;
        ``hooks``: what else the request's final does (its webhook, its tenant's slot)."""
        kind = "done" if isinstance(result, Done) else "error"
        self._queue_final(entry, request_id, kind, result_body(result), model, hooks)

    def done(
        self, entry: Entry, request_id: str, body: bytes, hooks: FinalHooks | None = None
    ) -> None:
        """FINALIZE ``entry`` with a ``done`` whose body is ``done_body(...)``."""
        self._queue_final(entry, request_id, "done", body, None, hooks)

    def _queue_final(
        self,
        entry: Entry,
        request_id: str,
        kind: str,
        body: bytes,
        model: str | None,
        hooks: FinalHooks | None,
    ) -> None:
        if self.keys.partitions == 1:
            backlog = self._backlog if model is None else self.keys.backlog(model)
        else:
            partition = self.keys.partition_in(entry.stream)
            backlog = self.keys.backlog(model or self.model, partition)
        self._finals.add(
            request_id, entry.stream, entry.entry_id, backlog, kind, body, entry.cost_tokens,
            hooks,
        )  # fmt: skip

    def error(
        self,
        entry: Entry,
        request_id: str,
        code: str,
        message: str,
        *,
        model: str | None = None,
        hooks: FinalHooks | None = None,
    ) -> None:
        error = Error(code=code, message=message, worker=self.worker)
        self.final(entry, request_id, error, model=model, hooks=hooks)

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """An entry nobody can answer (no request id, or not the entry its id was reserved
        for): park it in the dead-letter stream. ENQUEUE never charged it (it charges only
        the entry it reserves the id for, whose id a worker can read), so it gives nothing
        back: its ``c``, if any, was written by hand."""
        fields = dead_letter_fields(
            request_id="",
            model=self.model,
            lane=entry.stream,
            entry_id=entry.entry_id,
            reason=reason,
            deliveries=entry.delivery_count,
            worker=self.worker,
            ts_ms=time.time_ns() // 1_000_000,
            payload=entry.fields.get(STREAM_FIELD.encode(), b"")[:MAX_PAYLOAD_IN_DEAD_LETTER],
        )
        keys, args = dead_letter_raw_call(
            self.keys, self.model, entry.stream, entry.entry_id, self.worker, None, fields
        )

        def op(pipe: Any) -> None:
            self._script(pipe, self._dead_raw, keys, args)

        self._ops.append(op)

    # --- sending ---

    async def flush(self) -> bool:
        """Send everything queued so far in one pipeline; False when Redis could not be
        reached (everything stays queued; retried after a backoff, never raised).

        Chunks go first, then the finals, so a request's chunks precede its final entry.
        """
        async with self._lock:
            if not self.pending:
                return True
            if time.monotonic() < self._retry_at_s:
                return False
            sent = self._take()
            self._sending = sent
            try:
                return await self._flush(sent)
            finally:
                self._sending = None

    async def _flush(self, sent: Sent) -> bool:
        """One flush of what ``sent`` took (see :meth:`flush`)."""
        for _ in range(2):  # the second time with the scripts loaded (after NOSCRIPT)
            try:
                replies = await self._send(sent)
            except CONNECTION_ERRORS as err:
                self._put_back(sent)
                self._failed(err)
                return False
            if not any(isinstance(r, NoScriptError) for r in replies):
                break
            # Those calls did not run; the others did, and run again harmlessly.
            self._scripts_loaded = False
        else:
            self._put_back(sent)
            self._failed(NoScriptError("scripts missing after loading them"))
            return False
        self._scripts_loaded = True
        self._failures, self._retry_at_s = 0, 0.0
        self._settle(sent, replies)
        return True

    def _take(self) -> Sent:
        sent = Sent([*self._sealed, *self._chunks.values()], self._ops, self._finals.take())
        self._sealed, self._chunks, self._ops = [], {}, []
        for c in sent.chunks:
            if c.index < 0:
                c.index = self._next_index[c.request_id]
                self._next_index[c.request_id] = c.index + 1
        assert sent.finals is not None
        sent.finals.note_last_chunks(self._next_index)  # its request's chunks have indexes now
        return sent

    def _put_back(self, sent: Sent) -> None:
        """Queue ``sent`` again, before what was queued since; its chunks stay sealed."""
        self._sealed = sent.chunks
        self._ops = sent.ops + self._ops
        if sent.finals is not None:
            self._finals.put_back(sent.finals)

    def _failed(self, err: Exception) -> None:
        delay_s = RETRY_DELAYS_S[min(self._failures, len(RETRY_DELAYS_S) - 1)]
        self._failures += 1
        self._retry_at_s = time.monotonic() + delay_s
        log.warning(
            "result writes failed (%s); %d queued, retry %d in %.2f s",
            err, self.pending, self._failures, delay_s,
        )  # fmt: skip

    def _chunk_calls(self, chunks: list[PendingChunk]) -> list[list[PendingChunk]]:
        """The chunks of each CHUNKS call: one partition's (one hash slot) at a time, at most
        MAX_CHUNKS_PER_CALL each."""
        groups: dict[int, list[PendingChunk]] = {}
        for c in chunks:
            p = 0 if self.keys.partitions == 1 else self.keys.partition_in(c.lane)
            groups.setdefault(p, []).append(c)
        return [
            group[start : start + MAX_CHUNKS_PER_CALL]
            for group in groups.values()
            for start in range(0, len(group), MAX_CHUNKS_PER_CALL)
        ]

    async def _send(self, sent: Sent) -> list[Any]:
        if not self._scripts_loaded and is_cluster(self.redis):
            # A cluster pipeline cannot load scripts on the way (SCRIPT LOAD goes to every
            # master).
            for script in (self._chunks_script, self._finalize_many, self._dead_raw):
                await self.redis.script_load(script.script)
        pipe = self.redis.pipeline(transaction=False)
        for call in self._chunk_calls(sent.chunks):
            self._script(pipe, self._chunks_script, *self.chunks_call(call))
        for op in sent.ops:
            op(pipe)
        assert sent.finals is not None
        for keys, args in sent.finals.calls():
            self._script(pipe, self._finalize_many, keys, args)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    def chunks_call(self, chunks: list[PendingChunk]) -> tuple[list[Any], list[Any]]:
        """CHUNKS' KEYS and ARGV for ``chunks`` (indexed already), in one call."""
        keys: list[Any] = []
        args: list[Any] = [GROUP, self.worker]
        for c in chunks:
            keys += (self.keys.result(c.request_id), c.lane)
            body = chunk_body(
                c.index,
                "".join(c.parts),
                c.tokens,
                reasoning="".join(c.reasoning),
                tool_calls=tuple(c.tool_calls),
                logprobs=c.logprobs,
                choice=c.choice,
            )
            args += (c.entry_id, c.index, body, c.ttl_s)
        return keys, args

    def _script(self, pipe: Any, script: AsyncScript, keys: list[Any], args: list[Any]) -> None:
        """Queue EVALSHA on the pipeline being built."""
        if not self._scripts_loaded and hasattr(pipe, "scripts"):
            pipe.scripts.add(script)  # the pipeline loads it first if Redis lacks it
        # execute_command: a cluster pipeline refuses its evalsha() method, not the command
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def _settle(self, sent: Sent, replies: list[Any]) -> None:
        """Count what landed. Report requests whose chunks were fenced off, or whose stream
        lost chunks (Redis restarted from older data: whoever holds the entry resumes it
        from the chunks that are left). Keep (sealed) the chunks of a call Redis refused
        whole (out of memory, read-only...) and those refused as out of order behind them,
        as a dropped chunk would leave a gap in its stream; and the finals of requests
        whose chunks are still on their way."""
        assert sent.finals is not None
        calls = self._chunk_calls(sent.chunks)
        n_chunk_calls, n_final_calls = len(calls), sent.finals.num_calls()
        chunk_replies = replies[:n_chunk_calls]
        final_replies = replies[len(replies) - n_final_calls :] if n_final_calls else []
        kept, fenced, lost = self._settle_chunks(sent.chunks, calls, chunk_replies)
        waiting = {c.request_id for c in kept}
        put_back: list[int] = []
        for i, (request_id, reply) in enumerate(
            zip(sent.finals.request_ids(), sent.finals.replies(final_replies), strict=True)
        ):
            if reply == CHUNKS_MISSING:
                if request_id in waiting:
                    put_back.append(i)
                else:
                    lost.append(request_id)
            elif reply == 1:
                self.finals_written += 1
            elif reply == FENCED:
                self.finals_fenced += 1
        if kept:
            self._sealed = kept
            self._finals.put_back(sent.finals.select(put_back))
            errors = [r for r in chunk_replies if isinstance(r, Exception)]
            self._failed(errors[0] if errors else ResponseError("chunks refused"))
        for reply in replies:
            if isinstance(reply, Exception):
                log.error("result write command failed: %s", reply)
            elif isinstance(reply, list) and -1 in reply:
                log.error("a batch of result writes had %d failures", reply.count(-1))
        if lost:
            log.warning("%d requests' streams lost chunks (Redis restarted from older data?): "
                        "dropped, to be resumed from the chunks kept", len(set(lost)))  # fmt: skip
        self._forget(fenced + lost)
        for request_id in sent.finals.request_ids():
            if request_id not in waiting:
                self._next_index.pop(request_id, None)

    def _settle_chunks(
        self,
        chunks: list[PendingChunk],
        calls: list[list[PendingChunk]],
        replies: list[Any],
    ) -> tuple[list[PendingChunk], list[str], list[str]]:
        """What CHUNKS did with ``chunks``: those to keep (sealed, in their order), and the
        ids of requests fenced off and of those whose stream lost chunks. A chunk refused as
        out of order waits for its predecessor when that one was refused too; otherwise
        Redis lost the chunks before it."""
        refused: list[PendingChunk] = []
        fenced: list[str] = []
        out_of_order: list[PendingChunk] = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, Exception):
                refused += call
                continue
            for c, ok in zip(call, reply, strict=True):
                if ok == 0:
                    fenced.append(c.request_id)
                elif ok == OUT_OF_ORDER:
                    out_of_order.append(c)
        waiting = {c.request_id for c in refused}
        keep = {id(c) for c in refused}
        keep |= {id(c) for c in out_of_order if c.request_id in waiting}
        lost = sorted({c.request_id for c in out_of_order if c.request_id not in waiting})
        return [c for c in chunks if id(c) in keep], fenced, lost

    def _forget(self, fenced: list[str]) -> None:
        """Requests another worker took over, or whose stream lost chunks: nothing more of
        theirs is written (``on_fenced`` drops them; the entry's holder resumes them)."""
        if not fenced:
            return
        self.chunks_fenced += len(fenced)
        lost = set(fenced)
        self._sealed = [c for c in self._sealed if c.request_id not in lost]
        self._chunks = {k: c for k, c in self._chunks.items() if c.request_id not in lost}
        for request_id in lost:
            self._next_index.pop(request_id, None)
        if self.on_fenced is not None:
            self.on_fenced(sorted(lost))
