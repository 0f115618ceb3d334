"""Engine outputs → text → results: incremental detokenization, stop strings, chunks, finals.

The engine process hands over each step's outputs as one batch (``on_outputs``, called on
the host loop, never blocking the engine). The aggregator takes every batch that arrived
since its last round, turns token ids into text per request, and queues the writes: one
``chunk`` per streaming request per round, and a final ``done`` / ``error`` via FINALIZE.
One pipeline per round carries them all.

Finish reasons: ``stop`` (eos or a stop string: a stop string also aborts the engine request
so its blocks free at once), ``length``, ``deadline`` (a ``done`` with the partial text),
``abort`` (the worker cancelled it: the ``error`` was already written), ``error`` (the
engine refused the request: ``error`` with ``prompt_too_long`` / ``invalid_request``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from gpu_engine.outputs import EngineCapacity as Capacity
from producer.protocol import Done, ErrorCode
from workers.admission import Admission
from workers.engine_process import EngineProcess, Output
from workers.metrics import Metrics
from workers.request import InflightRequest
from workers.results import ResultWriter, done_body

log = logging.getLogger(__name__)

# The loop is shared with intake: after this many outputs the aggregator yields (between
# step batches) so a request that just arrived is not held behind a long aggregation round.
YIELD_EVERY_OUTPUTS = 128


class Aggregator:
    def __init__(
        self,
        writer: ResultWriter,
        admission: Admission,
        engine: EngineProcess,
        metrics: Metrics,
        worker: str,
    ) -> None:
        self.writer = writer
        self.admission = admission
        self.engine = engine
        self.metrics = metrics
        self.worker = worker
        self._batches: list[list[Output]] = []
        self._arrived = asyncio.Event()
        self._closing = False

    # --- called by the engine process's reader on the loop ---

    def on_outputs(self, outputs: list[Output], capacity: Capacity) -> None:
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
            await self._arrived.wait()
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
        if req is None or req.finished:
            return  # already answered (cancelled / stop string): a late output for it
        if out.error is not None:
            code = (
                ErrorCode.PROMPT_TOO_LONG
                if "prompt" in out.error.lower()
                else ErrorCode.INVALID_REQUEST
            )
            self.fail(req, code.value, out.error)
            return
        if out.new_token_ids and req.first_token_s is None:
            req.first_token_s = now_s
            req.num_cached_tokens = out.num_cached_tokens
        self.metrics.tokens_generated += len(out.new_token_ids)
        stop_hit = req.detok.push(out.new_token_ids)
        if stop_hit:
            if not out.finished:
                self.engine.abort([req.request_id])
            self._done(req, "stop", now_s)
        elif out.finished:
            reason = out.finish_reason or "stop"
            if reason == "abort":
                # Only this worker aborts requests, and it answers them when it does; an
                # abort it did not order means the engine dropped the request.
                self.fail(req, ErrorCode.INTERNAL.value, "the engine aborted the request")
            else:
                self._done(req, reason, now_s)
        elif req.env.stream:
            self._stream(req)

    def _stream(self, req: InflightRequest, final: bool = False) -> None:
        delta = req.detok.stream_delta(final=final)
        if delta:
            self.writer.chunk(req.request_id, req.chunk_index, delta)
            req.chunk_index += 1

    def _done(self, req: InflightRequest, reason: str, now_s: float) -> None:
        detok = req.detok
        env = req.env
        text = detok.flush()
        if env.stream:
            self._stream(req, final=True)
        created_ms = env.created_ms or req.entry.enqueued_ms
        submitted_s = req.submitted_s or req.pulled_s
        first_s = req.first_token_s if req.first_token_s is not None else now_s
        total_ms = max(0.0, now_s * 1000 - created_ms)
        # The body of Done(text, reason, Usage(...), Timings(...), worker), packed directly.
        body = done_body(
            text,
            reason,
            len(req.prompt_ids),
            detok.num_tokens,
            req.num_cached_tokens,
            max(0.0, submitted_s * 1000 - created_ms),
            max(0.0, first_s * 1000 - created_ms),
            total_ms,
            max(0.0, (now_s - submitted_s) * 1000),
            self.worker,
        )
        self._finish(req)
        self.writer.done(req.entry, env.id, body, req.backlog_cost_tokens)
        if req.duplicates:
            self._ack_duplicates(req)
        self.metrics.completed += 1
        self.metrics.observe_latency_ms(total_ms)

    def fail(self, req: InflightRequest, code: str, message: str) -> None:
        """Answer an admitted request with an ``error`` (the caller aborts the engine side)."""
        self._finish(req)
        self.writer.error(req.entry, req.request_id, code, message, req.backlog_cost_tokens)
        self._ack_duplicates(req)
        self.metrics.count_error(code)

    def cancel(self, request_id: str) -> bool:
        """A requester's cancel: abort in the engine (blocks freed) and answer ``cancelled``."""
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
        self.writer.final(req.entry, request_id, _ALREADY, 0)
        self._ack_duplicates(req)
        return True

    def _abort(self, request_id: str) -> InflightRequest | None:
        """Abort an admitted, unfinished request in the engine; the request, else None."""
        req = self.admission.admitted.get(request_id)
        if req is None or req.finished:
            return None
        self.engine.abort([request_id])
        return req

    def _finish(self, req: InflightRequest) -> None:
        req.finished = True
        self.admission.release(req)

    def _ack_duplicates(self, req: InflightRequest) -> None:
        """Same request id queued twice: FINALIZE the copies after the original's final, so
        they only ack (the final marker exists by then)."""
        for dup in req.duplicates:
            self.writer.final(dup, req.request_id, _ALREADY, 0)


# FINALIZE never writes this: the original's final is queued first in the same pipeline.
_ALREADY = Done(text="", finish_reason="stop")
