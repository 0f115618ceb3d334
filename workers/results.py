"""Result writes, queued and sent in one pipeline per batch.

Every final result goes through FINALIZE (write-if-absent + XACK + XDEL + backlog update in
one Lua call), so a request is answered effectively once however many workers touch it.
Chunks are plain XADDs (+ EXPIRE) ordered before the final in the same pipeline. Undecodable
entries (no request id to answer) go to the dead-letter stream through DEAD_LETTER_RAW.
A failed flush keeps its writes and retries with backoff: until the FINALIZE lands the entry
stays pending in Redis, so a worker that dies meanwhile loses nothing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack
from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.keys import DEAD_MAXLEN, GROUP, RESULT_TTL_S, STREAM_FIELD, Keys
from producer.protocol import RESULT_BODY_FIELD, RESULT_TYPE_FIELD, Chunk, Done, Error
from producer.scripts import DEAD_LETTER_RAW, FINALIZE_FUNCTIONS
from workers.lanes import Entry

log = logging.getLogger(__name__)

MAX_PAYLOAD_IN_DEAD_LETTER = 64 * 1024
RETRY_DELAYS_S = (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 5.0, 5.0, 5.0, 5.0)

Op = Callable[[Any], None]

# FINALIZE for many entries in one call, with FINALIZE's own Lua functions: ``write`` for
# each request's 4 keys and 6 arguments in turn, then one ``release`` per backlog hash for
# the costs of all the finals written (one backlog update and rate sample per flush, not per
# request: most of FINALIZE's Redis time). One EVALSHA per flush instead of one per request:
# the client-side cost of packing commands dominated the worker's CPU per request. Returns
# FINALIZE's 1/0 each, or -1 where one failed (pcall: one bad request must not stop the
# others' finals). (All keys of one call must live on one node: fine for one Redis; a
# cluster needs the per-request form.)
FINALIZE_MANY = (
    FINALIZE_FUNCTIONS
    + """
local out = {}
local freed = {}
local backlogs = {}
for i = 0, #KEYS / 4 - 1 do
  local keys = {KEYS[4 * i + 1], KEYS[4 * i + 2], KEYS[4 * i + 3], KEYS[4 * i + 4]}
  local args = {ARGV[6 * i + 1], ARGV[6 * i + 2], ARGV[6 * i + 3], ARGV[6 * i + 4],
                ARGV[6 * i + 5], ARGV[6 * i + 6]}
  local ok, res = pcall(write, keys, args)
  if ok then
    out[i + 1] = res
    if res == 1 then
      local f = freed[keys[4]]
      if f == nil then
        f = {0, 0}
        freed[keys[4]] = f
        backlogs[#backlogs + 1] = keys[4]
      end
      f[1] = f[1] + tonumber(args[6])
      f[2] = f[2] + 1
    end
  else
    out[i + 1] = -1
  end
end
for _, backlog in ipairs(backlogs) do
  release(backlog, freed[backlog][1], freed[backlog][2])
end
return out
"""
)
MAX_FINALS_PER_CALL = 256  # bounds one script's run time (Redis is single-threaded)
FINAL_KEYS = 4  # per final in FINALIZE_MANY's KEYS
FINAL_ARGS = 6  # per final in FINALIZE_MANY's ARGV

# One packer for every body (``msgpack.packb`` builds a Packer per call); used on the loop only.
_pack = msgpack.Packer(use_bin_type=True).pack


def result_body(entry: Chunk | Done | Error) -> bytes:
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
        )
    if isinstance(entry, Chunk):
        body = {"index": entry.index, "delta": entry.delta}
    else:
        body = {"code": entry.code, "message": entry.message, "worker": entry.worker}
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
) -> bytes:
    """The msgpack body of a ``done`` result from its fields (``encode_result``'s bytes):
    the aggregator's path builds no Done / Usage / Timings objects."""
    packed: bytes = _pack(
        {
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
    )
    return packed


def result_fields(entry: Chunk | Done | Error) -> dict[str, bytes]:
    """``encode_result(entry)``: the stream fields of one result entry."""
    kind = (
        b"chunk" if isinstance(entry, Chunk) else b"done" if isinstance(entry, Done) else b"error"
    )
    return {RESULT_TYPE_FIELD: kind, RESULT_BODY_FIELD: result_body(entry)}


ScriptCall = tuple[int, AsyncScript, list[Any], list[Any]]  # pipeline index, script, keys, args


class ResultWriter:
    def __init__(self, redis: Redis, keys: Keys, model: str, worker: str) -> None:
        self.redis = redis
        self.keys = keys
        self.model = model
        self.worker = worker
        self._finalize_many = redis.register_script(FINALIZE_MANY)
        self._dead_raw = redis.register_script(DEAD_LETTER_RAW)
        self._ops: list[Op] = []
        # FINALIZE keys and arguments of the queued finals, flat (FINAL_KEYS / FINAL_ARGS each)
        self._final_keys: list[Any] = []
        self._final_args: list[Any] = []
        # Key names per request are prefix + id (checked here, built by concatenation there).
        self._result_prefix = keys.result("")
        self._final_prefix = keys.final("")
        assert keys.result("x") == self._result_prefix + "x"
        assert keys.final("x") == self._final_prefix + "x"
        self._backlog = keys.backlog(model)
        self._lock = asyncio.Lock()
        self.finals_written = 0  # FINALIZE calls that wrote (not answered before)
        # Once a flush has run with the scripts loaded, later flushes send EVALSHA without
        # redis-py's SCRIPT EXISTS round trip first; a call Redis answers NOSCRIPT (it
        # restarted, or SCRIPT FLUSH) did not run and is sent again with the script loaded.
        self._scripts_loaded = False
        self._script_calls: list[ScriptCall] = []  # of the pipeline being built

    @property
    def pending(self) -> int:
        return len(self._ops) + len(self._final_args) // FINAL_ARGS

    # --- queueing ---

    def chunk(self, request_id: str, index: int, delta: str) -> None:
        fields = result_fields(Chunk(index=index, delta=delta))
        key = self.keys.result(request_id)

        def op(pipe: Any) -> None:
            pipe.xadd(key, fields)
            pipe.expire(key, RESULT_TTL_S)

        self._ops.append(op)

    def final(self, entry: Entry, request_id: str, result: Done | Error, cost_tokens: int) -> None:
        """FINALIZE ``entry`` with ``result`` (a no-op write if a final already exists)."""
        kind = "done" if isinstance(result, Done) else "error"
        self._queue_final(entry, request_id, kind, result_body(result), cost_tokens)

    def done(
        self,
        entry: Entry,
        request_id: str,
        body: bytes,
        cost_tokens: int,
    ) -> None:
        """FINALIZE ``entry`` with a ``done`` whose body is ``done_body(...)``."""
        self._queue_final(entry, request_id, "done", body, cost_tokens)

    def _queue_final(
        self, entry: Entry, request_id: str, kind: str, body: bytes, cost_tokens: int
    ) -> None:
        self._final_keys += (
            self._result_prefix + request_id,
            self._final_prefix + request_id,
            entry.stream,
            self._backlog,
        )
        self._final_args += (GROUP, entry.entry_id, kind, body, RESULT_TTL_S, cost_tokens)

    def error(
        self, entry: Entry, request_id: str, code: str, message: str, cost_tokens: int
    ) -> None:
        self.final(
            entry, request_id, Error(code=code, message=message, worker=self.worker), cost_tokens
        )

    def dead_letter(self, entry: Entry, reason: str) -> None:
        """An entry nobody can answer (no request id): park it in the dead-letter stream."""
        payload = entry.fields.get(STREAM_FIELD.encode(), b"")[:MAX_PAYLOAD_IN_DEAD_LETTER]
        fields: list[Any] = [
            "id", "", "model", self.model, "stream", entry.stream, "entry_id", entry.entry_id,
            "reason", reason, "deliveries", entry.delivery_count, "worker", self.worker,
            "ts_ms", time.time_ns() // 1_000_000, "payload", payload,
        ]  # fmt: skip
        keys = [entry.stream, self.keys.dead, self.keys.backlog(self.model)]
        args: list[Any] = [GROUP, entry.entry_id, DEAD_MAXLEN, self.worker, *fields]

        def op(pipe: Any) -> None:
            self._script(pipe, self._dead_raw, keys, args)

        self._ops.append(op)

    def _script(self, pipe: Any, script: AsyncScript, keys: list[Any], args: list[Any]) -> None:
        """Queue EVALSHA on the pipeline being built (remembered, in case of NOSCRIPT)."""
        if not self._scripts_loaded:
            pipe.scripts.add(script)  # the pipeline loads it first if Redis lacks it
        self._script_calls.append((len(pipe.command_stack), script, keys, args))
        pipe.evalsha(script.sha, len(keys), *keys, *args)

    # --- sending ---

    async def flush(self) -> None:
        """Send everything queued so far in one pipeline (retried on connection errors).

        Chunks go first, then the finals, so a request's chunks precede its final entry.
        """
        async with self._lock:
            if not self._ops and not self._final_args:
                return
            ops, self._ops = self._ops, []
            final_keys, self._final_keys = self._final_keys, []
            final_args, self._final_args = self._final_args, []
            num_finals = len(final_args) // FINAL_ARGS
            for attempt, delay_s in enumerate((*RETRY_DELAYS_S, None)):
                try:
                    self._script_calls = []
                    pipe = self.redis.pipeline(transaction=False)
                    for op in ops:
                        op(pipe)
                    for start in range(0, num_finals, MAX_FINALS_PER_CALL):
                        end = start + MAX_FINALS_PER_CALL
                        self._script(
                            pipe,
                            self._finalize_many,
                            final_keys[start * FINAL_KEYS : end * FINAL_KEYS],
                            final_args[start * FINAL_ARGS : end * FINAL_ARGS],
                        )
                    replies = await pipe.execute(raise_on_error=False)
                    break
                except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                    if delay_s is None:
                        self._ops = ops + self._ops
                        self._final_keys = final_keys + self._final_keys
                        self._final_args = final_args + self._final_args
                        raise
                    log.warning(
                        "result write failed (%s); retry %d in %.2f s", err, attempt + 1, delay_s
                    )
                    await asyncio.sleep(delay_s)
            calls, self._script_calls = self._script_calls, []
            lost = [c for c in calls if isinstance(replies[c[0]], NoScriptError)]
            if calls:
                self._scripts_loaded = not lost
            for index, script, keys, args in lost:
                replies[index] = await self._run_again(script, keys, args)
            for reply in replies:
                if isinstance(reply, Exception):
                    log.error("result write command failed: %s", reply)
                elif isinstance(reply, list) and -1 in reply:
                    log.error("FINALIZE failed for %d requests of a batch", reply.count(-1))
            self.finals_written += sum(
                sum(1 for x in r if x == 1)
                for r in replies[len(replies) - _calls(num_finals) :]
                if isinstance(r, list)
            )

    async def _run_again(self, script: AsyncScript, keys: list[Any], args: list[Any]) -> Any:
        """A script call that did not run (NOSCRIPT), alone, loading the script (redis-py's
        ``Script.__call__``); retried on connection errors; if those last, it is queued
        again for the next flush and the error raised, like a failed flush."""
        for attempt, delay_s in enumerate((*RETRY_DELAYS_S, None)):
            try:
                return await script(keys=keys, args=args)
            except ResponseError as err:  # as the pipeline would have returned it
                return err
            except (RedisConnectionError, RedisTimeoutError, OSError) as err:
                if delay_s is None:
                    self._ops.insert(0, lambda pipe: self._script(pipe, script, keys, args))
                    raise
                log.warning(
                    "script call failed (%s); retry %d in %.2f s", err, attempt + 1, delay_s
                )
                await asyncio.sleep(delay_s)
        raise AssertionError("unreachable")


def _calls(num_finals: int) -> int:
    return -(-num_finals // MAX_FINALS_PER_CALL)
