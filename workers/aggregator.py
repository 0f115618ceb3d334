"""Engine outputs → text → results: incremental detokenization, stop strings, chunks, finals.

The engine process hands over each step's outputs as one batch (``on_outputs``, called on
the host loop, never blocking the engine). The aggregator takes every batch that arrived
since its last round, turns token ids into text per request, and queues the writes: one
``chunk`` per streaming request per round, and a final ``done`` / ``error`` via FINALIZE.
One pipeline per round carries them all. While Redis is away the writes stay queued and
are retried after the writer's backoff, without waiting for new outputs; a request whose
entry another worker took over (the writer's fence) is dropped from the engine unanswered.

Each chunk carries the ids of the tokens generated since the previous one (and, when the
request asked, their logprobs entries), so a worker that takes over a half-finished request
(:mod:`workers.resume`) can continue it.

A request for n > 1 answers runs as n engine sequences (answer k as ``<id>#k``, added once
answer 0's prefill has run, so they share its prompt blocks); each answer is detokenized,
streamed (chunks name their ``choice``) and ended on its own, and the ``done`` is written
when the last one ends. One answer failing fails them all.

Finish reasons: ``stop`` (eos or a stop string: a stop string also aborts the engine request
so its blocks free at once), ``length``, ``deadline`` (a ``done`` with the partial text),
``abort`` (the worker cancelled it: the ``error`` was already written), ``error`` (the
engine refused the request: an ``error`` whose code follows the engine's typed refusal
reason, :data:`ERROR_CODE_OF_REFUSAL`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from gpu_engine.outputs import EngineCapacity
from gpu_engine.sequence import RefusalReason
from producer.contract.codes import ErrorCode
from producer.contract.finalize import FinalHooks
from producer.contract.keys import RESULT_TTL_S
from producer.contract.reservation import token_matches
from producer.contract.results import Choice, Done, done_body
from producer.contract.tools import ToolCall
from workers.admission import Admission
from workers.answer import Parts
from workers.engine_process import EngineProcess
from workers.engine_wire import Output
from workers.logprobs import TokenTexts
from workers.metrics import Metrics
from workers.request import CHOICE_SEPARATOR, ChoiceState, InflightRequest, choice_engine_id
from workers.results import ResultWriter

log = logging.getLogger(__name__)

# The error code of each reason the engine refuses a request for.
ERROR_CODE_OF_REFUSAL = {
    RefusalReason.PROMPT_TOO_LONG: ErrorCode.PROMPT_TOO_LONG,
    RefusalReason.INVALID_PROMPT: ErrorCode.INVALID_REQUEST,
    RefusalReason.INVALID_PARAMS: ErrorCode.INVALID_REQUEST,
    RefusalReason.DUPLICATE_ID: ErrorCode.INTERNAL,  # the host never sends one twice
    RefusalReason.INTERNAL: ErrorCode.INTERNAL,
}
# One answer of a request: the request itself (answer 0), or another of an n > 1 request's.
Answer = InflightRequest | ChoiceState
# The loop is shared with intake: after this many outputs the aggregator yields (between
# step batches) so a request that just arrived is not held behind a long aggregation round.
YIELD_EVERY_OUTPUTS = 128


class Aggregator:
    """Turns the engine's step outputs into result writes (see the module docstring)."""

    def __init__(
        self,
        writer: ResultWriter,
        admission: Admission,
        engine: EngineProcess,
        metrics: Metrics,
        worker: str,
        token_texts: TokenTexts | None = None,
    ) -> None:
        self.writer = writer
        self.admission = admission
        self.engine = engine
        self.metrics = metrics
        self.worker = worker
        # Names tokens in logprobs entries (requests with params.logprobs need it).
        self.token_texts = token_texts
        self._batches: list[list[Output]] = []
        self._arrived = asyncio.Event()
        self._closing = False
        writer.on_fenced = self.drop

    # --- called by the engine process's reader on the loop ---

    def on_outputs(self, outputs: list[Output], capacity: EngineCapacity) -> None:
        self.admission.update(capacity)
        if outputs:
            self._batches.append(outputs)
            self._arrived.set()

    # --- the loop ---

    def stop(self) -> None:
        """End ``run`` after its current round (the worker has drained by then)."""
        self._closing = True
        self._arrived.set()

    async def run(self) -> None:
        while not self._closing:
            retry_in_s = self.writer.retry_in_s()
            if retry_in_s is None:
                await self._arrived.wait()
            else:  # writes wait for Redis: try again when due, outputs or not
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._arrived.wait(), max(retry_in_s, 0.01))
            self._arrived.clear()
            batches, self._batches = self._batches, []
            now_s = time.time()
            handled = 0
            for batch in batches:
                if handled >= YIELD_EVERY_OUTPUTS:
                    # Let a newly arrived request's intake run between step batches.
                    await asyncio.sleep(0)
                    handled = 0
                for out in batch:
                    self._handle(out, now_s)
                handled += len(batch)
            await self.writer.flush()

    def _handle(self, out: Output, now_s: float) -> None:
        req = self.admission.admitted.get(out.request_id)
        answer: Answer | None = req
        if req is None:  # answer k > 0 of an n > 1 request: "<request id>#k"
            req, answer = self._answer_of(out.request_id)
        if req is None or answer is None or req.finished or answer.final is not None:
            return  # already answered (cancelled / stop string): a late output for it
        if out.refusal is not None:
            self._fail_answers(
                req, ERROR_CODE_OF_REFUSAL[out.refusal.reason].value, out.refusal.message
            )
            return
        if out.new_token_ids and req.first_token_s is None:
            req.first_token_s = now_s
            # A resumed request's prefill covered its generated tokens too: only its prompt's
            # share counts as cached prompt tokens.
            req.num_cached_tokens = min(out.num_cached_tokens, len(req.prompt_ids))
        if req.waiting_siblings and answer is req:
            # Answer 0's prefill has run: the others find the prompt's blocks cached.
            self.engine.add(req.waiting_siblings)
            req.waiting_siblings = []
        self.metrics.tokens_generated += len(out.new_token_ids)
        if answer is not req and out.new_token_ids and not answer.detok.num_tokens:
            # A further answer's first token: its prompt blocks were answer 0's.
            self.metrics.shared_prompt_tokens += min(out.num_cached_tokens, len(req.prompt_ids))
        if req.env.stream:
            answer.unsent_tokens += out.new_token_ids
        if answer.logprobs is not None and out.logprobs is not None:
            self._keep_logprobs(req, answer, out)
        if answer.detok.push(out.new_token_ids):  # a stop string
            if not out.finished:
                self.engine.abort([choice_engine_id(req.request_id, answer.choice_index)])
            self._end(req, answer, "stop", now_s)
        elif out.finished:
            reason = out.finish_reason or "stop"
            if reason == "abort":
                # Only this worker aborts requests, and it answers them when it does; an
                # abort it did not order means the engine dropped the request.
                message = "the engine aborted the request"
                self._fail_answers(req, ErrorCode.INTERNAL.value, message)
            else:
                self._end(req, answer, reason, now_s)
        elif req.env.stream:
            self._stream(req, answer)

    def _fail_answers(self, req: InflightRequest, code: str, message: str) -> None:
        """One answer failed: so does the request (an n > 1 request's other answers are
        aborted in the engine)."""
        if req.siblings:
            self.engine.abort(req.engine_ids)
        self.fail(req, code, message)

    def _answer_of(self, engine_id: str) -> tuple[InflightRequest | None, Answer | None]:
        rid, _, index = engine_id.rpartition(CHOICE_SEPARATOR)
        req = self.admission.admitted.get(rid) if index.isdigit() else None
        return (req, req.choice(int(index))) if req is not None else (None, None)

    def _keep_logprobs(self, req: InflightRequest, answer: Answer, out: Output) -> None:
        """The new token's logprobs entry, for the final and (streaming) the next chunk."""
        assert answer.logprobs is not None and out.logprobs is not None
        assert self.token_texts is not None, "a worker serving logprobs names its tokens"
        entry = self.token_texts.entry(out.new_token_ids[0], out.logprobs)
        answer.logprobs.append(entry)
        if req.env.stream:
            answer.unsent_logprobs.append(entry)

    def _stream(self, req: InflightRequest, answer: Answer, final: bool = False) -> None:
        """A chunk of ``answer``'s new text (its parts: reasoning, text, finished tool
        calls, when the answer is split); nothing while no text is ready."""
        delta = answer.detok.stream_delta(final=final)
        parts = _split(answer, delta, final) if answer.answer is not None else None
        if parts is not None and not parts:
            return
        if parts is None and not delta:
            return
        ttl_s = req.env.result_ttl_s
        self.writer.chunk(
            req.entry,
            req.request_id,
            delta if parts is None else parts.content,
            answer.unsent_tokens,
            first_index=req.first_chunk_index,
            ttl_s=RESULT_TTL_S if ttl_s is None else ttl_s,
            reasoning="" if parts is None else parts.reasoning,
            tool_calls=() if parts is None else tuple(parts.tool_calls),
            logprobs=answer.unsent_logprobs,
            choice=answer.choice_index,
        )
        answer.unsent_tokens = []
        answer.unsent_logprobs = []

    def _end(self, req: InflightRequest, answer: Answer, reason: str, now_s: float) -> None:
        """``answer`` ended: its final parts; the request's ``done`` once every answer has."""
        env = req.env
        text = answer.detok.flush()
        if env.stream:
            self._stream(req, answer, final=True)
        reasoning, calls = "", tuple[ToolCall, ...]()
        if answer.answer is not None:
            if not env.stream:
                _split(answer, answer.detok.stream_delta(final=True), True)
            total = answer.answer.total
            text, reasoning, calls = total.content, total.reasoning, tuple(total.tool_calls)
            if calls and reason == "stop":
                reason = "tool_calls"
        logprobs = tuple(answer.logprobs or ())
        answer.final = Choice(answer.choice_index, text, reason, reasoning, calls, logprobs)
        if all(c.final is not None for c in req.siblings) and req.final is not None:
            self._done(req, now_s)

    def _done(self, req: InflightRequest, now_s: float) -> None:
        """Write the request's ``done``: its answers, usage and timings."""
        env = req.env
        first = req.final
        assert first is not None
        choices = (first, *(c.final for c in req.siblings if c.final is not None))
        completion_tokens = req.detok.num_tokens + sum(c.detok.num_tokens for c in req.siblings)
        created_ms = env.created_ms or req.entry.enqueued_ms
        submitted_s = req.submitted_s or req.pulled_s
        first_s = req.first_token_s if req.first_token_s is not None else now_s
        total_ms = max(0.0, now_s * 1000 - created_ms)
        # The body of Done(text, reason, Usage(...), Timings(...), worker), packed directly.
        body = done_body(
            first.text,
            first.finish_reason,
            len(req.prompt_ids),
            completion_tokens,
            req.num_cached_tokens,
            max(0.0, submitted_s * 1000 - created_ms),
            max(0.0, first_s * 1000 - created_ms),
            total_ms,
            max(0.0, (now_s - submitted_s) * 1000),
            self.worker,
            reasoning_content=first.reasoning_content,
            tool_calls=first.tool_calls,
            logprobs=first.logprobs,
            choices=choices if req.siblings else (),
        )
        self._finish(req)
        self.writer.done(req.entry, env.id, body, FinalHooks.of(env))
        if req.duplicates:
            self._ack_duplicates(req)
        self.metrics.observe_done(
            first.finish_reason,
            prompt_tokens=len(req.prompt_ids),
            cached_tokens=req.num_cached_tokens,
            completion_tokens=completion_tokens,
            queue_wait_s=max(0.0, submitted_s - created_ms / 1000),
            ttft_s=max(0.0, first_s - created_ms / 1000),
            e2e_s=total_ms / 1000,
        )
        if env.tenant is not None:
            self.metrics.tenant_completed[env.tenant] += 1

    def end_now(self, req: InflightRequest, answer: Answer, reason: str) -> None:
        """A resumed answer with nothing left to generate: end it from its chunks (the
        request is answered once all its answers have ended)."""
        self._end(req, answer, reason, time.time())

    def fail(self, req: InflightRequest, code: str, message: str) -> None:
        """Answer an admitted request with an ``error`` (the caller aborts the engine side)."""
        self._finish(req)
        self.writer.error(req.entry, req.request_id, code, message, hooks=FinalHooks.of(req.env))
        if req.env.tenant is not None:
            self.metrics.tenant_errors[req.env.tenant] += 1
        self._ack_duplicates(req)
        self.metrics.count_error(code)

    def cancel(self, request_id: str, token: str | None = None) -> bool:
        """A requester's cancel: abort in the engine (blocks freed) and answer ``cancelled``.
        ``token``: the cancel stream's, honoured only when it is the request's own (intake
        passes None for a marker it has checked already)."""
        held = self.admission.admitted.get(request_id)
        if token is not None and (held is None or not token_matches(token, held.cancel_digest)):
            return False
        req = self._abort(request_id)
        if req is None:
            return False
        self.fail(req, ErrorCode.CANCELLED.value, "cancelled by the requester")
        return True

    def withdraw(self, request_id: str) -> bool:
        """An admitted request turned out to be answered already (by a worker that died
        before acking): abort it in the engine and ack its entry without a second answer."""
        req = self._abort(request_id)
        if req is None:
            return False
        self._finish(req)
        self.writer.final(req.entry, request_id, _ALREADY)
        self._ack_duplicates(req)
        return True

    def drop(self, request_ids: list[str]) -> None:
        """Requests whose entries another worker took over (its chunks were fenced off), or
        whose streams lost chunks (Redis restarted from older data): abort them in the
        engine, unanswered; whoever holds the entry then answers it, resuming from the
        chunks its stream kept (this worker too, when it still holds it: reconcile)."""
        for request_id in request_ids:
            req = self._abort(request_id)
            if req is not None:
                log.warning("%s: %s was taken over, or its stream lost chunks; dropped",
                            self.worker, request_id)  # fmt: skip
                self._finish(req)
                self.metrics.fenced += 1

    def _abort(self, request_id: str) -> InflightRequest | None:
        """Abort an admitted, unfinished request in the engine; the request, else None."""
        req = self.admission.admitted.get(request_id)
        if req is None or req.finished:
            return None
        self.engine.abort(req.engine_ids)
        return req

    def _finish(self, req: InflightRequest) -> None:
        req.finished = True
        self.admission.release(req)

    def _ack_duplicates(self, req: InflightRequest) -> None:
        """Same request id queued twice: FINALIZE the copies after the original's final, so
        they only ack (the final marker exists by then) and give back their own charge."""
        for dup in req.duplicates:
            self.writer.final(dup, req.request_id, _ALREADY)


def _split(state: Answer, delta: str, final: bool) -> Parts:
    """The parts of ``delta`` (and, when ``final``, of everything held back)."""
    answer = state.answer
    assert answer is not None
    parts = answer.feed(delta) if delta else Parts()
    if final:
        parts.add(answer.finish())
    return parts


# FINALIZE never writes this: the original's final is queued first in the same pipeline.
_ALREADY = Done(text="", finish_reason="stop")
