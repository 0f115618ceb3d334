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


async def test_two_hosts_share_one_engine_and_each_gets_only_its_own_outputs() -> None:
    """``host_processes=2``: the second host attaches to the same child through its channel.
    Both hold requests with the same ids (one request queued twice, taken by both hosts):
    each sees only its own copies, under its own ids; an abort from host 1 ends only host
    1's copy; a refused add comes back to the host that sent it; and the child stops only
    after both hosts have said ``stop``."""
    seen: list[dict[str, list[int]]] = [{}, {}]
    finished: list[dict[str, str | None]] = [{}, {}]
    errors: list[dict[str, str | None]] = [{}, {}]
    both_done = asyncio.Event()

    def collector(k: int) -> Any:
        def on_outputs(outs: list[Output], capacity: Capacity) -> None:
            for o in outs:
                seen[k].setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished:
                    finished[k][o.request_id] = o.finish_reason
                    errors[k][o.request_id] = o.error
            if len(finished[0]) == 3 and len(finished[1]) == 3:
                both_done.set()

        return on_outputs

    host0 = EngineProcess(
        ZERO_COST, "", {}, on_outputs=collector(0), on_fatal=lambda m: None, host_processes=2
    )
    await host0.start(timeout_s=60)
    fatal1: list[str] = []
    try:
        (channel,) = host0.host_channels()
        host1 = EngineProcess.attach(channel, on_outputs=collector(1), on_fatal=fatal1.append)
        await host1.start(timeout_s=60)
        assert host1.pid == host0.pid and host1.capacity.total_kv_tokens > 0
        host0.add([_add(0, 5, 3), _add(1, 5, 4), _add(2, 5, 5)])
        host1.add([_add(0, 5, 6), _add(1, 5, 30_000), _add(3, 5, 2)])
        host1.abort(["r1"])
        host1.add([_add(4, 5, 0)])  # max_tokens 0: the engine refuses it
        try:
            await asyncio.wait_for(both_done.wait(), 20)
        except TimeoutError:
            raise AssertionError(f"{finished} {errors}") from None
        assert {rid: len(t) for rid, t in seen[0].items()} == {"r0": 3, "r1": 4, "r2": 5}
        assert finished[0] == {"r0": "length", "r1": "length", "r2": "length"}
        assert len(seen[1]["r0"]) == 6 and len(seen[1]["r3"]) == 2
        # The aborted copy says nothing more (its host answered it when it aborted).
        assert "r1" not in finished[1] and len(seen[1].get("r1", [])) < 10
        assert finished[1]["r4"] == "error" and errors[1]["r4"]
        await host1.stop()
        assert host0.alive  # host 1 leaving (with ``stop``) does not end the engine
        host0.add([_add(5, 5, 2)])
        for _ in range(100):
            if "r5" in finished[0]:
                break
            await asyncio.sleep(0.05)
        assert finished[0].get("r5") == "length", (finished, seen[0].get("r5"), host0.alive)
        assert not fatal1
    finally:
        await host0.stop()
    assert not host0.alive
