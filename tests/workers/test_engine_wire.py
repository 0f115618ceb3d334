"""The host ↔ engine wire: every message decodes to what was encoded, refusals carry a
typed reason, and a tagged host gets its own ids back."""

from __future__ import annotations

from gpu_engine.outputs import EngineCapacity, StepOutput
from gpu_engine.sequence import InvalidRequestError, RefusalReason, SamplingParams, StructuredOutput
from workers.engine_wire import (
    ABORT,
    ADD,
    STOP,
    AddCommand,
    Fatal,
    Output,
    Outputs,
    Ready,
    Refusal,
    abort_command,
    abort_target,
    capacity_message,
    capacity_wire,
    command_kind,
    decode_add,
    decode_commands,
    encode_commands,
    fatal_message,
    output_rows,
    outputs_message,
    read_message,
    ready_message,
    refusals_message,
    stop_command,
)

CAPACITY = EngineCapacity(100, 200, 3, 4, 5, 6)


def test_commands_round_trip_in_order() -> None:
    params = SamplingParams(max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11)
    add = AddCommand("r1", [5, 6, 7], params, priority=2, deadline_unix_s=1.7e9)
    data = encode_commands([add.to_wire("@1"), abort_command("r0", "@1"), stop_command()])
    commands = decode_commands(data)
    assert [command_kind(c) for c in commands] == [ADD, ABORT, STOP]
    decoded = decode_add(commands[0])
    assert decoded.request_id == "r1@1" and decoded.prompt_token_ids == [5, 6, 7]
    assert decoded.params == params and decoded.priority == 2
    assert decoded.deadline_unix_s == 1.7e9
    assert abort_target(commands[1]) == "r0@1"


def test_every_sampling_field_crosses_the_pipe() -> None:
    params = SamplingParams(
        max_tokens=9,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        repetition_penalty=1.3,
        min_p=0.05,
        logit_bias={3: -100.0, 8: 2.0},
        stop_token_ids=(4, 5),
        logprobs=3,
        structured=StructuredOutput.json({"type": "object"}, prefix="<t>", suffix="</t>"),
    )
    add = AddCommand("r1", [5], params, priority=1, deadline_unix_s=None)
    assert decode_add(decode_commands(encode_commands([add.to_wire()]))[0]).params == params
    plain = AddCommand("r2", [5], SamplingParams(), priority=1, deadline_unix_s=None)
    assert plain.to_wire()[-1] is None  # the common case carries no extra map


def test_an_add_with_bad_params_is_refused_with_a_typed_reason() -> None:
    add = AddCommand("r1", [5], SamplingParams(), priority=1, deadline_unix_s=None).to_wire()
    add[3] = 0  # max_tokens
    try:
        decode_add(decode_commands(encode_commands([add]))[0])
    except InvalidRequestError as err:
        assert err.reason is RefusalReason.INVALID_PARAMS
    else:
        raise AssertionError("max_tokens 0 was accepted")


def test_engine_messages_decode_for_one_host_and_for_a_tagged_host() -> None:
    rows = output_rows([StepOutput("a@1", [9], False, None, 3, 1)])
    out = read_message(outputs_message(rows, capacity_wire(CAPACITY)), "@1")
    assert out == Outputs([Output("a", [9], False, None, 3, 1)], CAPACITY)
    assert read_message(capacity_message(capacity_wire(CAPACITY)), "") == Outputs([], CAPACITY)
    refused = read_message(refusals_message([("b", RefusalReason.PROMPT_TOO_LONG, "too long")]), "")
    assert refused == Outputs(
        [Output("b", [], True, "error", 0, 0, Refusal(RefusalReason.PROMPT_TOO_LONG, "too long"))],
        None,
    )
    ready = read_message(ready_message([2, 7], capacity_wire(CAPACITY), 42, 4096), "")
    assert ready == Ready([2, 7], CAPACITY, 42, 4096)
    assert read_message(fatal_message("boom"), "") == Fatal("boom")


def test_capacity_travels_as_its_fields_in_order() -> None:
    from dataclasses import astuple

    assert capacity_wire(CAPACITY) == list(astuple(CAPACITY))


def test_outputs_that_are_not_step_outputs_become_rows() -> None:
    class Like:
        request_id = "x"
        new_token_ids = (1, 2)
        finished = 1
        finish_reason = "length"
        num_prompt_tokens = 4
        num_cached_tokens = 0

    assert output_rows([Like()]) == [["x", [1, 2], True, "length", 4, 0]]
