"""Where the engine loop's time goes: an opt-in trace for stalls that leave the GPU idle."""

from __future__ import annotations

import gc
import sys
import time
from typing import Any


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
