"""The host ↔ engine-process channel, with a real child process (the zero-cost engine)."""

from __future__ import annotations

import asyncio
from typing import Any

from gpu_engine.outputs import EngineCapacity as Capacity
from workers.engine_process import (
    AddCommand,
    EngineProcess,
    Output,
    prompt_from_wire,
    prompt_wire,
)

ZERO_COST = "bench.zero_cost_engine:ZeroCostEngine.from_options"


def _add(i: int, prompt_tokens: int, max_tokens: int) -> AddCommand:
    return AddCommand(
        request_id=f"r{i}",
        prompt_token_ids=list(range(1000, 1000 + prompt_tokens)),
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=0,
        seed=None,
        ignore_eos=True,
        priority=1,
        deadline_s=None,
    )


async def test_commands_larger_than_the_pipe_buffer_all_arrive_in_order() -> None:
    """One loop turn queues ~5 MB of adds (a pipe holds 64 KiB): the host writes what the
    non-blocking pipe takes and the rest as it drains, without blocking its loop; every
    request comes back complete, and an abort sent after its add reaches the engine."""
    outputs: dict[str, list[int]] = {}
    finished: dict[str, str | None] = {}
    done = asyncio.Event()
    n = 2000

    def on_outputs(outs: list[Output], capacity: Capacity) -> None:
        for o in outs:
            outputs.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                finished[o.request_id] = o.finish_reason
        if len(finished) == n + 1:
            done.set()

    engine = EngineProcess(ZERO_COST, "", {}, on_outputs=on_outputs, on_fatal=lambda m: None)
    await engine.start(timeout_s=60)
    try:
        ticks = 0

        async def ticker() -> None:  # the loop keeps turning while the big write drains
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        tick_task = asyncio.create_task(ticker())
        engine.add([_add(i, 600, 3) for i in range(n)])
        engine.add([_add(n, 10, 30_000)])
        engine.abort([f"r{n}"])  # same turn, after its add: the engine sees add, then abort
        await asyncio.wait_for(done.wait(), 60)
        await tick_task
        assert all(len(outputs[f"r{i}"]) == 3 for i in range(n))
        assert all(finished[f"r{i}"] == "length" for i in range(n))
        assert finished[f"r{n}"] == "abort"
        assert ticks > 0 and not engine._unsent
    finally:
        await engine.stop()


async def test_loop_trace_reports_where_the_engine_loop_spends_time(
    monkeypatch: Any, capfd: Any
) -> None:
    """``CHATQ_ENGINE_TRACE_S`` makes the engine process print, on the worker's stderr, its
    loop turns, adds applied and the share and worst turn of each part (apply, step, send,
    gc); without it the loop prints nothing."""
    done = asyncio.Event()

    def on_outputs(outs: list[Output], capacity: Capacity) -> None:
        if any(o.finished for o in outs):
            done.set()

    for trace in ("0.05", ""):
        monkeypatch.setenv("CHATQ_ENGINE_TRACE_S", trace)
        done.clear()
        engine = EngineProcess(ZERO_COST, "", {}, on_outputs=on_outputs, on_fatal=lambda m: None)
        await engine.start(timeout_s=60)
        try:
            engine.add([_add(0, 10, 20_000)])
            await asyncio.wait_for(done.wait(), 60)
            await asyncio.sleep(0.1)
        finally:
            await engine.stop()
        err = capfd.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("[engine-trace")]
        if trace:
            assert lines, err[-2000:]
            first = lines[0]
            assert "adds=1" in first and "turns=" in first
            for part in ("apply=", "step=", "send=", "gc=", "full_gcs="):
                assert part in first
        else:
            assert not lines


def test_prompts_travel_as_int32_bytes_and_come_back_equal() -> None:
    ids = [0, 1, 151_645, 2**31 - 1, 7]
    wire = prompt_wire(ids)
    assert isinstance(wire, bytes) and len(wire) == 4 * len(ids)
    assert prompt_from_wire(wire) == ids
    # An id that does not fit stays a list: the engine refuses it with its own message.
    assert prompt_from_wire(prompt_wire([1, 2**40])) == [1, 2**40]
    assert prompt_from_wire(prompt_wire([1, 2.5])) == [1, 2.5]  # type: ignore[list-item]
