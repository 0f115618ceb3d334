"""Intake: take entries from the lanes as capacity allows, validate, tokenize, hand to the engine.

Runs on the host's asyncio loop, never in the engine's. Per round:

1. ``Admission.pull_count()`` says how many entries fit; 0 → wait until a request finishes
   or the engine reports new capacity.
2. ``Lanes.pull`` reads that many (lanes in aging order); with all lanes empty, a blocking
   XREADGROUP waits for the next arrival.
3. ``process``: decode + validate (a bad envelope → ``error`` result and ack; one without a
   readable id → dead letter), drop cancelled (marker) and expired (``deadline_exceeded``)
   requests, apply the chat template and tokenize in a worker thread, refuse prompts that
   could never fit, then hand the batch to the engine in one message.

Entries claimed from dead workers and this consumer's own leftovers go through ``process``
as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from producer.errors import ProtocolError
from producer.keys import STREAM_FIELD, Keys
from producer.protocol import (
    DEFAULT_LIMITS,
    Envelope,
    ErrorCode,
    Limits,
    estimate_cost_tokens,
    unpack_bounded,
)
from producer.protocol import decode_envelope as decode
from workers.admission import Admission
from workers.aggregator import Aggregator
from workers.detokenizer import ContextTexts, IncrementalDetokenizer, fast_decoder
from workers.engine_process import AddCommand, EngineProcess
from workers.lanes import Entry, Lanes
from workers.metrics import Metrics
from workers.prompts import PromptBuilder
from workers.request import InflightRequest
from workers.results import ResultWriter

log = logging.getLogger(__name__)

_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
RECENT_CANCELS = 10_000
# Text the piece cache does not know is tokenized on the loop up to this size (a thread hop,
# ~0.1 ms and more while the loop is busy, costs more than the work); more goes to the
# tokenizer thread so results keep flowing meanwhile. A shared system prompt is cached, so
# only new turns count.
INLINE_TOKENIZE_MAX_CHARS = 4096
# Bounded rounds let intake, engine and aggregator overlap instead of taking turns; 256 (was
# 128) halves the Redis round trips per request, measured faster on the zero-cost bench.
MAX_PULL_PER_ROUND = 256
RETRY_DELAY_S = 0.5
SALVAGE_MAX_BYTES = 64 << 20
MARKER_ATTEMPTS = 20
OVERLAP_MARKERS_MIN = 16  # pulled entries from which the marker MGET goes out before tokenizing
_FIELD = STREAM_FIELD.encode()


def being_cancelled() -> bool:
    """True when the running task has a pending cancel (Python ≥ 3.11 tells; else False).

    A cancel that lands inside a redis-py call can surface as its ConnectionError /
    TimeoutError; loops that retry on those must not swallow a shutdown's cancel."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling is not None and cancelling())


def salvage_request_id(payload: bytes | None, limits: Limits) -> str | None:
    """The ``id`` of an envelope that failed validation, so its requester gets the error.

    An over-limit payload is still parsed (up to SALVAGE_MAX_BYTES) just to read its id.
    """
    data = payload or b""
    try:
        obj = unpack_bounded(data, max(limits.max_payload_bytes, min(len(data), SALVAGE_MAX_BYTES)))
    except ProtocolError:
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and _ID_RE.match(rid) else None


class Intake:
    def __init__(
        self,
        redis: Redis,
        keys: Keys,
        model: str,
        lanes: Lanes,
        admission: Admission,
        aggregator: Aggregator,
        writer: ResultWriter,
        engine: EngineProcess,
        prompts: PromptBuilder,
        metrics: Metrics,
        *,
        aging_s: float,
        read_block_ms: int,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.redis = redis
        self.keys = keys
        self.model = model
        self.lanes = lanes
        self.admission = admission
        self.aggregator = aggregator
        self.writer = writer
        self.engine = engine
        self.prompts = prompts
        self.metrics = metrics
        self.aging_s = aging_s
        self.read_block_ms = read_block_ms
        self.limits = limits
        self.stopping = asyncio.Event()
        self.recent_cancels: OrderedDict[str, None] = OrderedDict()
        self._prefetch: asyncio.Future[list[Entry]] | None = None  # the next round's pull
        self._prefetch_count = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._decoder = fast_decoder(prompts.tokenizer)
        self._context_texts = ContextTexts(self._decoder)
        # Marker names per request are prefix + id (checked here, built by concatenation).
        self._cancelled_prefix = keys.cancelled("")
        self._final_prefix = keys.final("")
        assert keys.cancelled("x") == self._cancelled_prefix + "x"
        assert keys.final("x") == self._final_prefix + "x"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def note_cancel(self, request_id: str) -> None:
        """Remember a cancel that may race with this request's intake."""
        self.recent_cancels[request_id] = None
        while len(self.recent_cancels) > RECENT_CANCELS:
            self.recent_cancels.popitem(last=False)

    async def run(self) -> None:
        """Pull until ``stopping`` is set; entries already delivered are always processed."""
        while not self.stopping.is_set():
            try:
                await self._round()
            except (RedisConnectionError, RedisTimeoutError) as err:
                if being_cancelled():
                    raise asyncio.CancelledError from err
                # A lost XREADGROUP reply may have delivered entries we never saw: they are
                # pending on us and no one else would take them while we live. Re-read them
                # (a prefetched pull's entries too, whether its reply came or not).
                log.warning("intake: Redis unavailable (%s); retrying", err)
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                    await self._settle_prefetch()
                await asyncio.sleep(RETRY_DELAY_S)
                with contextlib.suppress(RedisConnectionError, RedisTimeoutError):
                    await self.recover_delivered()
        entries = await self._settle_prefetch()
        if entries:
            await self.process(entries)

    async def _settle_prefetch(self) -> list[Entry]:
        task, self._prefetch = self._prefetch, None
        return [] if task is None else await task

    async def _round(self) -> None:
        if self._prefetch is not None:
            entries = await self._settle_prefetch()
            full = len(entries) >= self._prefetch_count
        else:
            n = self.admission.pull_count()
            if n == 0:
                self.admission.changed.clear()
                if self.admission.pull_count() == 0:
                    stop_wait = asyncio.ensure_future(self.stopping.wait())
                    room_wait = asyncio.ensure_future(self.admission.changed.wait())
                    await asyncio.wait(
                        {stop_wait, room_wait}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED
                    )
                    stop_wait.cancel()
                    room_wait.cancel()
                return
            count = min(n, MAX_PULL_PER_ROUND)
            entries = await self.lanes.pull(count)
            full = len(entries) >= count
            if not entries:
                entries = await self.lanes.wait(self.read_block_ms)
        if not entries:
            return
        self.metrics.pulled += len(entries)
        if full and not self.stopping.is_set():
            # More is queued: the next round's pull flies while this one is processed (its
            # Redis round trip hidden behind the CPU work), sized as if this round were
            # admitted already; at most two rounds are in the worker unprocessed.
            n_next = min(self.admission.pull_count() - len(entries), MAX_PULL_PER_ROUND)
            if n_next > 0:
                self._prefetch_count = n_next
                self._prefetch = asyncio.ensure_future(self.lanes.pull(n_next))
        await self.process(entries)

    async def recover_delivered(self) -> None:
        """Process entries pending on this consumer that this worker does not hold."""
        held = {(r.entry.stream, r.entry.entry_id) for r in self.admission.admitted.values()}
        held |= {(d.stream, d.entry_id) for r in self.admission.admitted.values()
                 for d in r.duplicates}  # fmt: skip
        lost = [e for e in await self.lanes.delivered() if (e.stream, e.entry_id) not in held]
        if lost:
            log.warning("intake: recovering %d delivered entries", len(lost))
            await self.process(lost)

    async def process(self, entries: Sequence[Entry]) -> None:
        candidates: list[tuple[Entry, Envelope]] = []
        for e in entries:
            c = self._decode(e)
            if c is not None:
                candidates.append(c)
        if candidates:
            envs = [env for _, env in candidates]
            markers = asyncio.ensure_future(self._markers(envs))
            try:
                if len(envs) >= OVERLAP_MARKERS_MIN:
                    # A big batch (a backlog): let the marker MGET go out first, its round
                    # trip hidden behind the tokenizing. A small one (calm) does not yield
                    # here: the loop's other callbacks would run first, on its latency.
                    await asyncio.sleep(0)
                self._admit(candidates, await self._tokenize(envs))
                # Markers after admission, off a request's path to the engine: a request
                # cancelled while queued, or answered already (by a worker that died before
                # acking), is withdrawn from the engine at once, milliseconds before its
                # first step could report anything.
                flags = await markers
            finally:
                markers.cancel()
            admitted, aggregator = self.admission.admitted, self.aggregator
            for i, (entry, env) in enumerate(candidates):
                cancelled, answered = flags[2 * i], flags[2 * i + 1]
                if not (cancelled or answered):
                    continue
                req = admitted.get(env.id)
                # Not admitted from this entry: refused (its error's FINALIZE only acks when
                # a final exists) or a duplicate (acked with the original's final).
                if req is not None and req.entry is entry:
                    if answered:
                        aggregator.withdraw(env.id)
                    else:
                        aggregator.cancel(env.id)
        await self.writer.flush()

    async def _tokenize(self, envs: list[Envelope]) -> list[list[int] | Exception]:
        """Chat template + piece split on the loop (Python); the tokenizer's Rust work on
        text it has not seen inline when small (a thread hop costs more), else in the
        tokenizer thread, which holds no GIL meanwhile."""
        prepared = self.prompts.prepare(envs)
        if prepared.todo_chars <= INLINE_TOKENIZE_MAX_CHARS:
            prepared.encode()
        else:
            await asyncio.get_running_loop().run_in_executor(self._pool, prepared.encode)
        return prepared.token_ids()

    async def _markers(self, envs: list[Envelope]) -> list[Any]:
        """[cancelled, answered] per request (one MGET), retried: these entries are ours now."""
        cancelled, final = self._cancelled_prefix, self._final_prefix
        keys: list[str] = []
        for env in envs:
            rid = env.id
            keys += (cancelled + rid, final + rid)
        for attempt in range(MARKER_ATTEMPTS):
            try:
                values: list[Any] = await self.redis.mget(keys)
                return [v is not None for v in values]
            except (RedisConnectionError, RedisTimeoutError):
                if attempt == MARKER_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(RETRY_DELAY_S * (attempt + 1))
        raise AssertionError("unreachable")

    def _decode(self, entry: Entry) -> tuple[Entry, Envelope] | None:
        payload = entry.fields.get(_FIELD)
        try:
            env = decode(payload, self.limits)
        except ProtocolError as err:
            rid = salvage_request_id(payload, self.limits)
            if rid is None:
                self.writer.dead_letter(entry, f"undecodable envelope: {err}")
                self.metrics.dead_lettered += 1
            else:
                self.writer.error(entry, rid, err.code, str(err), 0)
                self.metrics.count_error(err.code)
            return None
        if env.model != self.model:
            self._reject(
                entry,
                env,
                ErrorCode.MODEL_NOT_FOUND,
                f"this lane serves {self.model!r}, not {env.model!r}",
            )
            return None
        held = self.admission.admitted.get(env.id)
        if held is not None:  # the same request queued twice: answer once, ack both
            held.duplicates.append(entry)
            return None
        return entry, env

    def _reject(self, entry: Entry, env: Envelope, code: ErrorCode, message: str) -> None:
        self.writer.error(entry, env.id, code.value, message, estimate_cost_tokens(env))
        self.metrics.count_error(code.value)

    def _admit(
        self, ready: list[tuple[Entry, Envelope]], token_ids: list[list[int] | Exception]
    ) -> None:
        now_s = time.time()
        now_ms = int(now_s * 1000)
        admission = self.admission
        admitted = admission.admitted
        recent_cancels = self.recent_cancels
        decoder, context_texts = self._decoder, self._context_texts
        aging_s = self.aging_s
        commands: list[AddCommand] = []
        for (entry, env), ids in zip(ready, token_ids, strict=True):
            rid = env.id
            if rid in recent_cancels:  # cancelled since it was pulled
                self._reject(entry, env, ErrorCode.CANCELLED, "cancelled by the requester")
                continue
            if env.deadline_ms is not None and env.expired(now_ms):
                self._reject(
                    entry,
                    env,
                    ErrorCode.DEADLINE_EXCEEDED,
                    "the deadline passed while the request was queued",
                )
                continue
            if isinstance(ids, Exception):
                self._reject(
                    entry,
                    env,
                    ErrorCode.INVALID_REQUEST,
                    f"the chat template rejected the messages: {ids}",
                )
                continue
            p = env.params
            max_tokens = p.max_tokens
            if not ids or not admission.fits_alone(len(ids), max_tokens):
                self._reject(
                    entry,
                    env,
                    ErrorCode.PROMPT_TOO_LONG,
                    f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                    f"this worker's KV cache ({admission.capacity.total_kv_tokens}"
                    " tokens)",
                )
                continue
            held = admitted.get(rid)
            if held is not None:
                held.duplicates.append(entry)
                continue
            level = entry.level(aging_s, now_ms)
            req = InflightRequest(
                env=env,
                entry=entry,
                prompt_ids=ids,
                cost_tokens=admission.cost_tokens(len(ids), max_tokens),
                backlog_cost_tokens=estimate_cost_tokens(env),
                level=level,
                detok=IncrementalDetokenizer(decoder, ids, p.stop, context_texts),
                pulled_s=now_s,
                submitted_s=now_s,
            )
            admission.admit(req)
            commands.append(
                AddCommand(
                    request_id=rid,
                    prompt_token_ids=ids,
                    max_tokens=max_tokens,
                    temperature=p.temperature,
                    top_p=p.top_p,
                    top_k=p.top_k,
                    seed=p.seed,
                    ignore_eos=p.ignore_eos,
                    priority=level,
                    deadline_s=None if env.deadline_ms is None else env.deadline_ms / 1000.0,
                )
            )
        self.engine.add(commands)
        self.metrics.admitted += len(commands)
