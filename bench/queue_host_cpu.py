"""CPU time of the worker host process per request while it drains a full queue.

Fills a private Redis with ``N`` chats (``bench.queue_throughput.messages``, ``submit_many``,
no worker running), then runs a ``Worker`` in this process with the zero-cost engine and
measures, from its ready signal until every request completed: requests/s, this process's
CPU seconds per request (the host loop plus its threads, e.g. the tokenizer's) and how busy
the process was (CPU ÷ wall); on Linux also the loop thread's own CPU per request and, for
the whole picture on a shared machine, the engine child's and the Redis server's (read
from ``/proc``). Run it from a checkout's root to measure that checkout's worker:

    .venv/bin/python bench/queue_host_cpu.py --requests 5000
    (cd /tmp/older && /work/main/.venv/bin/python /work/main/bench/queue_host_cpu.py --repo .)
    .venv/bin/python bench/queue_host_cpu.py --smoke      # 200 requests, once
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SMOKE = {"requests": 200, "repeats": 1}


def _proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux ``/proc``), else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


async def drain(url: str, tok_dir: Path, n: int) -> dict[str, float | None]:
    from bench.queue_throughput import MODEL, messages
    from producer.client import ChatClient
    from workers.settings import WorkerSettings
    from workers.worker import Worker

    async with ChatClient(url, allow_unserved=True) as client:
        for start in range(0, n, 500):
            chats = [messages(i) for i in range(start, min(n, start + 500))]
            await client.submit_many(chats, model=MODEL, max_tokens=1)
        redis_pid = int((await client.redis.info("server"))["process_id"])
    settings = WorkerSettings(
        model_path=str(tok_dir),
        redis_url=url,
        served_model_name=MODEL,
        name="host-cpu",
        max_num_seqs=512,
        engine_factory="testkit.zero_cost_engine:ZeroCostEngine.from_options",
    )
    worker = Worker(settings)
    task = asyncio.create_task(worker.run(install_signals=False))
    await asyncio.wait_for(worker.ready.wait(), 120)
    engine_pid = worker.engine.pid if worker.engine is not None else None
    others0 = [_proc_cpu_s(engine_pid), _proc_cpu_s(redis_pid)]
    wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
    while worker.metrics.completed < n:
        if task.done():
            raise RuntimeError("the worker stopped early")
        await asyncio.sleep(0.005)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    loop_cpu = time.thread_time() - loop0  # this coroutine runs on the worker's loop thread
    others = [_proc_cpu_s(engine_pid), _proc_cpu_s(redis_pid)]
    engine_cpu, redis_cpu = (
        None if a is None or b is None else (b - a) / n * 1e6
        for a, b in zip(others0, others, strict=True)
    )
    worker.stop()
    await task
    return {
        "rps": n / wall,
        "cpu_us": cpu / n * 1e6,
        "busy": cpu / wall,
        "loop_us": loop_cpu / n * 1e6,
        "engine_us": engine_cpu,
        "redis_us": redis_cpu,
    }


def main() -> int:
    sys.path.insert(0, str(REPO))
    from bench import smoke

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--repo", type=Path, default=REPO)
    smoke.add_smoke_flag(p, f"{SMOKE}")
    args = smoke.parse_args(p, SMOKE, None)
    sys.path.remove(str(REPO))
    sys.path.insert(0, str(args.repo.resolve()))
    # testkit from this checkout when an older --repo has none (the benchmark tool must be
    # the same on both sides).
    sys.path.insert(1, str(REPO))
    from testkit.checkpoints import build_tokenizer
    from workers.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="chatq-cpu-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        build_tokenizer(tok_dir)
        for _ in range(args.repeats):
            with RedisServer() as server:
                r = asyncio.run(drain(server.url, tok_dir, args.requests))
            print(f"{args.repo}: {r['rps']:,.0f} req/s", end="")
            print(f", host CPU {r['cpu_us']:.0f} us/request, busy {r['busy']:.0%}", end="")
            print(f", loop thread {r['loop_us']:.0f} us/request", end="")
            for name in ("engine", "redis"):
                value = r[f"{name}_us"]
                print("" if value is None else f", {name} {value:.0f} us/request", end="")
            print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
