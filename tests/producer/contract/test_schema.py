"""The JSON Schemas in docs/schema against the validator, both ways: every valid envelope
the strategies generate validates; one changed field is refused by the schema exactly when
the validator refuses it, and both name the same field. The same for result bodies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from jsonschema.exceptions import ValidationError, best_match, relevance

from producer.contract.codec import encode_envelope, make_envelope
from producer.contract.results import RESULT_BODY_FIELD, RESULT_TYPE_FIELD, decode_result
from producer.contract.schema import render, schema_files
from producer.contract.validation import validate_map
from producer.errors import ProtocolError
from tests.producer.contract.strategies import (
    ABSENT,
    body_paths,
    changed,
    chunk_bodies,
    done_bodies,
    edge_values,
    envelopes,
    error_bodies,
    json_values,
    paths,
)

SCHEMA_DIR = Path(__file__).resolve().parents[3] / "docs" / "schema"
SETTINGS = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)


def _is_msgpack_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# The schemas describe msgpack documents: an integer is a msgpack integer, so 2.0 is not one
# (plain JSON Schema counts it as one; docs/protocol.md says so).
MsgpackValidator = jsonschema.validators.extend(
    jsonschema.Draft202012Validator,
    type_checker=jsonschema.Draft202012Validator.TYPE_CHECKER.redefine(
        "integer", _is_msgpack_integer
    ),
)


def _validator(name: str) -> Any:
    schema = json.loads((SCHEMA_DIR / name).read_text(encoding="utf-8"))
    return MsgpackValidator(schema)


ENVELOPE = _validator("envelope.schema.json")
RESULTS = {kind: _validator(f"result-{kind}.schema.json") for kind in ("chunk", "done", "error")}


def _dotted(path: list[Any]) -> str | None:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def schema_field(error: ValidationError) -> str | None:
    """The field the validator names for a schema error: a missing or unknown property is
    named itself, except inside a message, where the message is."""
    path = list(error.absolute_path)
    if error.validator in ("required", "additionalProperties"):
        in_message = len(path) == 2 and path[0] == "messages"
        if not in_message:
            if error.validator == "required":
                name = next(p for p in error.validator_value if p not in error.instance)
            else:
                name = sorted(set(error.instance) - set(error.schema["properties"]))[0]
            path.append(name)
    return _dotted(path)


def schema_verdict(validator: Any, obj: Any) -> str | bool | None:
    """False when the schema accepts ``obj``, else the field of its best error; among
    equally relevant errors the first in document order (``messages[0]`` before
    ``messages[1]``), as the validator reports them (best_match keeps the first of a tie)."""
    errors = sorted(validator.iter_errors(obj), key=_document_order)
    error = best_match(errors, key=_relevance_without_path)
    while error is not None and error.context:
        # best_match stops at an anyOf whose best branch errors tie (stop: [None, None] has
        # two equally bad items); the validator names the first bad item, so go on into
        # the first of the tie in document order.
        error = min(error.context, key=lambda e: (_relevance_without_path(e), _document_order(e)))
    return False if error is None else schema_field(error)


def _relevance_without_path(error: Any) -> tuple[Any, ...]:
    # jsonschema's relevance compares the paths themselves last, so of two equally relevant
    # errors it keeps the later one (messages[1]); without them a tie keeps the first. Its
    # last key (the instance is of the schema's type) is dropped too: of two messages, a
    # non-map one ([{}, None]) would otherwise outrank the first, which the validator names.
    rank = relevance(error)
    return (rank[0], *rank[2:-1])


def _document_order(error: Any) -> tuple[tuple[int, int | str], ...]:
    return tuple((0, p) if isinstance(p, int) else (1, str(p)) for p in error.absolute_path)


def validator_verdict(obj: Any) -> str | bool | None:
    try:
        validate_map(obj)
    except ProtocolError as err:
        return err.field
    return False


def test_the_schema_files_are_the_contract_s_current_schemas() -> None:
    """``python -m producer.contract.schema docs/schema`` writes them; rerun it after a
    change to the limits, patterns or codes."""
    files = schema_files()
    assert sorted(p.name for p in SCHEMA_DIR.glob("*.schema.json")) == sorted(files)
    for name, schema in files.items():
        assert (SCHEMA_DIR / name).read_text(encoding="utf-8") == render(schema), name
        jsonschema.Draft202012Validator.check_schema(schema)


def test_an_envelope_the_python_client_builds_validates() -> None:
    env = make_envelope(
        [{"role": "user", "content": "Où est ma commande ? 🚚 你好"}],
        model="Qwen/Qwen2.5-0.5B-Instruct",
        max_tokens=64,
        temperature=0.2,
        stop=["\n\n"],
        seed=7,
        priority="high",
        deadline_s=30,
        idempotency_key="order-1",
        callback_url="https://hooks.example/done",
    )
    assert schema_verdict(ENVELOPE, msgpack.unpackb(encode_envelope(env))) is False


@pytest.mark.parametrize(
    ("stop", "field"),
    [([None, None], "params.stop[0]"), (["a", 5, None], "params.stop[1]"), (5, "params.stop")],
)
def test_a_bad_stop_is_named_alike_by_both(stop: object, field: str) -> None:
    """Two equally bad items: both name the first (a case the property test found)."""
    obj = msgpack.unpackb(
        encode_envelope(make_envelope([{"role": "user", "content": "hi"}], model="m"))
    )
    obj["params"]["stop"] = stop
    assert schema_verdict(ENVELOPE, obj) == validator_verdict(obj) == field


@SETTINGS
@given(envelopes())
def test_every_valid_envelope_validates_against_the_schema(env: dict[str, Any]) -> None:
    assert validator_verdict(env) is False
    assert schema_verdict(ENVELOPE, env) is False


@SETTINGS
@given(envelopes(), st.data())
def test_one_changed_field_is_refused_by_both_or_by_neither_naming_the_same_field(
    env: dict[str, Any], data: st.DataObject
) -> None:
    path = data.draw(st.sampled_from(paths(env)))
    value = data.draw(st.just(ABSENT) | json_values | edge_values)
    if path[0] in ("id", "model") and isinstance(value, str):
        # A pattern's $ is the end of the string (ECMA-262); Python's re also matches it
        # before a final newline, which the validator does not accept.
        assume(not value.endswith("\n"))
    obj = changed(env, path, value)
    assert schema_verdict(ENVELOPE, obj) == validator_verdict(obj), (path, value)


@SETTINGS
@given(
    st.sampled_from(["chunk", "done", "error"]).flatmap(
        lambda kind: st.tuples(
            st.just(kind),
            {"chunk": chunk_bodies(), "done": done_bodies(), "error": error_bodies()}[kind],
        )
    ),
    st.data(),
)
def test_result_bodies_validate_and_changes_are_refused_by_both_or_neither(
    kind_body: tuple[str, dict[str, Any]], data: st.DataObject
) -> None:
    kind, body = kind_body
    validator = RESULTS[kind]
    assert schema_verdict(validator, body) is False
    assert result_verdict(kind, body) is False
    path = data.draw(st.sampled_from(body_paths(body)))
    lists = ("logprobs", "choices")
    if len(path) == 2 and path[0] not in lists and not isinstance(body.get(path[0]), dict):
        return
    obj = changed(body, path, data.draw(st.just(ABSENT) | json_values | edge_values))
    assert schema_verdict(validator, obj) == result_verdict(kind, obj), (path, obj)


def result_verdict(kind: str, body: Any) -> str | bool | None:
    fields = {RESULT_TYPE_FIELD: kind, RESULT_BODY_FIELD: msgpack.packb(body, use_bin_type=True)}
    try:
        decode_result(fields)
    except ProtocolError as err:
        return err.field
    return False
