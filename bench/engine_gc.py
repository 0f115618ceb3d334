"""Garbage-collection pauses in the engine's loop (CPU, model forward stubbed).

The engine process freezes what start-up left (``gc.freeze()``), then every step allocates
outputs, lists and tuples, while the live requests hold long token lists that a full
collection walks element by element. An H200 trace of the spike (``CHATQ_ENGINE_TRACE_S``)
showed collections taking 2.5–3.8% of the loop with single pauses of 11–25 ms, each one a
pause of the device too; with a 20,000-object young generation, later traces showed single
young collections of 20-77 ms that found no garbage at all, so the engine process now runs
with automatic collection off and collects when idle (``workers/engine_loop.py``). This
bench runs ``bench/host_overhead.py``'s stubbed engine on the
spike's shape (1,024 requests at once, a shared 1,000-token prefix, answers of 50–400
tokens, ``pipelined_step``) under each collector setting, one after the other, ``--rounds``
times, and reports collections, full collections, total and worst pause, and host time.

    .venv/bin/python bench/engine_gc.py [--rounds 2]
    .venv/bin/python bench/engine_gc.py --smoke    # one round of a 24-request workload
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.host_overhead import FULL, SMOKE, Size, spike_engine

MODES: dict[str, tuple[int, int, int] | None] = {
    "python default": None,
    "young generation 20000 (the engine loop's until 2026-11-29)": (20_000, 10, 100),
    "automatic collection off (the engine loop's now: it collects when idle)": (0, 0, 0),
}


def run(root: Path, threshold: tuple[int, int, int] | None, size: Size) -> dict[str, float]:
    engine = spike_engine(root, size)
    gc.collect()
    gc.freeze()  # what the engine process does after start-up
    saved = gc.get_threshold()
    if threshold is not None:
        gc.set_threshold(*threshold)
    pauses: list[float] = []
    full = 0
    start = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        nonlocal full
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - start[0])
            full += info["generation"] == 2

    gc.callbacks.append(on_gc)
    t = time.perf_counter()
    steps = 0
    try:
        while engine.has_unfinished():
            engine.pipelined_step()
            steps += 1
    finally:
        wall = time.perf_counter() - t
        gc.callbacks.remove(on_gc)
        gc.set_threshold(*saved)
        gc.unfreeze()
    return {
        "steps": steps,
        "host_ms_per_step": wall / steps * 1e3,
        "collections": len(pauses),
        "full": full,
        "gc_ms": sum(pauses) * 1e3,
        "worst_ms": max(pauses, default=0.0) * 1e3,
        "gc_share": sum(pauses) / wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="one round, 24 short requests")
    args = ap.parse_args()
    size = SMOKE if args.smoke else FULL
    if args.smoke:
        args.rounds = 1
    print(
        "| collector | round | steps | host ms/step | collections | full | GC ms | worst ms "
        "| GC share |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = list(MODES.items())
            if r % 2:
                order.reverse()
            for name, threshold in order:
                res = run(Path(tmp), threshold, size)
                label = name if threshold is None else f"{name} {threshold}"
                print(
                    f"| {label} | {r + 1} | {res['steps']} | {res['host_ms_per_step']:.3f} | "
                    f"{res['collections']} | {res['full']} | {res['gc_ms']:.1f} | "
                    f"{res['worst_ms']:.2f} | {res['gc_share']:.1%} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
