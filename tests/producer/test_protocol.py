"""Wire protocol: round trips, every limit rejected with its field named, fuzzed decoding."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer.errors import ProtocolError
from producer.protocol import (
    PROTOCOL_VERSION,
    Chunk,
    Done,
    Envelope,
    Error,
    ErrorCode,
    Limits,
    Message,
    Params,
    Timings,
    Usage,
    decode_envelope,
    decode_result,
    encode_envelope,
    encode_result,
    estimate_cost_tokens,
    make_envelope,
)

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
        params=Params(
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
    assert env.params == replace(Params(), stop=("END",))
    assert env.priority == "normal" and env.stream is False


def test_cost_estimate_counts_prompt_and_output() -> None:
    env = make_envelope(
        [{"role": "user", "content": "x" * 400}], model="m", params=Params(max_tokens=50)
    )
    assert estimate_cost_tokens(env) == 100 + 8 + 50


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
    entries = [
        Chunk(index=3, delta="Hel"),
        Done(
            text="Hello",
            finish_reason="stop",
            usage=Usage(12, 5, 8),
            timings=Timings(1.5, 20.0, 80.25),
            worker="w1",
        ),
        Error(code=ErrorCode.DEADLINE_EXCEEDED.value, message="too late", worker="w2"),
    ]
    for entry in entries:
        fields = encode_result(entry)
        assert decode_result(fields) == entry
        as_str_keys = {k: v for k, v in fields.items()}
        assert decode_result(as_str_keys) == entry
    with pytest.raises(ProtocolError):
        decode_result({"t": b"bogus", "m": msgpack.packb({})})
    with pytest.raises(ProtocolError):
        decode_result({"t": b"done", "m": msgpack.packb({"text": "x"})})


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


def _check(data: bytes) -> None:
    try:
        env = decode_envelope(data)
    except ProtocolError:
        return
    assert isinstance(env, Envelope)
    assert env.validate() is env  # a decoded envelope is valid by construction


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=256))
def test_arbitrary_bytes_never_escape(data: bytes) -> None:
    _check(data)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(msgpack_values)
def test_arbitrary_msgpack_values_never_escape(value: Any) -> None:
    _check(msgpack.packb(value, use_bin_type=True))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.dictionaries(
        st.sampled_from([*sorted(wire().keys()), "extra"]),
        msgpack_values,
        max_size=6,
    )
)
def test_mutated_envelopes_never_escape(changes: dict[str, Any]) -> None:
    _check(msgpack.packb({**wire(), **changes}, use_bin_type=True))


def test_wire_map_has_every_field_once() -> None:
    """to_wire is written out by hand (speed): it must carry every dataclass field."""
    from dataclasses import fields

    env = make_envelope(CHAT, model="m", params=Params(stop=("x",), seed=3))
    wire_map = env.to_wire()
    assert set(wire_map) == {f.name for f in fields(Envelope)}
    assert set(wire_map["params"]) == {f.name for f in fields(Params)}
    assert decode_envelope(encode_envelope(env)) == env
