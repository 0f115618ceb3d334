"""The engine process's own loop (the child side of :mod:`workers.engine_process`).

One synchronous loop that never waits on Redis, tokenization or detokenization::

    while running:
        commands = drain the command pipes (block only when the engine has nothing to do)
        apply adds / aborts in order, for at most APPLY_BUDGET_S while steps run (a refused
        add is reported with its typed reason, never fatal; the rest wait for the next turns)
        outputs = engine.pipelined_step()   ← launches step N+1, then returns step N's
        pack and hand (outputs, capacity) to the sender thread

``pipelined_step`` is the engine's asynchronous scheduling: step N+1 is scheduled, staged
and launched while the device still runs step N (its input ids refer to step N's samples on
the device), so the host's work between steps (postprocessing, scheduling, staging, and
packing and sending the outputs here) overlaps the device instead of leaving it idle.
Commands are applied between steps; an abort frees its blocks at once (the device runs
steps in order). An engine without ``pipelined_step`` (the queue benchmark's zero-cost
engine) is stepped with ``step()``. If a host dies, its command pipe reports EOF and the
loop exits. Every message is defined in :mod:`workers.engine_wire`.
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Collection
from multiprocessing.connection import Connection
from typing import Any

from gpu_engine.sequence import InvalidRequestError, RefusalReason
from workers.engine_fronts import Fronts, Outbox, sender
from workers.engine_trace import LoopTrace
from workers.engine_wire import (
    ABORT,
    ADD,
    STOP,
    abort_target,
    capacity_message,
    capacity_wire,
    command_kind,
    decode_add,
    fatal_message,
    output_rows,
    outputs_message,
    ready_message,
    refusals_message,
    with_logprobs,
)

# While steps run, commands are applied for at most this long per loop turn (the rest wait,
# in order, for the next turns): the device waits for the host while it applies them, and a
# whole pull's worth of adds at once stalls it (docs/benchmarks.md has the measurements).
APPLY_BUDGET_S = 0.001
# Cyclic GC in the engine process. Every step allocates thousands of short-lived objects but
# the loop makes no garbage cycles, while single young collections paused it for tens of
# milliseconds with the device idle (docs/benchmarks.md, the spike's engine trace). So
# automatic collection is off there; ``FullCollections`` runs a full collection when the
# loop goes idle after work, and under continuous work once per FULL_GC_BUSY_INTERVAL_S, so
# the cycles an engine might still make are freed within that time. Under load a full
# collection walks every live object (tens of thousands of queued requests in a spike) and
# pauses the device for hundreds of milliseconds; hence ten minutes, not one.
FULL_GC_BUSY_INTERVAL_S = 600.0
FULL_GC_IDLE_INTERVAL_S = 1.0  # idle after work: not more often than this
# A host pipe is polled at least this often while the engine is idle, so a vanished host is
# noticed.
IDLE_POLL_S = 0.5
SENDER_JOIN_TIMEOUT_S = 5.0


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


def resolve_factory(spec: str) -> Callable[..., Any]:
    """``"pkg.mod:Class.method"`` → the callable that builds the engine."""
    module_name, _, attr_path = spec.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in attr_path.split("."):
        obj = getattr(obj, part)
    factory: Callable[..., Any] = obj
    return factory


class AppliedCommands:
    """What one loop turn's commands did: how many ran, which hosts sent them, the adds
    the engine refused (per host), and whether every host has said ``stop``."""

    __slots__ = ("all_stopped", "count", "fronts", "refused")

    def __init__(self) -> None:
        self.count = 0
        self.fronts: set[int] = set()
        self.refused: dict[int, list[tuple[str, RefusalReason, str]]] = {}
        self.all_stopped = False


class EngineLoop:
    """The engine process's loop: commands in, steps, outputs out (see the module
    docstring). ``outbox`` feeds the sender thread."""

    def __init__(self, engine: Any, fronts: Fronts, outbox: Outbox) -> None:
        self.engine = engine
        self.fronts = fronts
        self.outbox = outbox
        self.step = getattr(engine, "pipelined_step", None) or engine.step
        self.finish = getattr(engine, "finish_pipeline", None)
        self.backlog: deque[tuple[int, list[Any]]] = deque()  # received, not applied yet
        self.collections = FullCollections()
        trace_s = float(os.environ.get("CHATQ_ENGINE_TRACE_S") or 0)
        self.trace = LoopTrace(trace_s) if trace_s > 0 else None
        if self.trace is not None:
            self.trace.wrap_wait(engine)

    def run(self) -> None:
        """Turn until every host has said ``stop``; then the last pipelined outputs."""
        while self.turn():
            pass
        if self.finish is not None:
            outs = self.finish()
            if outs:
                self.send_outputs(outs)

    def turn(self) -> bool:
        """One loop turn; False once every host has said ``stop``."""
        t_turn = time.perf_counter()
        busy = self.engine.has_unfinished()
        self.collections.turn(busy or bool(self.backlog))
        # Idle: block (briefly, so a vanished host is noticed); busy: take what is there.
        self.fronts.receive(0 if busy or self.backlog else IDLE_POLL_S, self.backlog)
        t_apply = time.perf_counter()
        applied = self.apply_commands(busy)
        self.send_refusals(applied)
        if applied.all_stopped:
            return False
        if self.engine.has_unfinished():
            t_step = time.perf_counter()
            outs = self.step()
            t_send = time.perf_counter()
            self.send_outputs(outs, applied.fronts)
            if self.trace is not None:
                t_end = time.perf_counter()
                self.trace.turn(applied.count, t_step - t_apply, t_send - t_step,
                                t_end - t_send, t_end - t_turn)  # fmt: skip
        elif applied.count:
            self.send_capacity(applied.fronts)
        return True

    def apply_commands(self, busy: bool) -> AppliedCommands:
        """Apply received commands in order (while ``busy``, for APPLY_BUDGET_S at most)."""
        applied = AppliedCommands()
        budget_end = time.perf_counter() + APPLY_BUDGET_S
        while self.backlog:
            applied.count += 1
            front, command = self.backlog.popleft()
            applied.fronts.add(front)
            if not self.apply(front, command, applied):
                applied.all_stopped = True
                break
            if busy and time.perf_counter() > budget_end:
                break
        return applied

    def apply(self, front: int, command: list[Any], applied: AppliedCommands) -> bool:
        """Apply one command of host ``front``; False once every host has sent ``stop``."""
        kind = command_kind(command)
        if kind == ADD:
            self.add(front, command, applied)
        elif kind == ABORT:
            rid = abort_target(command)
            self.engine.abort(rid)
            self.fronts.forget(rid)
        elif kind == STOP:
            return not self.fronts.close(front, self.engine)
        return True

    def add(self, front: int, command: list[Any], applied: AppliedCommands) -> None:
        """One ``add``; a refused one (too long, bad params) is reported, never fatal."""
        try:
            rid, prompt_token_ids, params, priority, deadline_unix_s = decode_add(command)
            self.engine.add_request(
                rid, prompt_token_ids, params, priority=priority, deadline_unix_s=deadline_unix_s
            )
            self.fronts.added(front, rid)
        except Exception as err:  # one bad request never stops the loop
            reason = err.reason if isinstance(err, InvalidRequestError) else RefusalReason.INTERNAL
            refusal = (str(command[1]), reason, f"{type(err).__name__}: {err}")
            applied.refused.setdefault(front, []).append(refusal)

    def send_refusals(self, applied: AppliedCommands) -> None:
        for front, refusals in applied.refused.items():
            self.outbox.put((front, refusals_message(refusals)))

    def send_outputs(self, outs: list[Any], also: Collection[int] = ()) -> None:
        """Each host's rows with the capacity; ``also``: hosts that get the capacity even
        without rows (their commands were applied this turn)."""
        rows = output_rows(outs)
        logprobs = getattr(self.engine, "step_logprobs", None)
        if logprobs:  # requests that asked for them (the engine's last outputs')
            rows = with_logprobs(rows, logprobs)
        capacity = capacity_wire(self.engine.capacity())
        fronts = self.fronts
        for k, part in enumerate(fronts.split(rows)):
            if part or not fronts.many:
                self.outbox.put((k, outputs_message(part, capacity, bool(logprobs))))
            elif k in also:
                self.outbox.put((k, capacity_message(capacity)))

    def send_capacity(self, fronts: Collection[int]) -> None:
        message = capacity_message(capacity_wire(self.engine.capacity()))
        for front in fronts:
            self.outbox.put((front, message))


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
    outbox: Outbox = Outbox()
    sender_thread = threading.Thread(target=sender, args=(out_conns, outbox), daemon=True)
    sender_thread.start()
    try:
        engine = _start_engine(factory_spec, model_path, options, torch_threads)
        _send_all(outbox, len(out_conns), _ready(engine))
        EngineLoop(engine, Fronts(cmd_conns), outbox).run()
    except (EOFError, BrokenPipeError):
        pass  # a host is gone: the others see this process go
    except BaseException as err:  # report every failure to the hosts, then exit non-zero
        text = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
        _send_all(outbox, len(out_conns), fatal_message(text))
        _stop_sender(outbox, sender_thread)
        os._exit(1)
    _stop_sender(outbox, sender_thread)


def _start_engine(
    factory_spec: str, model_path: str, options: dict[str, Any], torch_threads: int | None
) -> Any:
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    engine = resolve_factory(factory_spec)(model_path, **options)
    # Startup left torch, transformers and the model's Python objects (~200k) that every
    # full collection would scan again with the device idle; the loop only needs its own
    # short-lived objects looked at.
    gc.freeze()
    gc.disable()
    return engine


def _ready(engine: Any) -> bytes:
    eos = sorted(int(t) for t in engine.eos_token_ids)
    length = getattr(engine, "max_model_len", None)
    return ready_message(
        eos,
        capacity_wire(engine.capacity()),
        os.getpid(),
        int(length) if isinstance(length, int) else None,
    )


def _send_all(outbox: Outbox, hosts: int, message: bytes) -> None:
    for k in range(hosts):
        outbox.put((k, message))


def _stop_sender(outbox: Outbox, thread: threading.Thread) -> None:
    outbox.put(None)
    thread.join(SENDER_JOIN_TIMEOUT_S)
