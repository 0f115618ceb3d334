"""The host ↔ engine-process wire: every message of both pipes, encode beside decode.

Each direction carries one msgpack document per batch over a one-way pipe (no pickle of
user data). Host → engine: a list of commands, each a list whose first item names it::

    ["add", request id, prompt, max_tokens, temperature, top_p, top_k, seed, ignore_eos,
     priority, deadline_unix_s, extra params]
    ["abort", request id]
    ["stop"]                                  (this host is done; its last command)

A prompt travels as native int32 bytes (:func:`prompt_wire`). ``extra params`` is null or
a map of the sampling fields that differ from their defaults besides those before it
(penalties, ``min_p``, ``logit_bias`` as [id, bias] pairs, ``stop_token_ids``,
``structured`` as {kind, spec}, ``logprobs``, ``n``, ``num_resumed_tokens``). Engine →
host, one message per document::

    ["ready", eos token ids, capacity, engine pid]
    ["out", [step output row, ...], capacity(, true)]  (a row is a ``StepOutput`` tuple;
        with the fourth item, the row of a request that asked for logprobs has two more
        items: null, [logprob, [top token ids], [top logprobs]])
    ["cap", capacity]                          (capacity only: commands applied, no step)
    ["rej", [[request id, refusal reason, message], ...]]   (adds the engine refused)
    ["fatal", message]

A capacity is the fields of :class:`~gpu_engine.outputs.EngineCapacity` in order; a
refusal reason is a :class:`~gpu_engine.sequence.RefusalReason` value. With several host
processes each host tags its request ids (``@k``) on the way in; :func:`read_message`
strips the tag on the way out.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from gpu_engine.outputs import EngineCapacity, StepOutput, TokenLogprobs  # plain data
from gpu_engine.sequence import RefusalReason, SamplingParams

ADD, ABORT, STOP = "add", "abort", "stop"
_READY, _OUT, _CAP, _REJ, _FATAL = "ready", "out", "cap", "rej", "fatal"
NO_CAPACITY = EngineCapacity(0, 0, 0, 0, 0, 1)  # until the engine reports


# --- host → engine ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AddCommand:
    """One request for the engine: its prompt, how to sample, its engine priority (2 high,
    1 normal, 0 low) and its deadline as absolute Unix seconds (``time.time()``)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    deadline_unix_s: float | None

    def to_wire(self, tag: str = "") -> list[Any]:
        """The ``add`` command; ``tag`` marks the request id as one host's (several hosts).
        Stop strings stay with the host (its detokenizer matches them)."""
        p = self.params
        return [
            ADD,
            self.request_id + tag,
            prompt_wire(self.prompt_token_ids),
            p.max_tokens,
            p.temperature,
            p.top_p,
            p.top_k,
            p.seed,
            p.ignore_eos,
            self.priority,
            self.deadline_unix_s,
            _extra_params(p),
        ]


class DecodedAdd(NamedTuple):
    """An ``add`` command as the engine takes it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    deadline_unix_s: float | None


def abort_command(request_id: str, tag: str = "") -> list[Any]:
    return [ABORT, request_id + tag]


def stop_command() -> list[Any]:
    return [STOP]


def encode_commands(commands: list[list[Any]]) -> bytes:
    """One pipe document: the commands of one host loop turn, in order."""
    packed: bytes = msgpack.packb(commands, use_bin_type=True)
    return packed


def decode_commands(data: bytes) -> list[list[Any]]:
    commands: list[list[Any]] = msgpack.unpackb(data, raw=False)
    return commands


def command_kind(command: list[Any]) -> str:
    """``add``, ``abort`` or ``stop``."""
    kind: str = command[0]
    return kind


def abort_target(command: list[Any]) -> str:
    """The (tagged) request id of an ``abort`` command."""
    rid: str = command[1]
    return rid


def decode_add(command: list[Any]) -> DecodedAdd:
    """An ``add`` command's request; sampling parameters out of range raise the engine's
    :class:`~gpu_engine.sequence.InvalidRequestError` (``invalid_params``)."""
    (_, rid, prompt, max_tokens, temperature, top_p, top_k, seed, ignore_eos, priority,
     deadline_unix_s, extra) = command  # fmt: skip
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        ignore_eos=ignore_eos,
        **(extra or {}),
    )
    # tuple.__new__: NamedTuple's own __new__ handles keywords, on every add (hot path)
    decoded: DecodedAdd = tuple.__new__(
        DecodedAdd, (rid, prompt_from_wire(prompt), params, priority, deadline_unix_s)
    )
    return decoded


_EXTRA_PARAMS = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "logit_bias",
    "stop_token_ids",
    "structured",
    "logprobs",
    "n",
    "num_resumed_tokens",
)


def _extra_params(p: SamplingParams) -> dict[str, Any] | None:
    """The fields of :data:`_EXTRA_PARAMS` that differ from their defaults (None if all are
    defaults, the common case); values as SamplingParams' constructor takes them."""
    if p == _DEFAULT_PARAMS:
        return None
    out: dict[str, Any] = {}
    for name in _EXTRA_PARAMS:
        value = getattr(p, name)
        if value == getattr(_DEFAULT_PARAMS, name):
            continue
        if name == "structured":
            value = value.to_wire()
        elif isinstance(value, tuple):
            value = [list(v) if isinstance(v, tuple) else v for v in value]
        out[name] = value
    return out or None


_DEFAULT_PARAMS = SamplingParams()


def prompt_wire(token_ids: list[int]) -> bytes | list[int]:
    """A prompt's token ids as native int32 bytes (msgpack packs and unpacks them as one
    blob instead of ~1,000 integers; the engine's loop reads them with ``array``); a list
    when an id does not fit (the engine then refuses the request with a clear error)."""
    try:
        return array("i", token_ids).tobytes()
    except (OverflowError, TypeError):
        return token_ids


def prompt_from_wire(data: bytes | list[int]) -> list[int]:
    if isinstance(data, bytes):
        ids = array("i")
        ids.frombytes(data)
        return ids.tolist()
    return data


# --- engine → host ---------------------------------------------------------------------------


def capacity_wire(capacity: EngineCapacity) -> list[int]:
    """The fields of an :class:`EngineCapacity` in order (a test pins the order), as the
    ``EngineCapacity(*row)`` of :func:`read_message` takes them; every step sends one."""
    c = capacity
    return [
        int(c.free_kv_tokens),
        int(c.total_kv_tokens),
        int(c.waiting_tokens),
        int(c.running_seqs),
        int(c.waiting_seqs),
        int(c.max_num_seqs),
        int(getattr(c, "num_preemptions", 0)),  # engines without the counter report 0
    ]


def output_rows(outputs: list[Any]) -> list[Any]:
    """A step's outputs as wire rows: ``StepOutput`` tuples as they are, anything with the
    same attributes copied into lists."""
    if not outputs or type(outputs[0]) is StepOutput:
        return outputs
    return [
        [
            o.request_id,
            list(o.new_token_ids),
            bool(o.finished),
            o.finish_reason,
            int(o.num_prompt_tokens),
            int(o.num_cached_tokens),
        ]
        for o in outputs
    ]


def with_logprobs(rows: list[Any], logprobs: dict[str, TokenLogprobs]) -> list[Any]:
    """``rows`` with each logprobs-asking request's row extended by its step's logprobs
    (``logprobs``: the engine's ``step_logprobs``, by request id)."""
    out = []
    for row in rows:
        lp = logprobs.get(row[0]) if row[1] else None
        if lp is not None:
            top = lp.top
            row = [*row, None, [lp.logprob, [t for t, _ in top], [v for _, v in top]]]
        out.append(row)
    return out


def _logprobs_from_wire(wire: Any) -> TokenLogprobs:
    chosen, ids, values = wire
    return TokenLogprobs(chosen, list(zip(ids, values, strict=True)))


def ready_message(
    eos_token_ids: list[int], capacity: list[int], pid: int, max_model_len: int | None
) -> bytes:
    return _pack([_READY, eos_token_ids, capacity, pid, max_model_len])


def outputs_message(rows: list[Any], capacity: list[int], logprobs: bool = False) -> bytes:
    """A step's rows; ``logprobs``: some rows carry logprobs (:func:`with_logprobs`), which
    the reader then decodes (a fourth item says so: other steps cost it nothing)."""
    return _pack([_OUT, rows, capacity, True] if logprobs else [_OUT, rows, capacity])


def capacity_message(capacity: list[int]) -> bytes:
    return _pack([_CAP, capacity])


def refusals_message(refusals: list[tuple[str, RefusalReason, str]]) -> bytes:
    """Adds the engine refused: (tagged request id, reason, message) each."""
    return _pack([_REJ, [[rid, reason.value, message] for rid, reason, message in refusals]])


def fatal_message(message: str) -> bytes:
    return _pack([_FATAL, message])


def _pack(doc: list[Any]) -> bytes:
    packed: bytes = msgpack.packb(doc, use_bin_type=True)
    return packed


class Refusal(NamedTuple):
    """Why the engine refused an add (an :class:`Output` with finish reason ``error``)."""

    reason: RefusalReason
    message: str


class Output(NamedTuple):
    """One request's part of a step (``StepOutput``); a tuple: one per sequence per step."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
    refusal: Refusal | None = None  # set when the engine refused the request
    logprobs: TokenLogprobs | None = None  # the new token's, when the request asked


class Ready(NamedTuple):
    """The engine is up: its eos token ids, capacity, process id and context length
    (longest prompt + answer; None where the engine does not say)."""

    eos_token_ids: list[int]
    capacity: EngineCapacity
    pid: int
    max_model_len: int | None


class Outputs(NamedTuple):
    """Outputs for this host (a step's, or refused adds'); ``capacity`` None: unchanged."""

    outputs: list[Output]
    capacity: EngineCapacity | None


class Fatal(NamedTuple):
    """The engine failed and is exiting."""

    message: str


EngineMessage = Ready | Outputs | Fatal


def read_message(data: bytes, tag: str) -> EngineMessage:
    """Decode one engine → host document; ``tag`` is cut off this host's request ids."""
    doc = msgpack.unpackb(data, raw=False)
    kind = doc[0]
    if kind == _OUT:
        if tag:
            cut = -len(tag)
            outs = [Output(row[0][:cut], *row[1:]) for row in doc[1]]
        else:
            outs = [Output(*row) for row in doc[1]]
        if len(doc) > 3:  # some rows carry logprobs
            outs = [
                o if o.logprobs is None else o._replace(logprobs=_logprobs_from_wire(o.logprobs))
                for o in outs
            ]
        return Outputs(outs, EngineCapacity(*doc[2]))
    if kind == _CAP:
        return Outputs([], EngineCapacity(*doc[1]))
    if kind == _REJ:
        end = -len(tag) or None
        return Outputs(
            [
                Output(rid[:end], [], True, "error", 0, 0, Refusal(RefusalReason(reason), msg))
                for rid, reason, msg in doc[1]
            ],
            None,
        )
    if kind == _READY:
        length = doc[4]
        return Ready(
            [int(t) for t in doc[1]],
            EngineCapacity(*doc[2]),
            int(doc[3]),
            None if length is None else int(length),
        )
    if kind == _FATAL:
        return Fatal(str(doc[1]))
    raise ValueError(f"unknown engine message {kind!r}")
