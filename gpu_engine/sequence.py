"""A request's life inside the engine: sampling parameters and the sequence state (no torch)."""

from __future__ import annotations

import enum
import json
import math
import operator
from collections.abc import Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field
from typing import Any

from gpu_engine.errors import EngineError

FINISH_REASONS = ("stop", "length", "abort", "deadline")


class RefusalReason(str, enum.Enum):
    """Why the engine refused a request: :attr:`InvalidRequestError.reason`, and the code a
    refused add carries back to the worker's host process."""

    PROMPT_TOO_LONG = "prompt_too_long"  # max_model_len tokens or more
    INVALID_PROMPT = "invalid_prompt"  # empty, not integers, or outside the vocabulary
    INVALID_PARAMS = "invalid_params"  # sampling parameters out of range
    DUPLICATE_ID = "duplicate_id"  # a request with this id is in flight
    INTERNAL = "internal"  # anything else that failed while adding it


class InvalidRequestError(EngineError, ValueError):
    """A request cannot be served as given; ``reason`` says why, as a typed code."""

    def __init__(self, message: str, reason: RefusalReason) -> None:
        super().__init__(message)
        self.reason = reason


_PARAMS = RefusalReason.INVALID_PARAMS
_PROMPT = RefusalReason.INVALID_PROMPT


STRUCTURED_KINDS = ("json", "regex", "grammar")
MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_LOGIT_BIAS = 300  # entries, as OpenAI's logit_bias


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the generated text, enforced by grammar-constrained decoding (a token
    mask applied before sampling, so every step can only pick tokens that keep the output a
    prefix of some valid text).

    ``kind``: ``"json"`` (``spec`` is a JSON schema as JSON text; ``""`` means any JSON
    object), ``"regex"`` (``spec`` is a regular expression the whole output matches) or
    ``"grammar"`` (``spec`` is an EBNF grammar in xgrammar's dialect, root rule ``root``).
    ``prefix`` / ``suffix``: literal text the output starts / ends with around the
    constrained part (a tool call's ``<tool_call>`` tags, say). Plain text (no torch, no
    xgrammar): the engine compiles it.
    """

    kind: str
    spec: str = ""
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self) -> None:
        if self.kind not in STRUCTURED_KINDS:
            raise InvalidRequestError(
                f"structured.kind must be one of {', '.join(STRUCTURED_KINDS)}, got {self.kind!r}",
                _PARAMS,
            )
        for name in ("spec", "prefix", "suffix"):
            if not isinstance(getattr(self, name), str):
                raise InvalidRequestError(f"structured.{name} must be a string", _PARAMS)
        if self.kind != "json" and not self.spec:
            raise InvalidRequestError(f"structured.spec must be set for {self.kind}", _PARAMS)

    @classmethod
    def json(
        cls, schema: Mapping[str, Any] | str | None = None, prefix: str = "", suffix: str = ""
    ) -> StructuredOutput:
        """Output that is one JSON value matching ``schema`` (a dict or its JSON text);
        ``None``: any JSON object (OpenAI's ``response_format: json_object``); between
        ``prefix`` and ``suffix`` when given."""
        spec = "" if schema is None else schema if isinstance(schema, str) else json.dumps(schema)
        return cls("json", spec, prefix, suffix)

    def to_wire(self) -> dict[str, str]:
        """The wire map: ``kind`` and ``spec``, ``prefix`` / ``suffix`` only when set."""
        wire = {"kind": self.kind, "spec": self.spec}
        if self.prefix:
            wire["prefix"] = self.prefix
        if self.suffix:
            wire["suffix"] = self.suffix
        return wire


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request. ``temperature=0`` is greedy; ``top_k=0`` (or -1)
    and ``top_p=1`` disable those filters. A ``seed`` gives the request its own random
    generator, so its tokens do not depend on what it is batched with.

    The logits of a row go through, in order: ``logit_bias`` (token id -> added value),
    the repetition penalty (prompt and output tokens: positive logits divided by it,
    negative ones multiplied), presence / frequency penalties (output tokens, as OpenAI:
    ``logit - presence * (count > 0) - frequency * count``), the ``structured`` mask, then
    temperature, top-k, top-p and ``min_p`` (tokens below ``min_p`` times the top
    probability are dropped). ``logprobs`` (0 to 20): report each sampled token's log
    probability and that many most likely alternatives, from the model's own distribution
    (before any of the above). ``n``: that many independent completions of one prompt.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_p: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias), sorted by id
    logprobs: int | None = None
    n: int = 1
    structured: StructuredOutput | None = None
    # The last this-many prompt tokens are the request's own earlier output (an answer
    # resumed by another worker): the grammar and the penalties count them as generated.
    num_resumed_tokens: int = 0

    def __post_init__(self) -> None:
        # Accept a single string / any iterable for stop, and lists for stop_token_ids.
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if isinstance(self.structured, Mapping):
            object.__setattr__(self, "structured", StructuredOutput(**self.structured))
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._check_basic(stop)
        self._check_extended()

    def _check_basic(self, stop: tuple[str, ...]) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be an int >= 1, got {self.max_tokens!r}", _PARAMS
            )
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequestError(
                f"temperature must be >= 0, got {self.temperature!r}", _PARAMS
            )
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p!r}", _PARAMS)
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequestError(
                f"top_k must be an int >= 0 (or -1), got {self.top_k!r}", _PARAMS
            )
        if any(not s for s in stop):
            raise InvalidRequestError("stop strings must be non-empty", _PARAMS)
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be >= 0", _PARAMS)

    def _check_extended(self) -> None:
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value!r}", _PARAMS)
        rep = self.repetition_penalty
        if not isinstance(rep, (int, float)) or not 0.0 < rep <= 2.0:
            raise InvalidRequestError(f"repetition_penalty must be in (0, 2], got {rep!r}", _PARAMS)
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p!r}", _PARAMS)
        lp = self.logprobs
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= MAX_TOP_LOGPROBS):
            raise InvalidRequestError(
                f"logprobs must be an int in [0, {MAX_TOP_LOGPROBS}] or None, got {lp!r}",
                _PARAMS,
            )
        if not _is_int(self.n) or not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be an int in [1, {MAX_N}], got {self.n!r}", _PARAMS)
        if not _is_int(self.num_resumed_tokens) or self.num_resumed_tokens < 0:
            raise InvalidRequestError("num_resumed_tokens must be an int >= 0", _PARAMS)
        if self.structured is not None and not isinstance(self.structured, StructuredOutput):
            raise InvalidRequestError("structured must be a StructuredOutput", _PARAMS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        """True when sampling needs the tokens generated so far (penalties)."""
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _logit_bias(raw: object) -> tuple[tuple[int, float], ...]:
    """``logit_bias`` as sorted (token id, bias) pairs, from a mapping or pairs."""
    items = raw.items() if isinstance(raw, Mapping) else raw
    try:
        pairs = sorted((int(t), float(b)) for t, b in items)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise InvalidRequestError("logit_bias must map token ids to numbers", _PARAMS) from None
    if len(pairs) > MAX_LOGIT_BIAS:
        raise InvalidRequestError(
            f"logit_bias has {len(pairs)} entries; the limit is {MAX_LOGIT_BIAS}", _PARAMS
        )
    for token, bias in pairs:
        if token < 0 or not -100.0 <= bias <= 100.0:
            raise InvalidRequestError(
                f"logit_bias entries must be token id >= 0 -> bias in [-100, 100], "
                f"got {token}: {bias}",
                _PARAMS,
            )
    return tuple(pairs)


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
    deadline_unix_s: float | None = None  # absolute, as time.time(); None = none
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
        raise InvalidRequestError(f"prompt token ids must be integers: {err}", _PROMPT) from None
    if not ids:
        raise InvalidRequestError("prompt_token_ids must not be empty", _PROMPT)
    if vocab_size is not None and (min(ids) < 0 or max(ids) >= vocab_size):
        raise InvalidRequestError(f"prompt token ids must be in [0, {vocab_size})", _PROMPT)
    return ids
