"""The host ↔ engine-process channel, with a real child process running the real engine
(``gpu_engine.LLMEngine``) on the tiny test checkpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_engine.outputs import EngineCapacity as Capacity
from gpu_engine.sequence import RefusalReason, SamplingParams
from producer.contract.envelope import frozen
from workers.engine_process import EngineProcess
from workers.engine_wire import AddCommand, Output, prompt_from_wire, prompt_wire
from workers.settings import DEFAULT_ENGINE_FACTORY

VOCAB = 512  # testkit's tiny checkpoints
MAX_MODEL_LEN = 512  # a longer prompt is refused at once (no compute): see the pipe test


@pytest.fixture
def engine_spec(tiny_checkpoint: Callable[..., Path]) -> tuple[str, str, dict[str, Any]]:
    """Factory, model path and options of the real engine on the tiny checkpoint (CPU)."""
    options = {"device": "cpu", "kv_cache_tokens": 2048, "max_num_seqs": 8,
               "max_model_len": MAX_MODEL_LEN}  # fmt: skip
    return DEFAULT_ENGINE_FACTORY, str(tiny_checkpoint("llama")), options


def _engine(spec: tuple[str, str, dict[str, Any]], **kw: Any) -> EngineProcess:
    factory, path, options = spec
    kw.setdefault("on_fatal", lambda m: None)
    return EngineProcess(factory, path, options, torch_threads=1, **kw)


def _add(i: int, prompt_tokens: int, max_tokens: int) -> AddCommand:
    # Built without SamplingParams' own check, so that an out-of-range value reaches the
    # engine, which must refuse it.
    params = frozen(
        SamplingParams,
        {**SamplingParams(temperature=0.0, ignore_eos=True).__dict__, "max_tokens": max_tokens},
    )
    return AddCommand(
        request_id=f"r{i}",
        prompt_token_ids=[(7 * i + j) % VOCAB for j in range(prompt_tokens)],
        params=params,
        priority=1,
        deadline_unix_s=None,
    )


async def test_commands_larger_than_the_pipe_buffer_all_arrive_in_order(
    engine_spec: tuple[str, str, dict[str, Any]], monkeypatch: Any, capfd: Any
) -> None:
    """One loop turn queues ~2.4 MB of adds (a pipe holds 64 KiB): the host writes what the
    non-blocking pipe takes and the rest as it drains, its loop turning meanwhile; every
    add reaches the engine and is answered (each prompt is longer than ``max_model_len``,
    so the engine refuses it without computing anything), and an abort sent after its add
    reaches the engine after it. Without ``CHATQ_ENGINE_TRACE_S`` the loop prints no trace."""
    monkeypatch.delenv("CHATQ_ENGINE_TRACE_S", raising=False)
    finished: dict[str, Output] = {}
    done = asyncio.Event()
    n = 1000

    def on_outputs(outs: list[Output], capacity: Capacity) -> None:
        for o in outs:
            if o.finished:
                assert o.request_id not in finished, f"{o.request_id} answered twice"
                finished[o.request_id] = o
        if len(finished) == n + 1:
            done.set()

    engine = _engine(engine_spec, on_outputs=on_outputs)
    await engine.start(timeout_s=120)
    try:
        turns_while_sending = 0

        async def ticker() -> None:  # counts loop turns taken while the write still drains
            nonlocal turns_while_sending
            while not done.is_set():
                turns_while_sending += bool(engine._unsent)
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        engine.add([_add(i, 600, 3) for i in range(n)])
        engine.add([_add(n, 10, 400)])
        engine.abort([f"r{n}"])  # same turn, after its add: the engine sees add, then abort
        await asyncio.wait_for(done.wait(), 120)
        await tick_task
        refused = [finished[f"r{i}"] for i in range(n)]
        assert all(o.finish_reason == "error" and o.refusal is not None for o in refused)
        assert {o.refusal.reason for o in refused if o.refusal} == {RefusalReason.PROMPT_TOO_LONG}
        assert finished[f"r{n}"].finish_reason == "abort"
        assert turns_while_sending > 0 and not engine._unsent
    finally:
        await engine.stop()
    assert "[engine-trace" not in capfd.readouterr().err


async def test_loop_trace_reports_where_the_engine_loop_spends_time(
    engine_spec: tuple[str, str, dict[str, Any]], monkeypatch: Any, capfd: Any
) -> None:
    """``CHATQ_ENGINE_TRACE_S`` makes the engine process print, on the worker's stderr, its
    loop turns, adds applied and the share and worst turn of each part (apply, step, send,
    gc). (Without it the loop prints nothing: the pipe test checks that.)"""
    done = asyncio.Event()

    def on_outputs(outs: list[Output], capacity: Capacity) -> None:
        if any(o.finished for o in outs):
            done.set()

    monkeypatch.setenv("CHATQ_ENGINE_TRACE_S", "0.05")
    engine = _engine(engine_spec, on_outputs=on_outputs)
    await engine.start(timeout_s=120)
    try:
        engine.add([_add(0, 10, 100)])
        await asyncio.wait_for(done.wait(), 120)
        await asyncio.sleep(0.1)
    finally:
        await engine.stop()
    err = capfd.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[engine-trace")]
    assert lines, err[-2000:]
    first = lines[0]
    assert "adds=1" in first and "turns=" in first
    for part in ("apply=", "step=", "send=", "gc=", "full_gcs="):
        assert part in first


def test_prompts_travel_as_int32_bytes_and_come_back_equal() -> None:
    ids = [0, 1, 151_645, 2**31 - 1, 7]
    wire = prompt_wire(ids)
    assert isinstance(wire, bytes) and len(wire) == 4 * len(ids)
    assert prompt_from_wire(wire) == ids
    # An id that does not fit stays a list: the engine refuses it with its own message.
    assert prompt_from_wire(prompt_wire([1, 2**40])) == [1, 2**40]
    assert prompt_from_wire(prompt_wire([1, 2.5])) == [1, 2.5]  # type: ignore[list-item]


async def test_two_hosts_share_one_engine_and_each_gets_only_its_own_outputs(
    engine_spec: tuple[str, str, dict[str, Any]],
) -> None:
    """``host_processes=2``: the second host attaches to the same child through its channel.
    Both hold requests with the same ids (one request queued twice, taken by both hosts):
    each sees only its own copies, under its own ids; an abort from host 1 ends only host
    1's copy; a refused add comes back to the host that sent it; and the child stops only
    after both hosts have said ``stop``."""
    seen: list[dict[str, list[int]]] = [{}, {}]
    finished: list[dict[str, str | None]] = [{}, {}]
    errors: list[dict[str, Any]] = [{}, {}]
    both_done = asyncio.Event()

    def collector(k: int) -> Any:
        def on_outputs(outs: list[Output], capacity: Capacity) -> None:
            for o in outs:
                seen[k].setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished:
                    finished[k][o.request_id] = o.finish_reason
                    errors[k][o.request_id] = o.refusal
            if len(finished[0]) == 3 and len(finished[1]) == 3:
                both_done.set()

        return on_outputs

    host0 = _engine(engine_spec, on_outputs=collector(0), host_processes=2)
    await host0.start(timeout_s=120)
    fatal1: list[str] = []
    try:
        (channel,) = host0.host_channels()
        host1 = EngineProcess.attach(channel, on_outputs=collector(1), on_fatal=fatal1.append)
        await host1.start(timeout_s=60)
        assert host1.pid == host0.pid and host1.capacity.total_kv_tokens > 0
        host0.add([_add(0, 5, 3), _add(1, 5, 4), _add(2, 5, 5)])
        host1.add([_add(0, 5, 6), _add(1, 5, 400), _add(3, 5, 2)])
        host1.abort(["r1"])
        host1.add([_add(4, 5, 0)])  # max_tokens 0: the engine refuses it
        try:
            await asyncio.wait_for(both_done.wait(), 120)
        except TimeoutError:
            raise AssertionError(f"{finished} {errors}") from None
        assert {rid: len(t) for rid, t in seen[0].items()} == {"r0": 3, "r1": 4, "r2": 5}
        assert finished[0] == {"r0": "length", "r1": "length", "r2": "length"}
        assert len(seen[1]["r0"]) == 6 and len(seen[1]["r3"]) == 2
        # The aborted copy says nothing more (its host answered it when it aborted).
        assert "r1" not in finished[1] and len(seen[1].get("r1", [])) < 400
        assert finished[1]["r4"] == "error" and errors[1]["r4"]
        assert errors[1]["r4"].reason is RefusalReason.INVALID_PARAMS
        await host1.stop()
        assert host0.alive  # host 1 leaving (with ``stop``) does not end the engine
        host0.add([_add(5, 5, 2)])
        await _until(lambda: "r5" in finished[0], 120)
        assert finished[0]["r5"] == "length", (finished, seen[0].get("r5"), host0.alive)
        assert not fatal1
    finally:
        await host0.stop()
    assert not host0.alive


async def _until(cond: Callable[[], bool], timeout_s: float) -> None:
    async with asyncio.timeout(timeout_s):
        while not cond():
            await asyncio.sleep(0.02)
