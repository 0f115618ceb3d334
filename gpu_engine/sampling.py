"""Token sampling: logit bias, penalties, grammar masks, greedy, temperature, top-k, top-p,
min_p, logprobs, seeded requests.

Random rows are drawn with the exponential race (argmax of p / E, E ~ Exp(1)), which equals a
categorical draw from p. A request with a seed draws its own E, so its tokens do not depend
on which other requests share the batch. Two sources of E:

- keyed (the default on CUDA): E of token ``v`` is -log of Philox(key, v), each row's key
  derived on the host from the request's seed and how many tokens it drew (or from the
  engine's seed and a draw counter). Drawing costs no launch, and a step with no top-k /
  top-p / min_p row is sampled by one fused kernel (``kernels.sampling.sample_keyed``:
  mask, temperature, race, greedy rows), which keeps a constrained step's host work small;
- a ``torch.Generator`` per seeded request (the CPU default): one draw per row per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from gpu_engine.grammar import apply_bitmask
from gpu_engine.penalties import apply_logit_bias, apply_penalties, logit_bias_tensors, staged
from gpu_engine.sequence import SamplingParams


class Sampled(NamedTuple):
    """One step's samples on the device: ``tokens`` [N] int64; with logprobs requested by
    any row, ``logprobs`` [N] (each sampled token's), ``top_ids`` / ``top_logprobs`` [N, K]
    (K = the largest ``logprobs`` of the batch), from the model's raw distribution."""

    tokens: torch.Tensor
    logprobs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


class History(NamedTuple):
    """A row's tokens so far, for penalties: its prompt and what it generated."""

    prompt: Sequence[int]
    output: Sequence[int]


@dataclass
class _BatchPlan:
    """Per-row sampling parameters of one batch as device tensors; reused while the batch's
    parameters and request ids stay the same (decode steps of an unchanged batch), so a step
    does not rebuild and copy them."""

    all_greedy: bool
    greedy: torch.Tensor | None = None  # [N] bool
    temperature: torch.Tensor | None = None  # [N] float32 (1.0 on greedy rows)
    top_k: torch.Tensor | None = None  # [N] int64, or None when no row filters by top-k
    top_p: torch.Tensor | None = None  # [N] float32, or None when no row filters by top-p
    min_p: torch.Tensor | None = None  # [N] float32, or None when no row uses min_p
    # (row, request id, seed, tokens the request generated before it was resumed here)
    seeded: tuple[tuple[int, str, int, int], ...] = ()
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    penalties: bool = False  # some row has a repetition / presence / frequency penalty
    num_logprobs: int | None = None  # the most top logprobs any row asks for

    @property
    def filtered(self) -> bool:
        """Some row filters by top-k, top-p or min_p (the fused keyed pick does not)."""
        return self.top_k is not None or self.top_p is not None or self.min_p is not None


class Drawn(NamedTuple):
    """A batch's sampling plan and random draws, made when its step launches (``draw``): a
    step whose sampling waits for the host (grammar masks, penalties) then launches only
    the masking and the pick between the step before landing and its own sampling."""

    plan: _BatchPlan
    noise: torch.Tensor | None  # [N, vocab] Exp(1) draws (generator source), or None
    keys: torch.Tensor | None = None  # [N] int64 Philox keys (keyed source), or None


class Sampler:
    """Turns a step's logits into tokens: logit bias, penalties, the grammar mask, then
    greedy or temperature / top-k / top-p / min_p sampling (see ``SamplingParams``).
    ``keyed``: draw E from Philox keys (see the module's doc); default: on CUDA unless
    ``CHATQ_KEYED_SAMPLING=0``."""

    def __init__(self, device: torch.device, seed: int, keyed: bool | None = None) -> None:
        self.device = device
        if keyed is None:
            from gpu_engine.kernels import KEYED_SAMPLING

            keyed = device.type == "cuda" and KEYED_SAMPLING
        self.keyed = keyed
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}
        # Keyed draws: the engine's stream (unseeded rows) and each seeded request's count.
        self._stream_key = _splitmix64(np.array([(seed ^ _UNSEEDED) & _U64], dtype=np.uint64))[0]
        self._num_draws = 0
        self._request_draws: dict[str, int] = {}
        self._plan_key: tuple[tuple[SamplingParams, ...], tuple[str, ...]] | None = None
        self._plan: _BatchPlan | None = None

    def generator_for(self, request_id: str, seed: int) -> torch.Generator:
        gen = self._request_generators.get(request_id)
        if gen is None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
            self._request_generators[request_id] = gen
        return gen

    def release(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)
        self._request_draws.pop(request_id, None)

    @property
    def num_request_streams(self) -> int:
        """Seeded requests whose random stream this sampler holds (until ``release``)."""
        return len(self._request_generators) + len(self._request_draws)

    def warm_up(self, vocab: int, dtype: torch.dtype) -> None:
        """Compile the keyed kernels for this model's logits (their dtype and fp32, with and
        without a grammar mask, random and greedy rows) before a request waits on it; a
        no-op unless keyed."""
        if not self.keyed:
            return
        from gpu_engine.kernels.sampling import exponential_keyed, sample_keyed

        dev = self.device
        keys = torch.zeros(1, dtype=torch.int64, device=dev)
        temperature = torch.ones(1, dtype=torch.float32, device=dev)
        greedy = torch.zeros(1, dtype=torch.bool, device=dev)
        mask = torch.full((1, (vocab + 31) // 32), -1, dtype=torch.int32, device=dev)
        for logits_dtype in {dtype, torch.float32}:
            logits = torch.zeros(1, vocab, dtype=logits_dtype, device=dev)
            for bitmask in (None, mask):
                sample_keyed(logits, keys, temperature, greedy, bitmask)
                sample_keyed(logits, None, None, None, bitmask)
        exponential_keyed(keys, vocab)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        request_ids: Sequence[str],
        histories: Sequence[History] | None = None,
        bitmask: torch.Tensor | None = None,
    ) -> list[int]:
        """logits: [N, vocab] -> one token id per row."""
        sampled = self.sample_async(logits, params, request_ids, histories, bitmask)
        return sampled.tokens.tolist()  # type: ignore[no-any-return]

    def sample_async(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        request_ids: Sequence[str],
        histories: Sequence[History] | None = None,
        bitmask: torch.Tensor | None = None,
        drawn: Drawn | None = None,
    ) -> Sampled:
        """Like ``sample`` but returns the samples on the logits' device without waiting
        for them (the caller's ``tolist()`` is the step's one synchronisation).
        ``histories`` (one per row) are needed when a row has a penalty (``needs_history``);
        ``bitmask`` [N, words] int32 on the logits' device: the grammar mask of each row.
        ``drawn``: the batch's plan and random draws made earlier (``draw``), else now.
        The input logits are never changed."""
        if drawn is None:
            drawn = self.draw(params, request_ids, logits.shape[-1], logits.device, lazy=True)
        plan = drawn.plan
        if plan.penalties and histories is None:
            raise ValueError("a row has a penalty: sample needs each row's history")
        if self.keyed and not plan.filtered:
            tokens = self._pick_fused(logits, drawn, params, histories, bitmask)
        else:
            tokens = self._pick(logits, drawn, params, histories, bitmask)
        if plan.num_logprobs is None:
            return Sampled(tokens)
        return _with_logprobs(logits.float(), tokens, plan.num_logprobs)

    def draw(
        self,
        params: Sequence[SamplingParams],
        request_ids: Sequence[str],
        vocab: int,
        device: torch.device,
        lazy: bool = False,
    ) -> Drawn:
        """The plan and random draws ``sample_async`` would make for this batch, made now
        (in the same order, so the samples are the same). ``lazy``: leave the generator
        source's noise to the pick (drawn there, in the same order)."""
        plan = self._plan_for(params, request_ids, device)
        if plan.all_greedy:
            return Drawn(plan, None)
        if self.keyed:
            return Drawn(plan, None, self._keys(plan, len(params), device))
        return Drawn(plan, None if lazy else self._noise(plan, len(params), vocab, device))

    def _keys(self, plan: _BatchPlan, rows: int, device: torch.device) -> torch.Tensor:
        """One Philox key per row: seeded rows from (seed, the request's draws so far),
        the others from (the engine's stream, this draw, the row). A resumed request counts
        the tokens it generated before (one draw each), so it goes on with the draws an
        uninterrupted run would have made."""
        self._num_draws += 1
        counters = (np.uint64(self._num_draws) << np.uint64(24)) + np.arange(rows, dtype=np.uint64)
        keys = _splitmix64(counters ^ self._stream_key)
        if plan.seeded:
            rows_s = [i for i, _, _, _ in plan.seeded]
            seeds = np.array([seed & _U64 for _, _, seed, _ in plan.seeded], dtype=np.uint64)
            counts = np.array(
                [self._count_draw(rid, first) for _, rid, _, first in plan.seeded], np.uint64
            )
            keys[rows_s] = _splitmix64(_splitmix64(seeds) + counts)
        return staged(torch.from_numpy(keys.view(np.int64)), device)

    def _count_draw(self, request_id: str, first: int) -> int:
        n = self._request_draws.get(request_id, first)
        self._request_draws[request_id] = n + 1
        return n

    def _noise(self, plan: _BatchPlan, rows: int, vocab: int, device: torch.device) -> torch.Tensor:
        noise = torch.empty(rows, vocab, dtype=torch.float32, device=device)
        noise.exponential_(generator=self.generator)
        for i, request_id, seed, _ in plan.seeded:
            noise[i].exponential_(generator=self.generator_for(request_id, seed))
        return noise

    def _adjusted(
        self,
        logits: torch.Tensor,
        plan: _BatchPlan,
        params: Sequence[SamplingParams],
        histories: Sequence[History] | None,
        private: bool,
    ) -> torch.Tensor:
        """``logits`` after logit bias and penalties; ``private``: the caller's own copy
        (changed in place), else copied before any change."""
        if plan.logit_bias is not None:
            logits = apply_logit_bias(logits if private else logits.clone(), plan.logit_bias)
        if plan.penalties:
            assert histories is not None
            logits = apply_penalties(
                logits,
                [h.prompt for h in histories],
                [h.output for h in histories],
                [p.repetition_penalty for p in params],
                [p.presence_penalty for p in params],
                [p.frequency_penalty for p in params],
            )
        return logits

    def _pick_fused(
        self,
        logits: torch.Tensor,
        drawn: Drawn,
        params: Sequence[SamplingParams],
        histories: Sequence[History] | None,
        bitmask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Keyed rows without top-k / top-p / min_p: the mask, temperature and race in one
        kernel, on the logits as they are (a float copy only for bias and penalties)."""
        from gpu_engine.kernels.sampling import sample_keyed

        plan = drawn.plan
        if plan.logit_bias is not None or plan.penalties:
            floated = logits.float()
            logits = self._adjusted(floated, plan, params, histories, floated is not logits)
        elif plan.all_greedy and bitmask is None:
            return logits.argmax(dim=-1)
        return sample_keyed(logits.contiguous(), drawn.keys, plan.temperature, plan.greedy, bitmask)

    def _pick(
        self,
        logits: torch.Tensor,
        drawn: Drawn,
        params: Sequence[SamplingParams],
        histories: Sequence[History] | None,
        bitmask: torch.Tensor | None,
    ) -> torch.Tensor:
        """The torch path: bias, penalties and the mask on a float32 copy, then greedy or
        the race over the top-k / top-p / min_p survivors."""
        plan, original = drawn.plan, logits
        floated = logits.float()  # a copy of 16-bit logits: changed in place from here on
        logits = self._adjusted(floated, plan, params, histories, floated is not original)
        if bitmask is not None:
            logits = apply_bitmask(logits.clone() if logits is original else logits, bitmask)
        if plan.all_greedy:
            return logits.argmax(dim=-1)
        assert plan.greedy is not None and plan.temperature is not None
        masked = _mask_top_k_top_p(logits / plan.temperature[:, None], plan.top_k, plan.top_p)
        if plan.min_p is not None:
            masked = _mask_min_p(masked, plan.min_p)
        probs = masked.softmax(dim=-1)
        noise = drawn.noise
        if drawn.keys is not None:
            from gpu_engine.kernels.sampling import exponential_keyed

            noise = exponential_keyed(drawn.keys, probs.shape[1])
        elif noise is None:
            noise = self._noise(plan, probs.shape[0], probs.shape[1], probs.device)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(plan.greedy, logits.argmax(dim=-1), sampled)

    def _plan_for(
        self,
        params: Sequence[SamplingParams],
        request_ids: Sequence[str],
        device: torch.device,
    ) -> _BatchPlan:
        # Tuple equality checks identity first, so an unchanged batch compares in C.
        key = (tuple(params), tuple(request_ids))
        if self._plan is not None and key == self._plan_key:
            return self._plan
        plan = (
            _BatchPlan(all_greedy=True)
            if all(p.greedy for p in params)
            else _random_plan(params, request_ids, device)
        )
        if any(p.logit_bias for p in params):
            plan.logit_bias = logit_bias_tensors([p.logit_bias for p in params], device)
        plan.penalties = any(p.uses_penalties for p in params)
        wanted = [p.logprobs for p in params if p.logprobs is not None]
        plan.num_logprobs = max(wanted) if wanted else None
        self._plan_key, self._plan = key, plan
        return plan


_U64 = (1 << 64) - 1
_UNSEEDED = 0x5EED_0F_E9_61_9E  # mixed into the engine's stream: apart from request seeds


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function over uint64 values (wrapping arithmetic): neighbouring
    inputs give unrelated keys."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def needs_history(params: SamplingParams) -> bool:
    """Whether sampling this request needs its tokens so far on the host (penalties)."""
    return params.uses_penalties


def _random_plan(
    params: Sequence[SamplingParams], request_ids: Sequence[str], device: torch.device
) -> _BatchPlan:
    top_k, top_p = [p.top_k for p in params], [p.top_p for p in params]
    vocab_inf = 1 << 62  # "no top-k": larger than any vocabulary
    return _BatchPlan(
        all_greedy=False,
        greedy=_to_device([p.greedy for p in params], torch.bool, device),
        temperature=_to_device(
            [p.temperature if not p.greedy else 1.0 for p in params], torch.float32, device
        ),
        top_k=_to_device([k if k > 0 else vocab_inf for k in top_k], torch.int64, device)
        if any(k > 0 for k in top_k)
        else None,
        top_p=_to_device(top_p, torch.float32, device) if any(p < 1.0 for p in top_p) else None,
        min_p=_to_device([p.min_p for p in params], torch.float32, device)
        if any(p.min_p > 0.0 for p in params)
        else None,
        seeded=tuple(
            (i, request_ids[i], p.seed, p.num_resumed_tokens)
            for i, p in enumerate(params)
            if p.seed is not None and not p.greedy
        ),
    )


def _with_logprobs(raw: torch.Tensor, tokens: torch.Tensor, k: int) -> Sampled:
    logprobs = raw.log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:, None])[:, 0]
    if k == 0:
        return Sampled(tokens, chosen)
    top_logprobs, top_ids = logprobs.topk(k, dim=-1)
    return Sampled(tokens, chosen, top_ids, top_logprobs)


def resolve_pending(input_ids: torch.Tensor, last_tokens: torch.Tensor) -> torch.Tensor:
    """``input_ids`` with each placeholder ``pending_token(j)`` (a negative id: the token
    sampled in row ``j`` of the previous step, not on the host yet) replaced by
    ``last_tokens[j]``, the device copy of that step's samples. No host sync: the steps
    run in stream order, so the previous step has written ``last_tokens`` by then."""
    rows = (-1 - input_ids).clamp_(min=0)  # placeholder -1 - j -> j; real ids -> 0
    return torch.where(input_ids < 0, last_tokens[rows], input_ids)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Small per-row parameter vectors: staged in pinned memory and copied asynchronously,
    so building them does not wait for the forward pass still running on the GPU (a copy
    from pageable memory synchronises the stream); the one sync per step stays the
    ``tolist()`` of the sampled tokens."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: Sequence[int], top_p: Sequence[float]
) -> torch.Tensor:
    """Mask logits [N, vocab] outside each row's top-k / nucleus top-p to -inf
    (top_k 0 and top_p 1 keep everything; the most likely token always survives)."""
    vocab = logits.shape[-1]
    k = (
        _to_device([kk if kk > 0 else vocab for kk in top_k], torch.int64, logits.device)
        if any(kk > 0 for kk in top_k)
        else None
    )
    p = (
        _to_device(list(top_p), torch.float32, logits.device)
        if any(pp < 1.0 for pp in top_p)
        else None
    )
    return _mask_top_k_top_p(logits, k, p)


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """Mask logits [N, vocab] of tokens less likely than ``min_p`` times the row's most
    likely token to -inf (0 keeps everything)."""
    return _mask_min_p(logits, _to_device(list(min_p), torch.float32, logits.device))


def _mask_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    probs = logits.softmax(dim=-1)
    drop = probs < min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(drop, float("-inf"))


def _mask_top_k_top_p(
    logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None
) -> torch.Tensor:
    """``apply_top_k_top_p`` with the per-row vectors already on the device: k [N] int64
    (rows without top-k hold a value >= vocab), p [N] float32; None = no row uses it."""
    if k is None and p is None:
        return logits
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if k is not None:
        drop |= ranks >= k[:, None]
    if p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly better tokens
        drop |= mass_before >= p[:, None]
    drop[:, 0] = False
    masked = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, masked)
