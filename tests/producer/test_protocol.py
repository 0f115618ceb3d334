"""Wire protocol: round trips, every limit rejected with its field named, fuzzed decoding."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpu_engine.sequence import SamplingParams, StructuredOutput
from producer.contract.codec import decode_envelope, encode_envelope, make_envelope
from producer.contract.codes import ErrorCode
from producer.contract.envelope import BASIC_SAMPLING_FIELDS, PROTOCOL_VERSION, Envelope, Message
from producer.contract.limits import Limits
from producer.contract.logprobs import TokenLogprob, TopLogprob
from producer.contract.results import (
    Choice,
    Chunk,
    Done,
    Error,
    Timings,
    Usage,
    decode_result,
    encode_result,
    result_fields,
)
from producer.contract.tools import ToolCall
from producer.contract.validation import validate_envelope
from producer.errors import ProtocolError

CHAT = [
    {"role": "system", "content": "You are a helpful shop assistant."},
    {"role": "user", "content": "Where is my order #1234? 🚚"},
]


def wire(**changes: Any) -> dict[str, Any]:
    """A valid wire map with top-level ``changes`` applied (None deletes a key)."""
    base = make_envelope(CHAT, model="smollm2").to_wire()
    for key, value in changes.items():
        if value is None:
            base.pop(key, None)
        else:
            base[key] = value
    return base


def params(**changes: Any) -> dict[str, Any]:
    p = make_envelope(CHAT, model="m").to_wire()["params"]
    p.update(changes)
    return p


def rejects(
    obj: Any,
    field: str | None,
    code: ErrorCode = ErrorCode.INVALID_REQUEST,
    limits: Limits | None = None,
) -> ProtocolError:
    data = obj if isinstance(obj, bytes) else msgpack.packb(obj, use_bin_type=True)
    with pytest.raises(ProtocolError) as info:
        decode_envelope(data, limits or Limits())
    assert info.value.code == code.value, info.value
    assert info.value.field == field, info.value
    if field:
        assert field in str(info.value)
    return info.value


def test_round_trip_all_fields() -> None:
    env = make_envelope(
        CHAT,
        model="Qwen/Qwen2.5-0.5B-Instruct",
        params=SamplingParams(
            max_tokens=77,
            temperature=0.3,
            top_p=0.9,
            top_k=40,
            stop=("\n\n", "END"),
            seed=1234,
            ignore_eos=True,
        ),
        priority="high",
        tenant="acme",
        deadline_s=2.5,
        stream=True,
        idempotency_key="order-1234-retry",
        callback_url="https://example.invalid/hook",
    )
    back = decode_envelope(encode_envelope(env))
    assert back == env
    assert back.v == PROTOCOL_VERSION
    assert back.messages[1] == Message("user", "Where is my order #1234? 🚚")
    assert back.deadline_ms is not None and back.deadline_ms - back.created_ms == 2500
    assert not back.expired(back.created_ms) and back.expired(back.deadline_ms)


def test_defaults_and_single_stop_string() -> None:
    raw = wire(params={"stop": "END"}, priority=None, stream=None)
    env = decode_envelope(msgpack.packb(raw))
    assert env.params.stop == ("END",)
    assert env.params == replace(SamplingParams(), stop=("END",))
    assert env.priority == "normal" and env.stream is False


@pytest.mark.parametrize(
    ("obj", "field", "code"),
    [
        (wire(v=2), "v", ErrorCode.UNSUPPORTED_VERSION),
        (wire(v=None), "v", ErrorCode.INVALID_REQUEST),
        (wire(v="1"), "v", ErrorCode.INVALID_REQUEST),
        (wire(id=""), "id", ErrorCode.INVALID_REQUEST),
        (wire(id="a" * 65), "id", ErrorCode.INVALID_REQUEST),
        (wire(id="bad id!"), "id", ErrorCode.INVALID_REQUEST),
        (wire(model=None), "model", ErrorCode.INVALID_REQUEST),
        (wire(model="a b"), "model", ErrorCode.INVALID_REQUEST),
        (wire(messages=[]), "messages", ErrorCode.INVALID_REQUEST),
        (wire(messages="hi"), "messages", ErrorCode.INVALID_REQUEST),
        (wire(messages=[{"role": "user"}]), "messages[0]", ErrorCode.INVALID_REQUEST),
        (
            wire(messages=[{"role": "robot", "content": "x"}]),
            "messages[0].role",
            ErrorCode.INVALID_REQUEST,
        ),
        (
            wire(messages=[{"role": "user", "content": 5}]),
            "messages[0].content",
            ErrorCode.INVALID_REQUEST,
        ),
        (wire(params=params(max_tokens=0)), "params.max_tokens", ErrorCode.INVALID_REQUEST),
        (wire(params=params(max_tokens=10**9)), "params.max_tokens", ErrorCode.INVALID_REQUEST),
        (wire(params=params(max_tokens=True)), "params.max_tokens", ErrorCode.INVALID_REQUEST),
        (wire(params=params(temperature=-0.1)), "params.temperature", ErrorCode.INVALID_REQUEST),
        (wire(params=params(temperature=2.5)), "params.temperature", ErrorCode.INVALID_REQUEST),
        (
            wire(params=params(temperature=float("nan"))),
            "params.temperature",
            ErrorCode.INVALID_REQUEST,
        ),
        (wire(params=params(top_p=0.0)), "params.top_p", ErrorCode.INVALID_REQUEST),
        (wire(params=params(top_p=1.5)), "params.top_p", ErrorCode.INVALID_REQUEST),
        (wire(params=params(top_k=-1)), "params.top_k", ErrorCode.INVALID_REQUEST),
        (wire(params=params(top_k=100_000)), "params.top_k", ErrorCode.INVALID_REQUEST),
        (wire(params=params(stop=["x"] * 9)), "params.stop", ErrorCode.INVALID_REQUEST),
        (wire(params=params(stop=[""])), "params.stop[0]", ErrorCode.INVALID_REQUEST),
        (wire(params=params(stop=["x" * 300])), "params.stop[0]", ErrorCode.INVALID_REQUEST),
        (wire(params=params(seed=-5)), "params.seed", ErrorCode.INVALID_REQUEST),
        (wire(params=params(ignore_eos=1)), "params.ignore_eos", ErrorCode.INVALID_REQUEST),
        (wire(params=params(beam_width=4)), "params.beam_width", ErrorCode.INVALID_REQUEST),
        (wire(params=[1, 2]), "params", ErrorCode.INVALID_REQUEST),
        (wire(priority="urgent"), "priority", ErrorCode.INVALID_REQUEST),
        (wire(tenant="t" * 65), "tenant", ErrorCode.INVALID_REQUEST),
        (wire(deadline_ms=-1), "deadline_ms", ErrorCode.INVALID_REQUEST),
        (wire(deadline_ms=1.5), "deadline_ms", ErrorCode.INVALID_REQUEST),
        (wire(created_ms="now"), "created_ms", ErrorCode.INVALID_REQUEST),
        (wire(stream="yes"), "stream", ErrorCode.INVALID_REQUEST),
        (wire(idempotency_key="k" * 129), "idempotency_key", ErrorCode.INVALID_REQUEST),
        (wire(callback_url="ftp://x"), "callback_url", ErrorCode.INVALID_REQUEST),
        (wire(callback_url="https://" + "x" * 2050), "callback_url", ErrorCode.INVALID_REQUEST),
        (wire(surprise=1), "surprise", ErrorCode.INVALID_REQUEST),
    ],
)
def test_every_limit_rejected_with_field_named(obj: Any, field: str, code: ErrorCode) -> None:
    rejects(obj, field, code)


def test_size_limits() -> None:
    small = Limits(max_payload_bytes=1000, max_messages=2, max_content_chars=10, max_total_chars=15)
    rejects(wire(), None, ErrorCode.PAYLOAD_TOO_LARGE, Limits(max_payload_bytes=50))
    three = [{"role": "user", "content": "a"}] * 3
    rejects(wire(messages=three), "messages", limits=small)
    rejects(
        wire(messages=[{"role": "user", "content": "x" * 11}]),
        "messages[0].content",
        ErrorCode.PAYLOAD_TOO_LARGE,
        small,
    )
    two = [{"role": "user", "content": "x" * 8}] * 2
    rejects(wire(messages=two), "messages", ErrorCode.PAYLOAD_TOO_LARGE, small)


def test_not_msgpack_and_not_a_map() -> None:
    rejects(b"\xc1", None)  # never-used msgpack byte
    rejects(b"\x92\x01", None)  # truncated array
    rejects(msgpack.packb([1, 2, 3]), None)
    rejects(msgpack.packb({"v": 1}) + b"\x00", None)  # trailing data
    with pytest.raises(ProtocolError):
        decode_envelope(12345)


def test_make_envelope_validates_before_anything_is_sent() -> None:
    with pytest.raises(ProtocolError) as info:
        make_envelope([{"role": "user", "content": "hi"}], model="m", priority="asap")
    assert info.value.field == "priority"
    with pytest.raises(ProtocolError) as info:
        make_envelope([{"role": "user"}], model="m")
    assert info.value.field == "messages[0]"
    with pytest.raises(ProtocolError) as info:
        make_envelope(CHAT, model="m", deadline_s=-1)
    assert info.value.field == "deadline_s"


def test_result_entries_round_trip() -> None:
    top = (TopLogprob("lo", -0.25, (108, 111)), TopLogprob("\ufffd", -3.0, (226, 156)))
    logprobs = (
        TokenLogprob("Hel", -0.5, (72, 101, 108), top),
        TokenLogprob("lo", -1.0, (108, 111)),
    )
    entries = [
        Chunk(index=3, delta="Hel"),
        Chunk(index=4, delta="Hello", tokens=(7, 8), logprobs=logprobs),
        Done(
            text="Hello",
            finish_reason="stop",
            usage=Usage(12, 5, 8),
            timings=Timings(1.5, 20.0, 80.25),
            worker="w1",
        ),
        Done(text="Hello", finish_reason="length", logprobs=logprobs),
        Chunk(index=5, delta="Hi", tokens=(9,), choice=2),
        Done(
            text="Hello",
            finish_reason="stop",
            usage=Usage(12, 9, 0),
            choices=(
                Choice(0, "Hello", "stop", logprobs=logprobs),
                Choice(1, "", "tool_calls", "think", (ToolCall("c1", "f", "{}"),)),
            ),
        ),
        Error(code=ErrorCode.DEADLINE_EXCEEDED.value, message="too late", worker="w2"),
    ]
    for entry in entries:
        fields = encode_result(entry)
        assert decode_result(fields) == entry
        assert result_fields(entry) == fields  # the workers' encoder: the same bytes
        as_str_keys = {k: v for k, v in fields.items()}
        assert decode_result(as_str_keys) == entry
    with pytest.raises(ProtocolError):
        decode_result({"t": b"bogus", "m": msgpack.packb({})})
    with pytest.raises(ProtocolError):
        decode_result({"t": b"done", "m": msgpack.packb({"text": "x"})})
    bad = {"text": "x", "finish_reason": "stop", "logprobs": [{"token": "a", "logprob": 0.5}]}
    with pytest.raises(ProtocolError) as info:
        decode_result({"t": b"done", "m": msgpack.packb(bad)})
    assert info.value.field == "logprobs[0].logprob"


# --- fuzzing: arbitrary input either decodes to a valid envelope or raises ProtocolError ---

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)


def _check(data: bytes) -> str:
    """Decode ``data``: either a valid envelope or a ProtocolError with a known code and a
    message; nothing else escapes. Returns which of the two it was."""
    try:
        env = decode_envelope(data)
    except ProtocolError as err:
        assert err.code in {c.value for c in ErrorCode}, err
        assert err.message, err
        return "refused"
    assert isinstance(env, Envelope)
    assert validate_envelope(env) is env  # a decoded envelope is valid by construction
    return "accepted"


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_escape(data: bytes) -> None:
    _check(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(msgpack_values)
def test_arbitrary_msgpack_values_never_escape(value: Any) -> None:
    _check(msgpack.packb(value, use_bin_type=True))


def test_mutated_envelopes_never_escape() -> None:
    """Both outcomes are exercised (counted over the run), not only the refusals."""
    outcomes: Counter[str] = Counter()

    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from([*sorted(wire().keys()), "extra"]),
            msgpack_values,
            max_size=6,
        )
    )
    def run(changes: dict[str, Any]) -> None:
        outcomes[_check(msgpack.packb({**wire(), **changes}, use_bin_type=True))] += 1

    run()
    assert outcomes["accepted"] > 0 and outcomes["refused"] > 0, outcomes


def test_wire_map_has_every_field_once() -> None:
    """to_wire is written out by hand (speed): it must carry every dataclass field."""
    from dataclasses import fields

    env = make_envelope(
        CHAT,
        model="m",
        params=SamplingParams(stop=("x",), seed=3),
        result_ttl_s=86_400,
        tools=[{"name": "f"}],
        tool_choice="none",
        chat_template_kwargs={"enable_thinking": False},
    )
    wire_map = env.to_wire()
    assert set(wire_map) == {f.name for f in fields(Envelope)}
    # result_ttl_s travels only when set: workers that predate it keep reading the rest
    assert "result_ttl_s" not in make_envelope(CHAT, model="m").to_wire()
    for bad in (0, -1, 10**9, 1.5, "60"):
        with pytest.raises(ProtocolError, match="result_ttl_s"):
            decode_envelope(msgpack.packb({**wire_map, "result_ttl_s": bad}))
    # The optional sampling fields travel only when set (an older worker refuses them as
    # unknown rather than ignoring them).
    assert set(wire_map["params"]) == set(BASIC_SAMPLING_FIELDS)
    assert decode_envelope(encode_envelope(env)) == env
    full = make_envelope(
        CHAT,
        model="m",
        params=SamplingParams(
            presence_penalty=0.5,
            frequency_penalty=-1.0,
            repetition_penalty=1.2,
            min_p=0.1,
            logit_bias={3: -100, 9: 2.5},
            stop_token_ids=(7,),
            structured=StructuredOutput.json({"type": "object"}, prefix="<a>", suffix="</a>"),
            logprobs=3,
            n=2,
        ),
    )
    engine_only = {"num_resumed_tokens"}
    assert set(full.to_wire()["params"]) == {f.name for f in fields(SamplingParams)} - engine_only
    assert decode_envelope(encode_envelope(full)) == full


# --- the fast path: the common shape checked with exact types, the rest left to _check_map ---

message_values = st.one_of(
    msgpack_values,
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "robot", ""]), "content": msgpack_values}
    ),
    st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=12)}),
)
param_values = st.dictionaries(
    st.sampled_from([*sorted(params()), "beam_width"]),
    st.one_of(
        msgpack_values,
        st.integers(-3, 40),
        st.floats(-1.0, 3.0),
        st.lists(st.text(max_size=3), max_size=10),
        st.sampled_from([float("inf"), float("nan"), 2**63, True, 1.0]),
    ),
    max_size=4,
)
LIMITS_SMALL = Limits(max_messages=3, max_content_chars=8, max_total_chars=12, max_stop=3)


def _same_as_full_check(obj: Any, limits: Limits) -> str:
    """The fast path either declines or gives exactly what the full check gives. Returns
    which branch was taken: "fast" (fast path answered), "declined_valid" or
    "declined_invalid" (the full check accepted / refused what the fast path left to it)."""
    from producer.contract.fast_path import fast_envelope as _fast_envelope
    from producer.contract.validation import check_map as _check_map

    fast = _fast_envelope(obj, limits)
    try:
        full: Envelope | None = _check_map(obj, limits)
    except ProtocolError:
        full = None
    if fast is None:
        return "declined_valid" if full is not None else "declined_invalid"
    assert full is not None, obj  # accepts nothing the full check refuses
    assert fast == full and repr(fast) == repr(full)  # same values, same types
    return "fast"


def test_fast_path_agrees_with_the_full_check() -> None:
    """Both branches (fast path answering, and declining) are taken during the run."""
    taken: Counter[str] = Counter()

    @settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(
        st.dictionaries(
            st.sampled_from([*sorted(wire().keys()), "extra"]), msgpack_values, max_size=4
        ),
        st.lists(message_values, max_size=4) | msgpack_values,
        param_values,
        st.booleans(),
    )
    def run(
        changes: dict[str, Any], messages: Any, param_changes: dict[str, Any], small: bool
    ) -> None:
        obj = {**wire(), **changes}
        if messages != []:
            obj["messages"] = messages
        obj["params"] = {**params(), **param_changes}
        limits = LIMITS_SMALL if small else Limits()
        taken[_same_as_full_check(obj, limits)] += 1
        packed = msgpack.unpackb(msgpack.packb(obj, use_bin_type=True))
        taken[_same_as_full_check(packed, limits)] += 1

    run()
    assert taken["fast"] > 0 and taken["declined_invalid"] > 0, taken


NAN, INF = float("nan"), float("inf")
TOP_BOUNDS: dict[str, list[Any]] = {
    "v": [1, 2, True, 1.0, None],
    "id": ["a", "a" * 64, "a" * 65, "abc\n", "a" * 64 + "\n", "", "x y", 5],
    "model": ["m", "a" * 128, "a" * 129, "a/b@c.d", "a b", None],
    "priority": ["high", "normal", "low", "urgent", None, 1],
    "tenant": [None, "t", "t" * 64, "t" * 65, "", 5],
    "deadline_ms": [None, 1, 2**53 - 1, 2**53, 0, -1, 1.5, True],
    "created_ms": [0, 1, 2**53 - 1, 2**53, -1, 1.0, True, None],
    "stream": [True, False, 0, 1, None],
    "idempotency_key": [None, "k", "k" * 128, "k" * 129, ""],
    "callback_url": [None, "http://x", "https://x", "ftp://x", "", "https://" + "x" * 2040,
                     "https://" + "x" * 2041],
    "extra": [1],
}  # fmt: skip
PARAM_BOUNDS: dict[str, list[Any]] = {
    "max_tokens": [1, 256, 32_768, 0, 32_769, True, 1.0],
    "temperature": [0, 0.0, -0.0, 2, 2.0, 2.0000001, -1, NAN, INF, True, "1"],
    "top_p": [1, 1.0, 0.5, 0.0, 1.0000001, NAN, True],
    "top_k": [0, 1_000, 1_001, -1, True, 1.0],
    "stop": [[], ["x"], "x", ["x"] * 3, ["x"] * 4, ["x"] * 8, ["x"] * 9, [""], ["x" * 256],
             ["x" * 257], [1], None],
    "seed": [None, 0, 2**63 - 1, 2**63, -1, True, 1.0],
    "ignore_eos": [True, False, 0, None],
    "beam_width": [4],
}  # fmt: skip
MESSAGE_BOUNDS = st.one_of(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "user", "assistant", "tool", "robot", 1]),
            "content": st.sampled_from(["", "x", "x" * 8, "x" * 9, "ü" * 5, 5, None]),
        }
    ),
    st.sampled_from([{"role": "user"}, {"role": "user", "content": "x", "name": "n"}, "hi"]),
)


def _few(bounds: dict[str, list[Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """A few fields set to bound values (most combinations of many are refused anyway)."""
    pairs = [(k, v) for k, values in bounds.items() for v in values]
    return st.lists(st.sampled_from(pairs), max_size=2).map(dict)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    _few(TOP_BOUNDS),
    _few(PARAM_BOUNDS),
    st.sampled_from([None, None, None, []]).flatmap(
        lambda m: st.none() if m is None else st.lists(MESSAGE_BOUNDS, max_size=4)
    ),
    st.sampled_from([False, False, False, True]),
    st.sampled_from([False, False, False, True]),
)
def test_fast_path_agrees_at_every_bound(
    changes: dict[str, Any],
    param_changes: dict[str, Any],
    messages: list[Any] | None,
    drop_params: bool,
    small: bool,
) -> None:
    obj = {**wire(), **changes}
    if messages is not None:
        obj["messages"] = messages
    obj["params"] = None if drop_params else {**params(), **param_changes}
    _same_as_full_check(obj, LIMITS_SMALL if small else Limits())


def test_fast_path_takes_the_usual_envelopes() -> None:
    from producer.contract.fast_path import fast_envelope as _fast_envelope

    env = make_envelope(
        CHAT,
        model="m",
        params=SamplingParams(stop=("END",), seed=7, temperature=0.0),
        tenant="t",
        deadline_s=5,
        idempotency_key="k",
        callback_url="https://example.invalid/x",
    )
    assert _fast_envelope(msgpack.unpackb(encode_envelope(env)), Limits()) == env
    no_params = wire(params=None)
    assert _fast_envelope(no_params, Limits()) == decode_envelope(msgpack.packb(no_params))
    _same_as_full_check(wire(id="a" * 64 + "\n"), Limits())  # $ matches before a newline
    _same_as_full_check(wire(id="abc\n"), Limits())
    _same_as_full_check(wire(params=params(temperature=1)), Limits())  # int → float
