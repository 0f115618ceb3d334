"""Intake: take entries from the lanes as capacity allows, validate, tokenize, hand to the engine.

Runs on the host's asyncio loop, never in the engine's. Per round:

1. ``Admission.pull_count()`` says how many entries fit; 0 → wait until a request finishes
   or the engine reports new capacity.
2. ``Lanes.pull`` reads that many (lanes in aging order); with all lanes empty, a blocking
   XREADGROUP waits for the next arrival.
3. ``process``: decode + validate (a bad envelope → ``error`` result and ack; one without a
   readable id, or one that is not the entry its id was reserved for → dead letter), drop
   cancelled (a marker with the request's cancel token) and expired (``deadline_exceeded``)
   requests, apply the chat template and tokenize in a worker thread, refuse prompts that
   could never fit, then hand the batch to the engine in one message.

Entries claimed from dead workers and this consumer's own leftovers go through ``process``
as well, and so do entries Redis says this worker holds while it does not: a lost reply, or
Redis restarted from data older than the worker's last writes (``reconcile``, every
``reconcile_interval_s`` and at once after Redis comes back). While result writes cannot
reach Redis, nothing new is pulled, so what waits to be written stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpu_engine.sequence import SamplingParams, StructuredOutput
from producer.connection import mget_any
from producer.contract.codec import decode_envelope as decode
from producer.contract.codec import salvage_request_id
from producer.contract.codes import ErrorCode
from producer.contract.envelope import Envelope
from producer.contract.finalize import FinalHooks
from producer.contract.keys import STREAM_FIELD, Keys
from producer.contract.limits import DEFAULT_LIMITS, Limits
from producer.contract.reservation import owner_digest, token_matches
from producer.errors import ProtocolError
from workers.admission import Admission
from workers.aggregator import Aggregator
from workers.answer import AnswerParser, AnswerSpec
from workers.detokenizer import ContextTexts, IncrementalDetokenizer, fast_decoder
from workers.engine_process import EngineProcess
from workers.engine_wire import AddCommand
from workers.lanes import Entry, Lanes
from workers.metrics import Metrics
from workers.prompts import PromptBuilder, PromptError
from workers.request import ChoiceState, InflightRequest, choice_engine_id
from workers.results import ResultWriter
from workers.resume import AnswerPoint, ResumePoint, read_resume_points

log = logging.getLogger(__name__)

RECENT_CANCELS = 10_000
# Text the piece cache does not know is tokenized on the loop up to this size (below it, a
# hop to the tokenizer thread costs more than the work, the more so while the loop is
# busy); more goes to the tokenizer thread so results keep flowing meanwhile. A shared
# system prompt is cached, so only new turns count.
INLINE_TOKENIZE_MAX_CHARS = 4096
# Bounded rounds let intake, engine and aggregator overlap instead of taking turns, and are
# large enough to keep the Redis round trips per request few (docs/benchmarks.md).
MAX_PULL_PER_ROUND = 256
RETRY_DELAY_S = 0.5
MARKER_ATTEMPTS = 20
_FIELD = STREAM_FIELD.encode()


def being_cancelled() -> bool:
    """True when the running task has a pending cancel (Python ≥ 3.11 tells; else False).

    A cancel that lands inside a redis-py call can surface as its ConnectionError /
    TimeoutError; loops that retry on those must not swallow a shutdown's cancel."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling is not None and cancelling())


class Intake:
    """Takes entries from one model's lanes as capacity allows and hands them to the engine."""

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
        reconcile_interval_s: float = 5.0,
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
        self.reconcile_interval_s = reconcile_interval_s
        self.limits = limits
        self._next_reconcile_s = time.monotonic() + reconcile_interval_s
        self.stopping = asyncio.Event()
        self.recent_cancels: OrderedDict[str, str] = OrderedDict()  # id → cancel token
        self._prefetch: asyncio.Future[list[Entry]] | None = None  # the next round's pull
        self._prefetch_count = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenize")
        self._decoder = fast_decoder(prompts.tokenizer)
        self._context_texts = ContextTexts(self._decoder)
        # Marker names per request are prefix + id (checked here, built by concatenation).
        self._reservation_prefix = keys.reservation("")
        self._cancelled_prefix = keys.cancelled("")
        self._final_prefix = keys.final("")
        if keys.partitions == 1:
            assert keys.reservation("x") == self._reservation_prefix + "x"
            assert keys.cancelled("x") == self._cancelled_prefix + "x"
            assert keys.final("x") == self._final_prefix + "x"

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def note_cancel(self, request_id: str, token: str) -> None:
        """Remember a cancel that may race with this request's intake (its token is checked
        against the request's reservation there)."""
        self.recent_cancels[request_id] = token
        while len(self.recent_cancels) > RECENT_CANCELS:
            self.recent_cancels.popitem(last=False)

    async def run(self) -> None:
        """Pull until ``stopping`` is set; entries already delivered are always processed."""
        while not self.stopping.is_set():
            try:
                await self._round()
                if self._prefetch is None and self._reconcile_due():
                    await self.reconcile()
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
                self._next_reconcile_s = 0.0  # and whatever else Redis came back with
        entries = await self._settle_prefetch()
        await self.lanes.close()
        if entries:
            await self.process(entries)

    def _reconcile_due(self) -> bool:
        return time.monotonic() >= self._next_reconcile_s

    async def _settle_prefetch(self) -> list[Entry]:
        task, self._prefetch = self._prefetch, None
        return [] if task is None else await task

    async def _round(self) -> None:
        if self._prefetch is not None:
            entries = await self._settle_prefetch()
            full = len(entries) >= self._prefetch_count
        elif self.writer.failing:
            # Redis is away for writes: take nothing new (what waits to be written stays
            # what this worker held); the aggregator retries the writes meanwhile.
            await asyncio.sleep(RETRY_DELAY_S)
            return
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
        if full and not self.stopping.is_set() and not self._reconcile_due():
            # More is queued: the next round's pull flies while this one is processed (its
            # Redis round trip hidden behind the CPU work), sized as if this round were
            # admitted already; at most two rounds are in the worker unprocessed. Not when
            # a reconcile is due: it waits for a round with no pull in flight, and under a
            # backlog every round would otherwise start one.
            n_next = min(self.admission.pull_count() - len(entries), MAX_PULL_PER_ROUND)
            if n_next > 0:
                self._prefetch_count = n_next
                self._prefetch = asyncio.ensure_future(self.lanes.pull(n_next))
        await self.process(entries)

    def held(self) -> set[tuple[str, str]]:
        """(lane, entry id) of every entry this worker holds: admitted (and their
        duplicates), or answered with the final not written yet."""
        admitted = self.admission.admitted.values()
        held = {(r.entry.stream, r.entry.entry_id) for r in admitted}
        held |= {(d.stream, d.entry_id) for r in admitted for d in r.duplicates}
        return held | self.writer.held_entries()

    async def recover_delivered(self) -> None:
        """Process entries pending on this consumer that this worker does not hold."""
        held = self.held()
        lost = [e for e in await self.lanes.delivered() if (e.stream, e.entry_id) not in held]
        if lost:
            log.warning("intake: recovering %d delivered entries", len(lost))
            await self.process(lost)

    async def reconcile(self) -> int:
        """Re-handle what Redis says this worker holds but it does not (idle at least one
        ``reconcile_interval_s``: entries on their way in are spared); returns how many."""
        self._next_reconcile_s = time.monotonic() + self.reconcile_interval_s
        lost = await self.lanes.stale(int(self.reconcile_interval_s * 1000), self.held())
        if lost:
            log.warning("intake: %d entries pending on this worker were not held; re-handling",
                        len(lost))  # fmt: skip
            self.metrics.reconciled += len(lost)
            await self.process(lost)
        return len(lost)

    async def process(self, entries: Sequence[Entry]) -> None:
        """Check each entry against its id's reservation (one MGET with the cancel and
        final markers), answer or park what cannot run, hand the rest to the engine."""
        read = [self._read(e) for e in entries]
        marks = await self._markers([rid for _, _, rid, _ in read if rid is not None])
        candidates: list[tuple[Entry, Envelope]] = []
        flags: list[tuple[bool, bool]] = []
        digests: dict[str, str] = {}
        k = 0
        for entry, env, rid, err in read:
            if rid is None:
                self.writer.dead_letter(entry, f"undecodable envelope: {err}")
                self.metrics.dead_lettered += 1
                continue
            reservation, cancel_token, final = marks[3 * k : 3 * k + 3]
            k += 1
            digest = owner_digest(reservation, entry.stream, entry.entry_id)
            if digest is None:
                # Not the entry ENQUEUE reserved this id for (queued with raw commands, or
                # a copy of someone else's id): answering it would answer that request.
                self.writer.dead_letter(entry, "not the entry its request id was reserved for")
                self.metrics.dead_lettered += 1
                continue
            if env is None:
                assert err is not None
                self.writer.error(entry, rid, err.code, str(err))
                self.metrics.count_error(err.code)
                continue
            if self._take(entry, env):
                candidates.append((entry, env))
                digests[env.id] = digest
                flags.append((token_matches(cancel_token, digest), final is not None))
        if candidates:
            points = await self._resume_points(candidates)
            tokens, specs = await self._tokenize([e for _, e in candidates])
            self._admit(candidates, tokens, specs, digests, points)
            self._withdraw_marked(candidates, flags)
        await self.writer.flush()

    def _withdraw_marked(
        self, candidates: list[tuple[Entry, Envelope]], flags: list[tuple[bool, bool]]
    ) -> None:
        """A request cancelled while queued, or answered already (by a worker that died
        before acking), is withdrawn from the engine at once, before its first step could
        report anything."""
        admitted, aggregator = self.admission.admitted, self.aggregator
        for (entry, env), (cancelled, answered) in zip(candidates, flags, strict=True):
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

    async def _resume_points(
        self, candidates: list[tuple[Entry, Envelope]]
    ) -> dict[str, ResumePoint]:
        """Half-finished answers among redelivered streaming requests (a fresh entry has
        none to look for), retried like the markers: these entries are ours now."""
        ids = [env.id for entry, env in candidates if env.stream and entry.redelivered]
        if not ids:
            return {}
        logprobs = {env.id for _, env in candidates if env.params.logprobs is not None}
        for attempt in range(MARKER_ATTEMPTS):
            try:
                return await read_resume_points(self.redis, self.keys, ids, logprobs)
            except (RedisConnectionError, RedisTimeoutError):
                if attempt == MARKER_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(RETRY_DELAY_S * (attempt + 1))
        raise AssertionError("unreachable")

    async def _tokenize(
        self, envs: list[Envelope]
    ) -> tuple[list[list[int] | Exception], list[AnswerSpec | None]]:
        """Chat template + piece split on the loop (Python); the tokenizer's Rust work on
        text it has not seen inline when small (a thread hop costs more), else in the
        tokenizer thread, which holds no GIL meanwhile."""
        prepared = self.prompts.prepare(envs)
        if prepared.todo_chars <= INLINE_TOKENIZE_MAX_CHARS:
            prepared.encode()
        else:
            await asyncio.get_running_loop().run_in_executor(self._pool, prepared.encode)
        specs: list[AnswerSpec | None] = prepared.specs
        return prepared.token_ids(), specs

    async def _markers(self, request_ids: list[str]) -> list[Any]:
        """[reservation, cancel marker, final marker] per request id (one MGET), retried:
        these entries are ours now."""
        if not request_ids:
            return []
        keys: list[str] = []
        if self.keys.partitions == 1:  # names are prefix + id (checked in __init__)
            reservation, cancelled, final = self._reservation_prefix, self._cancelled_prefix, (
                self._final_prefix)  # fmt: skip
            for rid in request_ids:
                keys += (reservation + rid, cancelled + rid, final + rid)
        else:
            for rid in request_ids:
                keys += (self.keys.reservation(rid), self.keys.cancelled(rid), self.keys.final(rid))
        for attempt in range(MARKER_ATTEMPTS):
            try:
                values: list[Any] = await mget_any(self.redis, keys)
                return values
            except (RedisConnectionError, RedisTimeoutError):
                if attempt == MARKER_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(RETRY_DELAY_S * (attempt + 1))
        raise AssertionError("unreachable")

    def _read(
        self, entry: Entry
    ) -> tuple[Entry, Envelope | None, str | None, ProtocolError | None]:
        """The entry's envelope, or the error it failed with and the id salvaged from it."""
        payload = entry.fields.get(_FIELD)
        try:
            env = decode(payload, self.limits)
        except ProtocolError as err:
            return entry, None, salvage_request_id(payload, self.limits), err
        return entry, env, env.id, None

    def _take(self, entry: Entry, env: Envelope) -> bool:
        """False for an entry answered here and now (another model's) or held as a second
        entry of a request this worker runs (acked with its final)."""
        if env.model != self.model:
            self._reject(
                entry,
                env,
                ErrorCode.MODEL_NOT_FOUND,
                f"this lane serves {self.model!r}, not {env.model!r}",
            )
            return False
        held = self.admission.admitted.get(env.id)
        if held is not None:  # the same request queued twice: answer once, ack both
            held.duplicates.append(entry)
            return False
        return True

    def _reject(self, entry: Entry, env: Envelope, code: ErrorCode, message: str) -> None:
        # Its charge goes back to the backlog ENQUEUE charged: its own model's.
        self.writer.error(
            entry, env.id, code.value, message, model=env.model, hooks=FinalHooks.of(env)
        )
        if env.tenant is not None:
            self.metrics.tenant_errors[env.tenant] += 1
        self.metrics.count_error(code.value)

    def _admit(
        self,
        ready: list[tuple[Entry, Envelope]],
        token_ids: list[list[int] | Exception],
        specs: list[AnswerSpec | None],
        digests: dict[str, str],
        points: dict[str, ResumePoint],
    ) -> None:
        """Refuse what cannot run, register the rest and hand it to the engine at once."""
        now_s = time.time()
        now_ms = int(now_s * 1000)
        commands: list[AddCommand] = []
        for (entry, env), ids, spec in zip(ready, token_ids, specs, strict=True):
            digest = digests[env.id]
            refusal = self._refusal(env, ids, now_ms, digest)
            if refusal is not None:
                self._reject(entry, env, *refusal)
                continue
            assert not isinstance(ids, Exception)
            # A request whose answer is split (reasoning, tool calls) starts over rather
            # than resuming: its chunks hold the parts, not the raw text to go on from.
            point = points.get(env.id) if spec is None else None
            commands += self._register(entry, env, ids, spec, now_s, now_ms, digest, point)
        self.engine.add(commands)
        self.metrics.admitted += len(commands)

    def _refusal(
        self, env: Envelope, ids: list[int] | Exception, now_ms: int, digest: str
    ) -> tuple[ErrorCode, str] | None:
        """Why this request cannot run (cancelled, expired, unrenderable, too long), or None."""
        if token_matches(self.recent_cancels.get(env.id), digest):  # cancelled since pulled
            return ErrorCode.CANCELLED, "cancelled by the requester"
        if env.deadline_ms is not None and env.expired(now_ms):
            return ErrorCode.DEADLINE_EXCEEDED, "the deadline passed while the request was queued"
        if isinstance(ids, PromptError):
            return ErrorCode.INVALID_REQUEST, str(ids)
        if isinstance(ids, Exception):
            return ErrorCode.INVALID_REQUEST, f"the chat template rejected the messages: {ids}"
        max_tokens, n = env.params.max_tokens, env.params.n
        admission = self.admission
        if not ids or not admission.fits_alone(len(ids), n * max_tokens):
            answers = f"{n} x max_tokens ({max_tokens})" if n > 1 else f"max_tokens ({max_tokens})"
            return ErrorCode.PROMPT_TOO_LONG, (
                f"prompt ({len(ids)} tokens) + {answers} exceeds this "
                f"worker's KV cache ({admission.capacity.total_kv_tokens} tokens)"
            )
        return None

    def _register(
        self,
        entry: Entry,
        env: Envelope,
        ids: list[int],
        spec: AnswerSpec | None,
        now_s: float,
        now_ms: int,
        digest: str,
        point: ResumePoint | None = None,
    ) -> list[AddCommand]:
        """Admit the request and return its engine commands; none for a second entry of a
        request held already (acked with its final), or for a resumed request that had
        nothing left to generate (answered at once)."""
        admission = self.admission
        held = admission.admitted.get(env.id)
        if held is not None:
            held.duplicates.append(entry)
            return []
        p = env.params
        if spec is not None and spec.grammar is not None:  # a forced tool call
            p = dataclasses.replace(p, structured=StructuredOutput("grammar", spec.grammar))
        level = entry.level(self.aging_s, now_ms)
        req = InflightRequest(
            env=env,
            entry=entry,
            prompt_ids=ids,
            cost_tokens=admission.cost_tokens(len(ids), p.max_tokens, p.n),
            level=level,
            detok=IncrementalDetokenizer(self._decoder, ids, p.stop, self._context_texts),
            pulled_s=now_s,
            submitted_s=now_s,
            answer=None if spec is None else AnswerParser(spec),
            cancel_digest=digest,
            logprobs=None if p.logprobs is None else [],
        )
        admission.admit(req)
        deadline_unix_s = None if env.deadline_ms is None else env.deadline_ms / 1000
        params = p if p.n == 1 else self._answers(req, spec, p, level, deadline_unix_s)
        command = AddCommand(env.id, ids, params, level, deadline_unix_s)
        return [command] if point is None else self._resumed(req, point, command)

    def _answers(
        self,
        req: InflightRequest,
        spec: AnswerSpec | None,
        p: SamplingParams,
        level: int,
        deadline_unix_s: float | None,
    ) -> SamplingParams:
        """An n > 1 request's answers 1..n-1 (their state, and their engine commands, sent
        once answer 0's prefill has run) and answer 0's own parameters. Each answer is one
        engine sequence with its own seed (seed + k), as ``LLM.generate`` runs n."""
        ids = req.prompt_ids
        for k in range(1, p.n):
            req.siblings.append(
                ChoiceState(
                    k,
                    IncrementalDetokenizer(self._decoder, ids, p.stop, self._context_texts),
                    answer=None if spec is None else AnswerParser(spec),
                    logprobs=None if p.logprobs is None else [],
                )
            )
            seed = None if p.seed is None else (p.seed + k) % 2**63
            engine_id = choice_engine_id(req.request_id, k)
            params = replace(p, n=1, seed=seed)
            req.waiting_siblings.append(AddCommand(engine_id, ids, params, level, deadline_unix_s))
        return replace(p, n=1)

    def _resumed(
        self, req: InflightRequest, point: ResumePoint, first: AddCommand
    ) -> list[AddCommand]:
        """Take over a half-finished request (:mod:`workers.resume`): each answer's tokens
        in the chunks as generated already, chunk indexes on from theirs. An answer with
        nothing left to generate ends at once; the others' commands go on from their
        tokens (answers 1..n-1 still after answer 0's prefill, when it runs)."""
        self.metrics.resumed += 1
        req.first_chunk_index = point.next_index
        req.resumed_tokens = len(point.token_ids)
        log.info("intake: resuming %s after %d tokens (%d chunks)", req.request_id,
                 len(point.token_ids), point.next_index)  # fmt: skip
        answers: list[InflightRequest | ChoiceState] = [req, *req.siblings]
        commands: list[AddCommand] = []
        for answer, command in zip(answers, [first, *req.waiting_siblings], strict=True):
            done = point.answer(answer.choice_index)
            reason = self._resume_answer(req, answer, done)
            if reason is not None:
                self.aggregator.end_now(req, answer, reason)
            else:
                commands.append(_continued(command, done.token_ids))
        req.waiting_siblings = []
        if req.final is None and len(commands) > 1:
            req.waiting_siblings = commands[1:]
            return commands[:1]
        return commands

    def _resume_answer(
        self, req: InflightRequest, answer: InflightRequest | ChoiceState, point: AnswerPoint
    ) -> str | None:
        """Put an answer's chunks into its state: its finish reason when nothing is left
        to generate (a stop string or end of sequence among them, or all of
        ``max_tokens``), else None."""
        if answer.logprobs is not None:
            answer.logprobs += point.logprobs
        p = req.env.params
        if answer.detok.resume(point.token_ids, len(point.text)):
            return "stop"
        last = point.token_ids[-1] if point.token_ids else None
        if last is not None and not p.ignore_eos and last in self.engine.eos_token_ids:
            return "stop"
        if len(point.token_ids) >= p.max_tokens:
            return "length"
        return None


def _continued(command: AddCommand, generated: list[int]) -> AddCommand:
    """``command`` going on after the tokens an answer generated already (prefilled with
    the prompt; a grammar and the penalties count them as generated)."""
    if not generated:
        return command
    p = command.params
    params = replace(p, max_tokens=p.max_tokens - len(generated), num_resumed_tokens=len(generated))
    return replace(command, prompt_token_ids=command.prompt_token_ids + generated, params=params)
