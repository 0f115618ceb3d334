"""A request's life inside the engine: sampling parameters and the sequence state (no torch)."""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field

from gpu_engine.errors import EngineError

FINISH_REASONS = ("stop", "length", "abort", "deadline")


class InvalidRequestError(EngineError, ValueError):
    """A request cannot be served as given (bad parameters, prompt too long, duplicate id)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature=0`` is greedy; ``top_k=0`` (or -1)
    and ``top_p=1`` disable those filters. A ``seed`` gives the request its own random
    generator, so its tokens do not depend on what it is batched with."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        # Accept a single string / any iterable for stop, and lists for stop_token_ids.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(f"top_k must be an int >= 0 (or -1), got {self.top_k!r}")
        if any(not s for s in stop):
            raise InvalidRequestError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    # Running, but its last token (the one reaching max_tokens or max_model_len) is still
    # being sampled by a launched step: it finishes when that token lands, and is not
    # scheduled again.
    FINISHING = "finishing"
    FINISHED = "finished"


def pending_token(row: int) -> int:
    """Placeholder token id for the token sampled in row ``row`` of a launched step that has
    not reached the host yet (see ``Scheduler.commit``): negative, so never a real id. The
    model runner replaces it on the device with that row of the previous step's samples."""
    return -1 - row


@dataclass(eq=False)
class Sequence:
    """One request's tokens and where its KV lives.

    ``token_ids`` is prompt + generated so far. ``num_computed_tokens`` counts leading tokens
    whose K/V is in the cache (prefix-cache hits included); the next step computes tokens
    ``[num_computed_tokens, num_computed_tokens + chunk)``. When that reaches ``num_tokens``
    the step samples one new token. Preemption (recompute) resets it to 0.

    With steps in flight (asynchronous scheduling) the last ``num_pending`` (at most two)
    entries of ``token_ids`` are placeholders (``pending_token``) for tokens the device is
    still sampling; they are filled in when their step completes, and stripped if the
    request finishes first.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    priority: int = 0
    deadline: float | None = None  # absolute Unix time (time.time()), None = none
    arrival_time: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    # Grows only by append while held; the block manager installs a new list on allocate and
    # free (gpu_engine.block_tables.BlockTableMirror notices a new table by identity).
    block_table: list[int] = field(default_factory=list)
    # Chained content hashes of this sequence's full blocks (filled lazily by the block
    # manager; valid because tokens are only ever appended).
    block_hashes: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit tokens at first admission
    num_preemptions: int = 0
    # Trailing placeholders in token_ids (sampled by launched steps, not yet on the host).
    num_pending: int = 0
    finish_reason: str | None = None
    admitted: bool = False  # admitted at least once (num_cached_tokens is then final)
    last_scheduled_time: float = 0.0

    def __post_init__(self) -> None:
        if type(self.prompt_token_ids) is not list:  # the engine passes check_prompt's list
            self.prompt_token_ids = list(map(int, self.prompt_token_ids))
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.last_scheduled_time = self.arrival_time

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids) :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def effective_priority(self, now: float, aging_s: float) -> float:
        """Priority plus one level per ``aging_s`` seconds spent waiting for service."""
        return self.priority + max(0.0, now - self.last_scheduled_time) / aging_s

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))


def check_prompt(prompt_token_ids: SequenceABC[int], vocab_size: int | None = None) -> list[int]:
    """Validate a prompt's token ids (integers: ``operator.index`` refuses floats and
    strings); returns them as a list of ints. Runs for every request the engine takes, on
    the engine's thread: C-level passes only (a ~1,100-token prompt in ~20 µs)."""
    try:
        ids = list(map(operator.index, prompt_token_ids))
    except TypeError as err:
        raise InvalidRequestError(f"prompt token ids must be integers: {err}") from None
    if not ids:
        raise InvalidRequestError("prompt_token_ids must not be empty")
    if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})")
    return ids
