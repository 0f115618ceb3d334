"""The engine process's own loop (the child side of :mod:`workers.engine_process`).

One synchronous loop that never waits on Redis, tokenization or detokenization::

    while running:
        commands = drain the command pipe (block only when the engine has nothing to do)
        apply adds / aborts in order, for at most ~1 ms while steps run (a refused add is
        reported, never fatal; the rest wait for the next turns)
        outputs = engine.pipelined_step()   ← launches step N+1, then returns step N's
        pack and hand (outputs, capacity) to the sender thread

``pipelined_step`` is the engine's asynchronous scheduling: step N+1 is scheduled, staged
and launched while the device still runs step N (its input ids refer to step N's samples on
the device), so the host's work between steps — postprocessing, scheduling, staging, and
packing and sending the outputs here (~0.5 ms for 256 sequences) — overlaps the device
instead of leaving it idle. Commands are applied between steps; an abort frees its blocks at
once (the device runs steps in order). An engine without ``pipelined_step`` (the queue
benchmark's zero-cost engine) is stepped with ``step()``. If the host dies, the command pipe
reports EOF and the loop exits.
"""

from __future__ import annotations

import gc
import importlib
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Collection
from multiprocessing.connection import Connection, wait
from typing import Any

import msgpack

from gpu_engine.outputs import StepOutput  # plain data, no torch
from workers.engine_process import prompt_from_wire

# While steps run, commands are applied for at most this long per loop turn (the rest wait,
# in order, for the next turns): the device waits for the host while it applies them, and a
# pull's worth of adds (~60 µs each) at once used to stall it for tens of milliseconds.
APPLY_BUDGET_S = 0.001
# Cyclic GC in the engine process. Every step allocates thousands of short-lived objects but
# the loop makes no garbage cycles: on H200 spikes the loop trace counted 0 objects found
# unreachable across all collections, while single young (generation-0, 20,000-object)
# collections paused the loop for 20-77 ms each (1-1.5% of the loop, the device idle for most
# of each pause; 2.5-3.8% at Python's default thresholds). So automatic collection is off
# there; ``FullCollections`` runs a full collection when the loop goes idle after work, and
# under continuous work once per ``FULL_GC_BUSY_INTERVAL_S``, so the cycles an engine might
# still make are freed within that time. Under load a full collection walks every live
# object (tens of thousands of queued requests in a spike): 234 and 388 ms on the H200, the
# device idle meanwhile, and neither found garbage; hence ten minutes, not one.
FULL_GC_BUSY_INTERVAL_S = 600.0
FULL_GC_IDLE_INTERVAL_S = 1.0  # idle after work: not more often than this


class FullCollections:
    """The engine loop's garbage collections, at moments it chooses (see above)."""

    def __init__(
        self,
        busy_interval_s: float = FULL_GC_BUSY_INTERVAL_S,
        idle_interval_s: float = FULL_GC_IDLE_INTERVAL_S,
    ) -> None:
        self.busy_interval_s = busy_interval_s
        self.idle_interval_s = idle_interval_s
        self.last = time.monotonic()
        self.worked = False  # work since the last full collection
        self.count = 0

    def turn(self, busy: bool) -> bool:
        """Called once per loop turn; True when it ran a full collection."""
        if busy:
            self.worked = True
        elif not self.worked:
            return False
        interval = self.busy_interval_s if busy else self.idle_interval_s
        if time.monotonic() - self.last < interval:
            return False
        gc.collect()
        self.count += 1
        self.worked = busy
        self.last = time.monotonic()
        return True


def resolve_factory(spec: str) -> tuple[Callable[..., Any], Any]:
    """``"pkg.mod:Class.method"`` → (callable, SamplingParams class next to it or gpu_engine's)."""
    module_name, _, attr_path = spec.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    params_cls = getattr(module, "SamplingParams", None)
    if params_cls is None:
        params_cls = importlib.import_module("gpu_engine").SamplingParams
    return obj, params_cls


def _capacity_wire(engine: Any) -> list[int]:
    c = engine.capacity()
    return [
        int(c.free_kv_tokens),
        int(c.total_kv_tokens),
        int(c.waiting_tokens),
        int(c.running_seqs),
        int(c.waiting_seqs),
        int(c.max_num_seqs),
    ]


class LoopTrace:
    """Where the engine loop's time goes, printed to stderr every ``interval_s`` (the worker's
    log): loop turns, time applying commands (adds decoded and validated), stepping, waiting
    for the device inside the step, packing outputs, and garbage-collection pauses, each as
    total and worst single turn, and how many of the collections were full ones. On when
    ``CHATQ_ENGINE_TRACE_S`` is set (seconds between lines); a diagnostic for stalls that
    leave the GPU idle, off by default."""

    PARTS = ("apply", "step", "wait", "send", "gc")

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._t0 = self._last = time.perf_counter()
        self._gc_start = 0.0
        self._reset()
        gc.callbacks.append(self._on_gc)

    def _reset(self) -> None:
        self.turns = 0
        self.adds = 0
        self.full_gcs = 0
        self.gc_collected = 0  # objects the collections found unreachable (garbage cycles)
        self.gc_worst = (0, 0)  # generation, collected of the longest pause
        self.total = dict.fromkeys(self.PARTS, 0.0)
        self.worst = dict.fromkeys(self.PARTS, 0.0)
        self.worst_turn = 0.0

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._gc_start
            gen, collected = info.get("generation", -1), info.get("collected", 0)
            if pause > self.worst["gc"]:
                self.gc_worst = (gen, collected)
            self.add("gc", pause)
            self.full_gcs += gen == 2
            self.gc_collected += collected

    def add(self, part: str, seconds: float) -> None:
        self.total[part] += seconds
        self.worst[part] = max(self.worst[part], seconds)

    def wrap_wait(self, engine: Any) -> None:
        """Time the device wait inside ``pipelined_step`` (the model runner's collect)."""
        runner: Any = getattr(engine, "model_runner", None)
        collect = getattr(runner, "collect", None)
        if runner is None or collect is None:
            return

        def timed(step: Any) -> Any:
            t = time.perf_counter()
            try:
                return collect(step)
            finally:
                self.add("wait", time.perf_counter() - t)

        runner.collect = timed

    def turn(self, adds: int, apply_s: float, step_s: float, send_s: float, turn_s: float) -> None:
        """One stepping loop turn; prints a line once ``interval_s`` has passed."""
        self.adds += adds
        self.add("apply", apply_s)
        self.add("step", step_s)
        self.add("send", send_s)
        self.turns += 1
        self.worst_turn = max(self.worst_turn, turn_s)
        now = time.perf_counter()
        if now - self._last < self.interval_s:
            return
        span = now - self._last
        parts = " ".join(
            f"{p}={self.total[p] / span:.1%}/max{self.worst[p] * 1e3:.1f}ms" for p in self.PARTS
        )
        print(
            f"[engine-trace t={now - self._t0:.0f}s] turns={self.turns} adds={self.adds} "
            f"max_turn={self.worst_turn * 1e3:.1f}ms {parts} full_gcs={self.full_gcs} "
            f"gc_collected={self.gc_collected} gc_worst=gen{self.gc_worst[0]}/"
            f"{self.gc_worst[1]}",
            file=sys.stderr,
            flush=True,
        )
        self._last = now
        self._reset()


def _sender(conns: list[Connection], outbox: queue.SimpleQueue[tuple[int, bytes] | None]) -> None:
    gone: set[int] = set()  # hosts whose pipe broke (their command pipe reports it)
    while True:
        item = outbox.get()
        if item is None:
            return
        front, data = item
        if front in gone:
            continue
        try:
            conns[front].send_bytes(data)
        except (BrokenPipeError, OSError):
            gone.add(front)


class Fronts:
    """The host processes this engine serves (``--host-processes``): their command pipes,
    which of them owns each request, and which are still open.

    With one host process everything goes to it, as before. With several, each host tags
    its request ids (so two hosts holding the same request never collide here), and a
    step's outputs are split by owner. A host that sends ``stop`` is done: its requests
    are aborted and its pipe is no longer read; the loop ends when every host is done. A
    pipe that closes without ``stop`` means its host died: the loop ends (EOFError), every
    other host sees the engine go and exits, and the queue's reclaim takes over.
    """

    def __init__(self, conns: list[Connection]) -> None:
        self.conns = conns
        self.reading = list(range(len(conns)))  # hosts whose ``stop`` has not arrived
        self.serving = set(range(len(conns)))  # hosts whose ``stop`` has not been applied
        self.owner: dict[str, int] = {}  # request id → host index (several hosts only)
        self.many = len(conns) > 1

    def receive(self, block_s: float, backlog: deque[tuple[int, list[Any]]]) -> None:
        """Append every command waiting on the pipes; wait up to ``block_s`` for one. A
        pipe is not read past its ``stop`` (its host may close it right after)."""
        conns = self.conns
        ready: list[Any]
        if not self.many:  # one pipe: a poll, no select
            ready = [conns[0]] if self.reading and conns[0].poll(block_s) else []
        elif self.reading:
            ready = wait([conns[k] for k in self.reading], block_s)
        else:
            return
        for k in list(self.reading):
            conn = conns[k]
            got = conn in ready
            while got:
                batch = msgpack.unpackb(conn.recv_bytes(), raw=False)
                backlog.extend([(k, c) for c in batch])
                if batch and batch[-1][0] == "stop":  # a host's last command
                    self.reading.remove(k)
                    break
                got = conn.poll(0)

    def added(self, front: int, request_id: str) -> None:
        if self.many:
            self.owner[request_id] = front

    def forget(self, request_id: str) -> None:
        if self.many:
            self.owner.pop(request_id, None)

    def close(self, front: int, engine: Any) -> bool:
        """Host ``front`` is done: abort what it still owns; True when no host is left."""
        self.serving.discard(front)
        if self.many:
            for rid in [r for r, k in self.owner.items() if k == front]:
                engine.abort(rid)
                del self.owner[rid]
        return not self.serving

    def split(self, rows: list[Any]) -> list[list[Any]]:
        """One step's output rows (request id first, finished third) per host."""
        if not self.many:
            return [rows]
        parts: list[list[Any]] = [[] for _ in self.conns]
        owner = self.owner
        for row in rows:
            rid = row[0]
            k = owner.get(rid)
            if k is None:
                continue  # aborted by its host, which answered it already
            parts[k].append(row)
            if row[2]:
                del owner[rid]
        return parts


def _apply(
    engine: Any, params_cls: Any, fronts: Fronts, front: int, cmd: list[Any],
    rejected: list[list[Any]],
) -> bool:  # fmt: skip
    """Apply one command of host ``front``; False once every host has sent ``stop``. A
    refused ``add`` goes to ``rejected`` as ``[front, request id, message]``."""
    op = cmd[0]
    if op == "add":
        (
            _,
            rid,
            prompt,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            ignore_eos,
            prio,
            deadline,
        ) = cmd
        try:
            params = params_cls(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                ignore_eos=ignore_eos,
            )
            engine.add_request(
                rid, prompt_from_wire(prompt), params, priority=prio, deadline=deadline
            )
            fronts.added(front, rid)
        except Exception as err:  # one bad request (too long, bad params) never stops the loop
            rejected.append([front, rid, f"{type(err).__name__}: {err}"])
    elif op == "abort":
        engine.abort(cmd[1])
        fronts.forget(cmd[1])
    elif op == "stop":
        return not fronts.close(front, engine)
    return True


def engine_main(
    cmd_conns: list[Connection],
    out_conns: list[Connection],
    factory_spec: str,
    model_path: str,
    options: dict[str, Any],
    torch_threads: int | None,
) -> None:
    """Entry point of the engine process (spawn context): one command and one output pipe
    per host process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the host decides when the engine stops
    outbox: queue.SimpleQueue[tuple[int, bytes] | None] = queue.SimpleQueue()
    sender = threading.Thread(target=_sender, args=(out_conns, outbox), daemon=True)
    sender.start()
    fronts = Fronts(cmd_conns)

    def send(doc: list[Any], front: int = 0) -> None:
        outbox.put((front, msgpack.packb(doc, use_bin_type=True)))

    def send_all(doc: list[Any]) -> None:
        data = msgpack.packb(doc, use_bin_type=True)
        for k in range(len(out_conns)):
            outbox.put((k, data))

    try:
        if torch_threads:
            import torch

            torch.set_num_threads(torch_threads)
        factory, params_cls = resolve_factory(factory_spec)
        engine = factory(model_path, **options)
        # Startup left torch, transformers and the model's Python objects (~200k) that
        # every full collection would scan again (~50-100 ms with the device idle); the
        # loop only needs its own short-lived objects looked at.
        gc.freeze()
        gc.disable()
        send_all(
            [
                "ready",
                {
                    "eos_token_ids": sorted(int(t) for t in engine.eos_token_ids),
                    "capacity": _capacity_wire(engine),
                    "pid": os.getpid(),
                },
            ]
        )
        step = getattr(engine, "pipelined_step", None) or engine.step
        finish = getattr(engine, "finish_pipeline", None)
        trace_s = float(os.environ.get("CHATQ_ENGINE_TRACE_S") or 0)
        trace = LoopTrace(trace_s) if trace_s > 0 else None
        if trace is not None:
            trace.wrap_wait(engine)

        def send_outputs(outs: list[Any], also: Collection[int] = ()) -> None:
            """Each host's rows with the capacity; ``also``: hosts that get the capacity
            even without rows (their commands were applied this turn)."""
            if outs and type(outs[0]) is StepOutput:  # the wire row already (a tuple)
                rows = outs
            else:
                rows = [
                    [
                        o.request_id,
                        list(o.new_token_ids),
                        bool(o.finished),
                        o.finish_reason,
                        int(o.num_prompt_tokens),
                        int(o.num_cached_tokens),
                    ]
                    for o in outs
                ]
            capacity = _capacity_wire(engine)
            for k, part in enumerate(fronts.split(rows)):
                if part or not fronts.many:
                    send(["out", part, capacity], k)
                elif k in also:
                    send(["cap", capacity], k)

        backlog: deque[tuple[int, list[Any]]] = deque()  # commands received, not applied yet
        collections = FullCollections()
        running = True
        while running:
            t_turn = time.perf_counter()
            busy = engine.has_unfinished()
            collections.turn(busy or bool(backlog))
            # Idle: block (briefly, so a vanished host is noticed); busy: take what is there.
            fronts.receive(0 if busy or backlog else 0.5, backlog)
            t_apply = time.perf_counter()
            applied = 0
            applied_from: set[int] = set()
            rejected: list[list[Any]] = []
            budget_end = time.perf_counter() + APPLY_BUDGET_S
            while backlog:
                applied += 1
                front, cmd = backlog.popleft()
                applied_from.add(front)
                if not _apply(engine, params_cls, fronts, front, cmd, rejected):
                    running = False
                    break
                if busy and time.perf_counter() > budget_end:
                    break
            for front in {r[0] for r in rejected}:
                send(["rej", [r[1:] for r in rejected if r[0] == front]], front)
            if not running:
                break
            if engine.has_unfinished():
                t_step = time.perf_counter()
                outs = step()
                t_send = time.perf_counter()
                send_outputs(outs, applied_from)
                if trace is not None:
                    t_end = time.perf_counter()
                    trace.turn(applied, t_step - t_apply, t_send - t_step, t_end - t_send,
                               t_end - t_turn)  # fmt: skip
            elif applied:
                capacity = ["cap", _capacity_wire(engine)]
                for front in applied_from:
                    send(capacity, front)
        if finish is not None:
            outs = finish()
            if outs:
                send_outputs(outs)
    except (EOFError, BrokenPipeError):
        pass  # a host is gone: the others see this process go
    except BaseException as err:  # report every failure to the hosts, then exit non-zero
        send_all(["fatal", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"])
        outbox.put(None)
        sender.join(5)
        os._exit(1)
    outbox.put(None)
    sender.join(5)
