"""Retry storms: how many refused submits it takes to get each request in, with N producers
retrying as ENQUEUE's hint says.

A private Redis; one model whose backlog bound (in Redis, ``chatq:bounds:{q0}``) holds a few
requests; a drain that acts as a worker at a fixed rate (XREADGROUP + the FINALIZE script,
so the drain rate ENQUEUE measures is the real one); N producers that each submit one
request with ``ChatClient.submit_retrying`` (sleep ``retry_after_s`` after each
``QueueFull``). Reported: refused submits per admitted request (target <= 5), and how long
the N requests took next to what the drain rate allows. A warm-up drains a few requests
first (never past the bound) so the drain rate is measured, as in a running service.

    .venv/bin/python bench/retry_storm.py --producers 200 1000   # the table
    .venv/bin/python bench/retry_storm.py --smoke                # tiny counts (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.smoke import add_smoke_flag, parse_args  # noqa: E402

MODEL = "storm"
CHAT = [{"role": "user", "content": "Where is my parcel? It was due on Monday."}]
DONE_BODY = b"\x81\xa4text\xa2ok"  # msgpack {"text": "ok"}: the drain's final, read by no one


class Drain:
    """A worker stand-in: takes entries from the lane and finalizes them at ``rate_rps``."""

    def __init__(self, url: str, rate_rps: float) -> None:
        import redis.asyncio as aioredis

        from producer.contract.keys import Keys
        from producer.contract.scripts import FINALIZE

        self.redis: Any = aioredis.Redis.from_url(url)
        self.keys = Keys()
        self.finalize = self.redis.register_script(FINALIZE)
        self.interval_s = 1.0 / rate_rps
        self.done = 0

    async def run(self, stop: asyncio.Event) -> None:
        from producer.contract.keys import COST_FIELD, GROUP

        lane = self.keys.requests(MODEL, "normal")
        try:
            await self.redis.xgroup_create(lane, GROUP, id="0", mkstream=True)
        except Exception as err:  # the group exists
            if "BUSYGROUP" not in str(err):
                raise
        next_s = time.monotonic()
        while not stop.is_set():
            reply = await self.redis.xreadgroup(GROUP, "drain", {lane: ">"}, count=1, block=50)
            if not reply:
                continue
            entry_id, fields = reply[0][1][0]
            next_s = max(next_s + self.interval_s, time.monotonic() - self.interval_s)
            await asyncio.sleep(max(0.0, next_s - time.monotonic()))
            rid = f"drained-{self.done}"
            await self.finalize(
                keys=[self.keys.result(rid), self.keys.final(rid), lane, self.keys.backlog(MODEL)],
                args=[GROUP, entry_id, "done", DONE_BODY, 60, int(fields[COST_FIELD.encode()])],
            )
            self.done += 1


async def _producer(client: Any, counts: dict[str, int]) -> None:
    from producer.errors import QueueFull
    from producer.retry import RetryPolicy, retrying

    async def attempt() -> Any:
        try:
            return await client.submit(CHAT, model=MODEL, max_tokens=64)
        except QueueFull:
            counts["refused"] += 1
            raise

    await retrying(attempt, RetryPolicy(max_wait_s=3600), asyncio.sleep)
    counts["admitted"] += 1


async def storm(url: str, producers: int, rate_rps: float, bound_requests: int) -> dict[str, Any]:
    from producer import ChatClient
    from producer.contract.bounds import QueueBounds, write_bounds
    from producer.contract.enqueue import cost_tokens

    cost = cost_tokens([m["content"] for m in CHAT], 64)
    drain = Drain(url, rate_rps)
    await drain.redis.flushall()
    await write_bounds(drain.redis, drain.keys, QueueBounds(bound_requests * cost, 10**9, 256))
    stop = asyncio.Event()
    drainer = asyncio.create_task(drain.run(stop))
    clients = [ChatClient(url) for _ in range(8)]
    try:
        # Warm-up, never past the bound (no refusal, nothing promised): the drain rate is
        # measured over >= 1 s windows of a busy backlog (FINALIZE), as in a running service.
        warm_until, sent = time.monotonic() + 2.5, drain.done
        while time.monotonic() < warm_until:
            while sent - drain.done < bound_requests // 2:  # keep it busy, under the bound
                await clients[0].submit(CHAT, model=MODEL, max_tokens=64)
                sent += 1
            await asyncio.sleep(0.005)
        while drain.done < sent:
            await asyncio.sleep(0.01)
        counts = {"refused": 0, "admitted": 0}
        start_done, t0 = drain.done, time.monotonic()
        await asyncio.gather(*(_producer(clients[i % 8], counts) for i in range(producers)))
        while drain.done < start_done + producers:
            await asyncio.sleep(0.01)
        took_s = time.monotonic() - t0
        rate = float(await drain.redis.hget(drain.keys.backlog(MODEL), "rate") or 0) / cost
    finally:
        stop.set()
        await drainer
        for c in clients:
            await c.aclose()
        await drain.redis.aclose()
    return {
        "producers": producers,
        "admitted": counts["admitted"],
        "refused": counts["refused"],
        "refused_per_admitted": counts["refused"] / max(counts["admitted"], 1),
        "took_s": took_s,
        "ideal_s": producers / rate_rps,
        "measured_rps": rate,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--producers", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--rate", type=float, default=100.0, help="drain, requests/s")
    parser.add_argument("--bound-requests", type=int, default=10, help="bound, in requests")
    add_smoke_flag(parser, "20 producers")
    args = parse_args(parser, {"producers": [20], "rate": 50.0}, argv)
    from workers.redis_server import RedisServer

    rows = []
    with RedisServer() as server:
        for n in args.producers:
            rows.append(asyncio.run(storm(server.url, n, args.rate, args.bound_requests)))
    print(f"drain {args.rate:g} requests/s, bound {args.bound_requests} requests")
    print(
        "| producers | admitted | refused submits | refused per admitted | took s | "
        "at the set drain rate s | drain measured by FINALIZE, requests/s |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [
            r["producers"], r["admitted"], r["refused"], f"{r['refused_per_admitted']:.2f}",
            f"{r['took_s']:.1f}", f"{r['ideal_s']:.1f}", f"{r['measured_rps']:.0f}",
        ]  # fmt: skip
        print("| " + " | ".join(map(str, cells)) + " |")
    lost = [r for r in rows if r["admitted"] != r["producers"]]
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
