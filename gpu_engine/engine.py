"""LLMEngine (token ids in, token ids out, one step at a time) and LLM (offline batch API)."""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Sequence as SequenceABC
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from gpu_engine.block_manager import BlockManager
from gpu_engine.config import EngineConfig
from gpu_engine.errors import EngineError
from gpu_engine.grammar import Grammars
from gpu_engine.loader import load_tokenizer, read_eos_token_ids
from gpu_engine.model_runner import LaunchedStep, ModelRunner
from gpu_engine.outputs import EngineCapacity, RequestOutput, StepOutput, TokenLogprobs
from gpu_engine.sampling import Drawn, needs_history
from gpu_engine.scheduler import ScheduledBatch, Scheduler
from gpu_engine.sequence import (
    InvalidRequestError,
    RefusalReason,
    SamplingParams,
    Sequence,
    SequenceStatus,
    check_prompt,
)
from gpu_engine.tp_runner import close_model_runner, make_model_runner

if TYPE_CHECKING:
    import torch


@dataclass
class PendingStep:
    """A step between ``LLMEngine.begin_step`` and ``end_step``."""

    batch: ScheduledBatch
    finished: list[StepOutput]  # finished at scheduling (aborts, deadlines)
    launched: LaunchedStep | None
    sampled: list[tuple[Sequence, int]]  # (sequence, placeholder position) per sampled row
    # A deferred step's grammar mask, being filled on the grammar thread (pipelined_step).
    mask: Future[torch.Tensor | None] | None = None


class LLMEngine:
    """Continuous-batching engine. Drive it with ``add_request`` / ``step`` from one thread.

    ``step()`` runs one step and returns its outputs. ``pipelined_step()`` (asynchronous
    scheduling) launches the next step first and then returns the outputs of the step before
    it, so the host's work between steps (postprocessing, scheduling, staging) overlaps the
    device's; ``finish_pipeline()`` returns the last step's outputs. A request that stops on
    a sampled token (eos, a stop token id) then costs one extra row in the step after.

    ``abort(request_id)`` frees the request's KV blocks at once (also with steps in flight:
    the device runs steps in order, so a block reused by a later step is written after the
    earlier step is done with it); the next step reports it as
    ``StepOutput(finished=True, finish_reason="abort")``. Requests past their
    ``deadline_unix_s`` (absolute ``time.time()`` seconds) are reported with ``"deadline"``.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        # tensor_parallel_size > 1: rank 0 here, ranks 1..N-1 in spawned processes.
        self.model_runner: ModelRunner = make_model_runner(config)
        self.tokenizer: Any | None = load_tokenizer(self.model_runner.model_dir)
        self.eos_token_ids: list[int] = read_eos_token_ids(
            self.model_runner.model_dir, self.model_runner.hf_config, self.tokenizer
        )
        self.max_model_len = self.model_runner.max_model_len
        self.block_manager = BlockManager(
            self.model_runner.num_kv_blocks,
            self.model_runner.block_size,
            config.enable_prefix_caching,
        )
        self.scheduler = Scheduler(
            config, self.block_manager, self.eos_token_ids, self.max_model_len
        )
        if config.admit_min_seqs is None and getattr(self.model_runner, "graphs", None):
            self.scheduler.admit_min_seqs = max(1, config.max_num_seqs // 16)
        self._num_steps = 0
        self._launched: deque[PendingStep] = deque()  # begun, not ended (at most two)
        self._pipelined: PendingStep | None = None  # pipelined_step's step in flight
        self._num_generated_tokens = 0
        self._waste_sum = 0.0
        self.grammars = Grammars(
            self.tokenizer,
            self.model_runner.arch.vocab_size,
            self.eos_token_ids,
            pin_memory=self.model_runner.device.type == "cuda",
        )
        # Requests whose sampling needs the host's view of their tokens (a grammar mask,
        # penalties): while any is in flight, steps sample after the previous step lands.
        self._host_sampled: set[str] = set()
        # Logprobs of the tokens in the outputs ``end_step`` last returned, by request id
        # (requests that asked for them only).
        self.step_logprobs: dict[str, TokenLogprobs] = {}

    @classmethod
    def from_options(cls, model: str, **options: Any) -> LLMEngine:
        return cls(EngineConfig.from_options(model, **options))

    def close(self) -> None:
        """Stop the tensor-parallel worker processes (idempotent; a no-op on one device).
        Also runs when the engine is garbage-collected or the interpreter exits."""
        self.grammars.close()
        close_model_runner(self.model_runner)

    def __enter__(self) -> LLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests ------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceABC[int],
        sampling_params: SamplingParams | None = None,
        *,
        priority: int = 0,
        deadline_unix_s: float | None = None,
    ) -> None:
        """Queue a request. Raises ``InvalidRequestError`` (an ``EngineError``) for an empty
        or out-of-vocabulary prompt, a prompt of ``max_model_len`` tokens or more, or a
        request id already in flight. ``priority``: larger is more urgent."""
        vocab_size = self.model_runner.arch.vocab_size
        ids = check_prompt(prompt_token_ids, vocab_size)
        params = sampling_params or SamplingParams()
        _check_token_ids(params, vocab_size)
        if params.n != 1:
            raise InvalidRequestError(
                "n > 1 is served by LLM.generate / LLM.chat; add_request takes n=1",
                RefusalReason.INVALID_PARAMS,
            )
        rid = str(request_id)
        if rid in self.grammars or rid in self._host_sampled:
            raise InvalidRequestError(
                f"request {rid!r} is already in flight", RefusalReason.DUPLICATE_ID
            )
        if params.num_resumed_tokens >= len(ids):
            raise InvalidRequestError(
                "num_resumed_tokens must be below the prompt's length", RefusalReason.INVALID_PARAMS
            )
        if params.structured is not None:
            resumed = ids[len(ids) - params.num_resumed_tokens :]
            self.grammars.add(rid, params.structured, resumed)
        seq = Sequence(
            request_id=rid,
            prompt_token_ids=ids,
            sampling_params=params,
            priority=int(priority),
            deadline_unix_s=deadline_unix_s,
            arrival_time=time.time(),
        )
        try:
            self.scheduler.add(seq)
        except Exception:
            self.grammars.release(rid)
            raise
        if params.structured is not None or needs_history(params):
            self._host_sampled.add(rid)

    def abort(self, request_id: str) -> bool:
        """Finish a request now; False if it is unknown or already finished."""
        found = self.scheduler.abort(request_id)
        if found:
            self._release(request_id)
        return found

    def _release(self, request_id: str) -> None:
        self.model_runner.sampler.release(request_id)
        if self._host_sampled:
            self.grammars.release(request_id)
            self._host_sampled.discard(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._launched)

    # -- the loop ------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        """Run one step; its outputs (the pipelined step in flight, if any, comes first)."""
        outputs = self.finish_pipeline()
        return outputs + self.end_step(self.begin_step())

    def pipelined_step(self) -> list[StepOutput]:
        """Launch the next step, then wait for the one launched by the previous call and
        return its outputs ([] on the first call). The host work of both steps overlaps the
        device; call ``finish_pipeline`` when ``has_unfinished`` turns False or before
        anything that needs every step's outputs.

        A step whose sampling waits for the host (a grammar mask, penalties: ``deferred``)
        is sampled at the start of the next call, after the next step is scheduled: its
        mask is filled on the grammar thread from the tokens of the step before, while this
        call returns and the next one schedules, so neither waits for the other."""
        if not self.config.async_scheduling:
            return self.step()
        if not self.scheduler.has_unfinished():
            return self.finish_pipeline()
        prev = self._pipelined
        batch = self._schedule()
        # While prev's mask fills: the random draws of a deferred step (in launch order).
        drawn = self.model_runner.draw(batch) if self._host_sampled else None
        # prev's samples are the next step's input ids: sampled before it is launched.
        self._sample_deferred(prev)
        self._pipelined = self._launch(batch, drawn)
        return self.end_step(prev) if prev is not None else []

    def finish_pipeline(self) -> list[StepOutput]:
        """Outputs of the step ``pipelined_step`` left in flight ([] if none)."""
        prev, self._pipelined = self._pipelined, None
        return self.end_step(prev) if prev is not None else []

    def begin_step(self) -> PendingStep:
        """Schedule and launch one step on the device; ``end_step`` waits for it and returns
        its outputs. One earlier step may still be in flight (its samples reach the new step
        on the device; see ``Scheduler.commit``); end steps in the order they began. In
        between the caller may do host work, ``add_request`` and ``abort``."""
        for pending in self._launched:  # a deferred step samples before the next launches
            self._sample_deferred(pending)
        return self._launch(self._schedule())

    def _schedule(self) -> ScheduledBatch:
        if len(self._launched) >= 2:
            raise EngineError("two steps are in flight: call end_step first")
        return self.scheduler.schedule(time.time())

    def _launch(self, batch: ScheduledBatch, drawn: Drawn | None = None) -> PendingStep:
        finished = [self._output(seq, []) for seq in batch.finished]
        launched = None
        sampled: list[tuple[Sequence, int]] = []
        if batch.seqs:
            self._num_steps += 1
            waste, slots = self.block_manager.paging_waste(self.scheduler.running)
            self._waste_sum += waste / slots if slots else 0.0
            launched = self.model_runner.launch(batch, bool(self._host_sampled), drawn)
            sampled = self.scheduler.commit(batch, launched.rows)
        pending = PendingStep(batch, finished, launched, sampled)
        self._launched.append(pending)
        return pending

    def end_step(self, pending: PendingStep) -> list[StepOutput]:
        if not self._launched or self._launched[0] is not pending:
            raise EngineError("end_step of a step that is not the oldest one in flight")
        self._sample_deferred(pending)
        try:
            tokens = [] if pending.launched is None else self.model_runner.collect(pending.launched)
        finally:
            self._launched.popleft()
        outputs = pending.finished
        self.step_logprobs = {}
        if pending.sampled:
            assert pending.launched is not None
            if len(self.grammars):
                self._accept(pending.sampled, tokens)
                if self._launched:  # the step after this one: its mask can be filled now
                    self._start_mask(self._launched[0])
            new_tokens = self.scheduler.complete(pending.sampled, tokens)
            self._after_sampling(pending.launched, pending.sampled, tokens)
            self._num_generated_tokens += len(new_tokens)
            # One StepOutput per running request per step: built inline (see _output).
            make, finished = StepOutput.make, SequenceStatus.FINISHED
            outputs += [
                make(
                    seq.request_id,
                    [token],
                    seq.status is finished,
                    seq.finish_reason,
                    len(seq.prompt_token_ids),
                    seq.num_cached_tokens,
                )
                for seq, token in new_tokens
            ]
        release = self._release
        for out in outputs:
            if out.finished:
                release(out.request_id)
        return outputs

    def _accept(self, sampled: list[tuple[Sequence, int]], tokens: list[int]) -> None:
        """Advance the grammar matchers by a step's tokens, before the scheduler takes them,
        so the next step's mask can start filling (a row of a request that finished in an
        earlier step is skipped; a request this token finishes is released right after)."""
        self.grammars.accept_batch(
            [(seq.request_id, t) for (seq, _), t in zip(sampled, tokens, strict=True)
             if not seq.is_finished]
        )  # fmt: skip

    def _start_mask(self, pending: PendingStep) -> None:
        """Start filling a deferred step's grammar mask on the grammar thread: every earlier
        step's tokens are on the host and their matchers advanced by now."""
        launched = pending.launched
        if launched is not None and launched.deferred and pending.mask is None:
            assert launched.seqs is not None
            pending.mask = self.grammars.bitmask_async([s.request_id for s in launched.seqs])

    def _sample_deferred(self, pending: PendingStep | None) -> None:
        """Sample a step whose sampling waited for the host (grammar masks, penalties); every
        earlier step's tokens are on the host by now."""
        launched = pending.launched if pending is not None else None
        if launched is None or not launched.deferred:
            return
        assert pending is not None and launched.seqs is not None
        if pending.mask is not None:
            bitmask, pending.mask = pending.mask.result(), None
        elif len(self.grammars):
            bitmask = self.grammars.bitmask([s.request_id for s in launched.seqs])
        else:
            bitmask = None
        pending.launched = self.model_runner.sample_deferred(launched, bitmask)

    def _after_sampling(
        self,
        launched: LaunchedStep,
        sampled: list[tuple[Sequence, int]],
        tokens: list[int],
    ) -> None:
        """Keep the logprobs asked for."""
        logprobs = self.model_runner.collect_logprobs(launched)
        if logprobs is not None:
            self.step_logprobs = {
                seq.request_id: lp
                for (seq, _), lp in zip(sampled, logprobs, strict=True)
                if seq.sampling_params.logprobs is not None
            }

    @staticmethod
    def _output(seq: Sequence, new_token_ids: list[int]) -> StepOutput:
        return StepOutput.make(
            seq.request_id,
            new_token_ids,
            seq.is_finished,
            seq.finish_reason,
            seq.num_prompt_tokens,
            seq.num_cached_tokens,
        )

    # -- reporting -----------------------------------------------------------------------
    def capacity(self) -> EngineCapacity:
        bm, sched = self.block_manager, self.scheduler
        return EngineCapacity(
            free_kv_tokens=bm.num_free_blocks * bm.block_size,
            total_kv_tokens=bm.num_blocks * bm.block_size,
            waiting_tokens=sched.waiting_tokens,
            running_seqs=sched.num_active,
            waiting_seqs=len(sched.waiting),
            max_num_seqs=self.config.max_num_seqs,
            num_preemptions=sched.num_preemptions,
        )

    def stats(self) -> dict[str, float | int]:
        """Counters since start plus current occupancy (for worker metrics and benchmarks)."""
        bm, sched = self.block_manager, self.scheduler
        waste, slots = bm.paging_waste(sched.running)
        return {
            "steps": self._num_steps,
            "generated_tokens": self._num_generated_tokens,
            "computed_prompt_tokens": sched.num_computed_prompt_tokens,
            "prefix_cache_query_tokens": bm.prefix_query_tokens,
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens,
            "prefix_cache_hit_rate": bm.prefix_hit_tokens / max(1, bm.prefix_query_tokens),
            "prefix_cache_evictions": bm.num_evictions,
            "cached_blocks": bm.num_cached_blocks,
            "preemptions": sched.num_preemptions,
            "paging_waste_tokens": waste,
            "paging_waste_fraction": waste / slots if slots else 0.0,
            "mean_paging_waste_fraction": self._waste_sum / max(1, self._num_steps),
            "free_kv_tokens": bm.num_free_blocks * bm.block_size,
            "total_kv_tokens": bm.num_blocks * bm.block_size,
            "running_seqs": len(sched.running),
            "waiting_seqs": len(sched.waiting),
            "grammar_masks": self.grammars.num_fills,
            "grammar_mask_fill_s": self.grammars.fill_s,
        }


def _check_token_ids(params: SamplingParams, vocab_size: int) -> None:
    """logit_bias and stop_token_ids name tokens of this model's vocabulary."""
    for name, ids in (
        ("logit_bias", [t for t, _ in params.logit_bias]),
        ("stop_token_ids", params.stop_token_ids),
    ):
        if ids and max(ids) >= vocab_size:
            raise InvalidRequestError(
                f"{name} token ids must be in [0, {vocab_size})", RefusalReason.INVALID_PARAMS
            )


class LLM:
    """Offline batch generation over an :class:`LLMEngine` (stop strings handled here), with
    asynchronous scheduling (``pipelined_step``) unless ``async_scheduling=False``."""

    def __init__(
        self,
        model: str,
        *,
        dtype: str = "auto",
        device: str = "auto",
        block_size: int = 16,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 4096,
        kv_cache_tokens: int | None = None,
        enable_prefix_caching: bool = True,
        attention_backend: str = "auto",
        seed: int = 0,
        tensor_parallel_size: int = 1,
        **engine_options: Any,
    ) -> None:
        self.engine = LLMEngine.from_options(
            model,
            dtype=dtype,
            device=device,
            block_size=block_size,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            kv_cache_tokens=kv_cache_tokens,
            enable_prefix_caching=enable_prefix_caching,
            attention_backend=attention_backend,
            seed=seed,
            tensor_parallel_size=tensor_parallel_size,
            **engine_options,
        )
        self.tokenizer: Any | None = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's tensor-parallel workers (idempotent)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(
        self,
        prompts: str | list[int] | SequenceABC[str] | SequenceABC[list[int]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); results in input order."""
        batch: list[Any] = (
            [prompts]
            if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int))
            else list(prompts)
        )
        token_prompts = [self._encode(p) for p in batch]
        return self._run(token_prompts, sampling_params)

    def chat(
        self,
        conversations: SequenceABC[dict[str, str]] | SequenceABC[SequenceABC[dict[str, str]]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Apply the model's chat template (with the assistant generation prompt) and
        generate; one conversation or a list of them."""
        if self.tokenizer is None:
            raise EngineError("chat needs a tokenizer; this model directory has none")
        convos: list[Any] = (
            [conversations]
            if conversations and isinstance(conversations[0], dict)
            else list(conversations)
        )
        prompts = [
            self.tokenizer.apply_chat_template(list(c), tokenize=False, add_generation_prompt=True)
            for c in convos
        ]
        token_prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        return self._run(token_prompts, sampling_params)

    def _encode(self, prompt: str | SequenceABC[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError("text prompts need a tokenizer; pass token ids instead")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]

    def _run(
        self,
        prompts: list[list[int]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None,
    ) -> list[RequestOutput]:
        """Results in prompt order; a prompt with ``n`` > 1 gives ``n`` results in a row."""
        params = self._params_per_prompt(prompts, sampling_params)
        results: dict[str, RequestOutput] = {}
        order: list[str] = []
        stops: dict[str, SamplingParams] = {}
        siblings: dict[str, list[str]] = {}  # first copy of an n > 1 prompt -> the others
        for prompt, p in zip(prompts, params, strict=True):
            ids = [f"llm-{next(self._ids)}" for _ in range(p.n)]
            for i, rid in enumerate(ids):
                results[rid] = RequestOutput(rid, prompt, [], "", None)
                results[rid].logprobs = [] if p.logprobs is not None else None
                # Each copy its own seed (seed + i): n copies of one seed would be equal.
                seed = None if p.seed is None else (p.seed + i) % 2**63
                stops[rid] = replace(p, n=1, seed=seed) if p.n != 1 else p
            one = stops[ids[0]]
            order += ids
            self.engine.add_request(ids[0], prompt, one)
            if len(ids) > 1:
                siblings[ids[0]] = ids[1:]
        while self.engine.has_unfinished():
            outputs = self.engine.pipelined_step()
            for out in outputs:
                # n > 1: the other copies start once the first has computed the prompt, so
                # they take its KV blocks from the prefix cache (one prefill, shared blocks).
                for rid in siblings.pop(out.request_id, ()):
                    self.engine.add_request(rid, results[rid].prompt_token_ids, stops[rid])
                res = results.get(out.request_id)
                if res is None:
                    continue  # a request added to the engine directly, not by this call
                self._take(res, out, stops[out.request_id])
        for res in results.values():
            if self.tokenizer is not None and not res.text:
                res.text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        return [results[rid] for rid in order]

    def _params_per_prompt(
        self,
        prompts: list[list[int]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None,
    ) -> list[SamplingParams]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise EngineError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if any(p.stop for p in params) and self.tokenizer is None:
            raise EngineError("stop strings need a tokenizer")
        return params

    def _take(self, res: RequestOutput, out: StepOutput, params: SamplingParams) -> None:
        """Add one step's output to its result (stop strings, logprobs)."""
        if res.finish_reason is not None:
            return  # already finished here by a stop string; this is its abort
        res.token_ids.extend(out.new_token_ids)
        if res.logprobs is not None and out.new_token_ids:
            res.logprobs.append(self.engine.step_logprobs[out.request_id])
        if params.stop and self._hit_stop(res, params):
            self.engine.abort(out.request_id)
        elif out.finished:
            res.finish_reason = out.finish_reason

    def _hit_stop(self, res: RequestOutput, params: SamplingParams) -> bool:
        assert self.tokenizer is not None
        text = self.tokenizer.decode(res.token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in params.stop) if i >= 0]
        if not hits:
            return False
        res.text, res.finish_reason = text[: min(hits)], "stop"
        return True
