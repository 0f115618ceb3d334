"""Continuous batching over the paged KV cache (no torch).

Each ``schedule()`` picks the next step's work under two budgets — at most
``max_num_batched_tokens`` new tokens and at most ``max_num_seqs`` running sequences:

1. Drop requests past their deadline (waiting or running) and report aborted ones.
2. Decodes first (one token each) so running requests keep streaming; a decode that needs a
   new block and finds none preempts the lowest-priority running sequence (recompute: its
   blocks are freed and it goes back to waiting with its tokens kept).
3. Running sequences part-way through a chunked prefill get the next chunk.
4. Waiting requests are admitted by effective priority (priority plus aging, see
   ``Sequence.effective_priority``) while blocks and budget last; their prompt chunk fills the
   rest of the budget. Nothing is admitted in a step that had to preempt.

The batch lists prefill chunks first and decodes (query length 1) last, the order
``gpu_engine.layers.base`` documents.

Once the step is launched, ``commit`` books it (chunks computed, a placeholder for each token
being sampled) so the next step can be scheduled while the device still runs this one;
``complete`` fills the placeholders in when the tokens land and applies the stop checks.
A request that stops on a sampled token (eos, a stop token id) has by then been scheduled
into the next step too: that extra row is computed and dropped. ``postprocess`` does both
for a step whose tokens are known.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from operator import attrgetter

from gpu_engine.block_manager import BlockManager
from gpu_engine.config import EngineConfig
from gpu_engine.sequence import InvalidRequestError, RefusalReason, Sequence, SequenceStatus

_priority = attrgetter("priority")
_last_scheduled = attrgetter("last_scheduled_time")
_arrival = attrgetter("arrival_time")


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # prefill chunks first, decodes (query_len == 1) last
    query_lens: list[int]  # new tokens per sequence this step
    num_prefill_seqs: int
    num_decode_seqs: int
    # Finished without running this step (abort, deadline); reported by the engine now.
    finished: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.query_lens)

    def samples(self, index: int) -> bool:
        """Whether sequence ``index`` reaches its last token this step (so a token is sampled)."""
        seq = self.seqs[index]
        return seq.num_computed_tokens + self.query_lens[index] == seq.num_tokens


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        eos_token_ids: Iterable[int],
        max_model_len: int,
    ) -> None:
        self.config = config
        self.block_manager = block_manager
        self.eos_token_ids = frozenset(int(t) for t in eos_token_ids)
        self.max_model_len = max_model_len
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._live: dict[str, Sequence] = {}  # waiting or running, by request id
        self._unreported: list[Sequence] = []  # aborted / expired, reported at next schedule
        self.num_preemptions = 0
        # Prompt tokens computed so far (recomputed ones after preemption included).
        self.num_computed_prompt_tokens = 0
        self._num_with_deadline = 0  # live sequences with a deadline (0: skip _expire)
        self._watermark_blocks = int(config.admission_watermark * block_manager.num_blocks)
        # Admission grouping (see EngineConfig.admit_min_seqs); the engine sets the resolved
        # value once it knows whether decode steps are graph-captured.
        self.admit_min_seqs = config.admit_min_seqs or 1
        self._hold_since: float | None = None  # when admission grouping started holding
        # Running sequences that finish when their in-flight token lands (not scheduled
        # again; their slot is offered to waiting requests already).
        self._num_finishing = 0

    # -- requests ------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.request_id in self._live:
            raise InvalidRequestError(
                f"request id {seq.request_id!r} is already in flight", RefusalReason.DUPLICATE_ID
            )
        if seq.num_tokens >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt has {seq.num_tokens} tokens; this engine serves prompts of at most "
                f"{self.max_model_len - 1} tokens (max_model_len={self.max_model_len})",
                RefusalReason.PROMPT_TOO_LONG,
            )
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)
        self._live[seq.request_id] = seq
        if seq.deadline_unix_s is not None:
            self._num_with_deadline += 1

    def abort(self, request_id: str) -> bool:
        """Finish a waiting or running request now (its blocks are freed at once); the next
        ``schedule()`` reports it. Returns False if it is unknown or already finished."""
        seq = self._live.get(request_id)
        if seq is None:
            return False
        self._finish(seq, "abort")
        self._unreported.append(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self._unreported)

    def get(self, request_id: str) -> Sequence | None:
        return self._live.get(request_id)

    @property
    def num_active(self) -> int:
        """Running sequences that will be scheduled again (FINISHING ones excluded)."""
        return len(self.running) - self._num_finishing

    # -- scheduling ----------------------------------------------------------------------
    def schedule(self, now: float) -> ScheduledBatch:
        finished, self._unreported = self._unreported, []
        if self._num_with_deadline:
            self._expire(now, finished)
        aging_s = self.config.priority_aging_s
        budget = self.config.max_num_batched_tokens
        prefills: list[tuple[Sequence, int]] = []
        decodes: list[Sequence] = []
        scheduled: set[int] = set()
        preempted: list[Sequence] = []
        bm = self.block_manager
        block_size = bm.block_size
        running_status = SequenceStatus.RUNNING

        # Running sequences, most urgent first; aging from the last time each was served
        # makes equal-priority sequences take turns when the token budget is short. The key
        # is ``Sequence.effective_priority`` inlined (same float operations, so the same
        # order): this sort runs over every running sequence each step. When all share one
        # priority and one last-served time (the steady state: every one was served last
        # step) the first part of the key is the same for all, and arrival time alone gives
        # the same order (sorted is stable).
        running = self.running
        if len(set(map(_priority, running))) <= 1 and len(set(map(_last_scheduled, running))) <= 1:
            order = sorted(running, key=_arrival)
        else:
            order = sorted(
                running,
                key=lambda s: (
                    -(s.priority + max(0.0, now - s.last_scheduled_time) / aging_s),
                    s.arrival_time,
                ),
            )
        for seq in order:
            if seq.status is not running_status or (
                len(seq.token_ids) - seq.num_computed_tokens != 1
            ):
                continue
            if budget == 0:
                break
            # try_append is append-if-can_append (then cache_blocks); only a decode that
            # finds no free block takes the preemption path. Most steps a sequence neither
            # needs a block nor fills one (a block fills when the count reaches a multiple
            # of block_size): skip the call then (it ran for every sequence every step).
            n = len(seq.token_ids)
            if n % block_size and n <= len(seq.block_table) * block_size:
                pass
            elif not bm.try_append(seq, cache=True):
                if not self._make_room_to_append(seq, order, scheduled, preempted, finished):
                    continue
                bm.append(seq)
                bm.cache_blocks(seq, len(seq.token_ids))
            decodes.append(seq)
            scheduled.add(id(seq))
            budget -= 1

        # Running sequences not served above (chunked prefills); none when every running
        # sequence got its decode, the steady state.
        for seq in order if len(decodes) < self.num_active else ():
            if budget == 0:
                break
            if seq.status is SequenceStatus.RUNNING and id(seq) not in scheduled:
                chunk = min(seq.num_uncomputed_tokens, budget)
                if chunk > 0:
                    self.block_manager.cache_blocks(seq, seq.num_computed_tokens + chunk)
                    prefills.append((seq, chunk))
                    scheduled.add(id(seq))
                    budget -= chunk

        if not preempted and not self._hold_admission(now, prefills, decodes):
            budget = self._admit(now, budget, prefills)

        batch_prefills = [(s, n) for s, n in prefills if n > 1]
        batch_decodes = [s for s, n in prefills if n == 1] + decodes
        seqs = [s for s, _ in batch_prefills] + batch_decodes
        for seq in seqs:
            seq.last_scheduled_time = now
        return ScheduledBatch(
            seqs=seqs,
            query_lens=[n for _, n in batch_prefills] + [1] * len(batch_decodes),
            num_prefill_seqs=len(batch_prefills),
            num_decode_seqs=len(batch_decodes),
            finished=finished,
            preempted=preempted,
        )

    def _hold_admission(
        self, now: float, prefills: list[tuple[Sequence, int]], decodes: list[Sequence]
    ) -> bool:
        """Keep waiting prompts out of a decode-only step until a group can start together.

        Only while every running sequence is decoding (a step with a prefill chunk already
        admits at once) and for at most ``admit_max_delay_s`` from the first step that had
        a free slot and held it back (not from the requests' arrival: under a backlog every
        waiting request is old, and that is when grouping matters). With fewer waiting than
        ``admit_min_seqs`` the group is all of them.
        """
        if self.admit_min_seqs <= 1 or not self.waiting or not decodes or prefills:
            self._hold_since = None
            return False
        free_slots = self.config.max_num_seqs - self.num_active
        if free_slots <= 0:
            return True  # nothing could be admitted anyway; the clock has not started
        if free_slots >= min(self.admit_min_seqs, len(self.waiting)):
            self._hold_since = None
            return False
        if self._hold_since is None:
            self._hold_since = now
        if now - self._hold_since < self.config.admit_max_delay_s:
            return True
        self._hold_since = None
        return False

    def _admit(self, now: float, budget: int, prefills: list[tuple[Sequence, int]]) -> int:
        free_slots = self.config.max_num_seqs - self.num_active
        if budget == 0 or free_slots <= 0 or not self.waiting:
            return budget
        aging_s = self.config.priority_aging_s
        # At most free_slots are admitted, most urgent first: the first free_slots of the
        # sorted order (nsmallest is that, without sorting every waiting request each step).
        queue = heapq.nsmallest(
            free_slots,
            self.waiting,
            key=lambda s: (-s.effective_priority(now, aging_s), s.arrival_time),
        )
        for seq in queue:
            if budget == 0 or self.num_active >= self.config.max_num_seqs:
                break
            if seq.num_pending:
                continue  # preempted with a token in flight: admissible once it lands
            reserve = self._watermark_blocks if self.running else 0
            cached = self.block_manager.try_allocate(seq, reserve)
            if cached is None:
                break  # strict priority: do not let a smaller, less urgent request jump ahead
            if not seq.admitted:
                seq.admitted = True
                seq.num_cached_tokens = cached
            self.waiting.remove(seq)
            self.running.append(seq)
            seq.status = SequenceStatus.RUNNING
            chunk = min(seq.num_uncomputed_tokens, budget)
            # Registered now, so the next request admitted in this loop can share them.
            self.block_manager.cache_blocks(seq, seq.num_computed_tokens + chunk)
            prefills.append((seq, chunk))
            budget -= chunk
        return budget

    def _make_room_to_append(
        self,
        seq: Sequence,
        order: list[Sequence],
        scheduled: set[int],
        preempted: list[Sequence],
        finished: list[Sequence],
    ) -> bool:
        """Preempt lower-priority unscheduled sequences until ``seq`` can grow; False if
        ``seq`` itself had to give way."""
        bm = self.block_manager
        while not bm.can_append(seq):
            victim = next(
                (
                    v
                    for v in reversed(order)
                    if v is not seq
                    and id(v) not in scheduled
                    and v.status is SequenceStatus.RUNNING
                ),
                None,
            )
            if victim is None:
                break
            self._preempt(victim)
            preempted.append(victim)
        if bm.can_append(seq):
            return True
        if len(self.running) == 1 and not scheduled:
            # Alone and still out of blocks: the cache cannot hold it (max_model_len normally
            # prevents this). Finish rather than loop forever.
            self._finish(seq, "length")
            finished.append(seq)
        else:
            self._preempt(seq)
            preempted.append(seq)
        return False

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        # Give back its age so it is readmitted ahead of newer requests of the same priority.
        seq.last_scheduled_time = seq.arrival_time
        self.waiting.append(seq)
        self.num_preemptions += 1

    def _expire(self, now: float, finished: list[Sequence]) -> None:
        for seq in [*self.waiting, *self.running]:
            if seq.deadline_unix_s is not None and now >= seq.deadline_unix_s:
                self._finish(seq, "deadline")
                finished.append(seq)

    def _finish(self, seq: Sequence, reason: str) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.FINISHING:
            self.running.remove(seq)
            self._num_finishing -= 1
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        if seq.num_pending:  # tokens still in flight are never reported: drop them
            token_ids = seq.token_ids
            while token_ids and token_ids[-1] < 0:
                token_ids.pop()
            seq.num_pending = 0
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        if self._live.pop(seq.request_id, None) is not None and seq.deadline_unix_s is not None:
            self._num_with_deadline -= 1

    # -- after the step is launched / after its tokens land ------------------------------
    def commit(self, batch: ScheduledBatch, rows: SequenceABC[int]) -> list[tuple[Sequence, int]]:
        """Book a launched step: advance each scheduled sequence by its chunk and append a
        placeholder (``pending_token(j)``) for the token row ``j`` samples, where ``rows[j]``
        indexes ``batch.seqs``. The next step can then be scheduled and launched before this
        one's tokens reach the host (the device reads them in place of the placeholders); a
        sequence whose placeholder reaches max_tokens or max_model_len is FINISHING and not
        scheduled again. Returns the (sequence, placeholder position) of each sampled row, in
        row order, for ``complete``."""
        prompt_tokens = 0
        for seq, query_len in zip(batch.seqs, batch.query_lens, strict=True):
            computed = seq.num_computed_tokens
            if computed < len(seq.prompt_token_ids):
                prompt_tokens += query_len
            seq.num_computed_tokens = computed + query_len
        self.num_computed_prompt_tokens += prompt_tokens
        seqs = batch.seqs
        max_model_len = self.max_model_len
        finishing = SequenceStatus.FINISHING
        pending: list[tuple[Sequence, int]] = []
        for j, i in enumerate(rows):
            seq = seqs[i]
            token_ids = seq.token_ids
            n = len(token_ids)
            pending.append((seq, n))
            token_ids.append(-1 - j)  # pending_token(j), inlined
            seq.num_pending += 1
            if (
                n + 1 - len(seq.prompt_token_ids) >= seq.sampling_params.max_tokens
                or n + 1 >= max_model_len
            ):
                seq.status = finishing
                self._num_finishing += 1
        return pending

    def complete(
        self, pending: SequenceABC[tuple[Sequence, int]], tokens: SequenceABC[int]
    ) -> list[tuple[Sequence, int]]:
        """A committed step's sampled tokens have landed: fill in the placeholders and finish
        sequences that hit eos / a stop token / max_tokens / max_model_len. Sequences that
        finished meanwhile (abort, deadline, a stop token in the step before) are skipped.
        Returns the (sequence, new token) pairs of the step."""
        # Runs over every sampled sequence each step: stop checks inlined.
        out: list[tuple[Sequence, int]] = []
        eos = self.eos_token_ids
        finished, finishing = SequenceStatus.FINISHED, SequenceStatus.FINISHING
        for (seq, pos), token in zip(pending, tokens, strict=True):
            status = seq.status
            if status is finished:
                continue
            token_ids = seq.token_ids
            token_ids[pos] = token
            seq.num_pending -= 1
            params = seq.sampling_params
            if (not params.ignore_eos and token in eos) or token in params.stop_token_ids:
                self._finish(seq, "stop")
            elif status is finishing and pos == len(token_ids) - 1:
                self._finish(seq, "length")
            out.append((seq, token))
        return out

    def postprocess(
        self, batch: ScheduledBatch, sampled: SequenceABC[int | None]
    ) -> list[tuple[Sequence, int]]:
        """``commit`` and ``complete`` at once, for a step whose tokens are already known:
        ``sampled`` holds the token of each sequence of the batch (None where nothing was
        sampled, a non-final prefill chunk)."""
        rows = [i for i, token in enumerate(sampled) if token is not None]
        pending = self.commit(batch, rows)
        return self.complete(pending, [int(sampled[i]) for i in rows])  # type: ignore[arg-type]

    # -- reporting -----------------------------------------------------------------------
    @property
    def waiting_tokens(self) -> int:
        return sum(seq.num_tokens for seq in self.waiting)
