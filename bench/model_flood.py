"""Redis memory under a flood of made-up model names: the ceiling the bounds in Redis set.

A private Redis with the queue's bounds set in ``chatq:bounds:{q0}``; producers submit requests
for model names drawn from four times ``max_models`` made-up names (nothing serves them, so
nothing drains), until ENQUEUE refuses everything. Two shapes: the smallest request the
contract takes (one 1-character message, ``max_tokens`` 1: the most Redis bytes per queued
token) and a typical chat. Reported:
Redis ``used_memory`` over the empty server at saturation, per queued token, and the ceiling
it implies for the default bounds (``producer.contract.bounds.DEFAULT_BOUNDS``).

    .venv/bin/python bench/model_flood.py               # the table
    .venv/bin/python bench/model_flood.py --smoke       # tiny bounds (CI)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.smoke import add_smoke_flag, parse_args  # noqa: E402

SHAPES = {
    "smallest (1 char, max_tokens 1)": ("x", 1),
    "typical (300 chars, max_tokens 256)": ("Where is my parcel? " * 15, 256),
}
CONCURRENCY = 64


async def _used(redis: Any) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def flood(url: str, content: str, max_tokens: int, bounds: Any) -> dict[str, Any]:
    from producer import ChatClient, QueueFull
    from producer.contract.bounds import write_bounds

    client = ChatClient(url, allow_unserved=True)  # made-up names: nobody serves them
    redis = client.redis
    await redis.flushall()
    base = await _used(redis)
    await write_bounds(redis, client.keys, bounds)
    counts = {"admitted": 0, "refused": 0, "streak": 0}
    chat = [{"role": "user", "content": content}]
    # Four times as many names as may be queued at once: most are new, refused once the
    # model bound is reached; the ones in keep taking requests up to the total bound.
    names = [uuid.uuid4().hex[:12] for _ in range(4 * bounds.max_models)]

    async def producer() -> None:
        # Until 200 refusals in a row across the producers: nothing more gets in.
        while counts["streak"] < 200:
            try:
                model = f"flood-{names[random.randrange(len(names))]}"
                await client.submit(chat, model=model, max_tokens=max_tokens)
                counts["admitted"] += 1
                counts["streak"] = 0
            except QueueFull:
                counts["refused"] += 1
                counts["streak"] += 1

    try:
        await asyncio.gather(*(producer() for _ in range(CONCURRENCY)))
        totals = await redis.hgetall(client.keys.totals())
        queued = int(totals.get(b"tokens", 0))
        models = int(totals.get(b"models", 0))
        used = await _used(redis) - base
        keys = await redis.dbsize()
    finally:
        await client.aclose()
    return {"admitted": counts["admitted"], "refused": counts["refused"], "queued": queued,
            "models": models, "used": used, "keys": keys}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    from producer.contract.bounds import DEFAULT_BOUNDS, QueueBounds

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--total-tokens", type=int, default=400_000)
    parser.add_argument("--max-models", type=int, default=DEFAULT_BOUNDS.max_models)
    add_smoke_flag(parser, "tiny bounds")
    args = parse_args(parser, {"total_tokens": 3_000, "max_models": 16}, argv)
    from workers.redis_server import RedisServer

    bounds = QueueBounds(DEFAULT_BOUNDS.backlog_tokens, args.total_tokens, args.max_models)
    print(f"bounds: total_tokens {args.total_tokens:,}, max_models {args.max_models}")
    print("| request | admitted | refused | tokens queued | models queued | keys | "
          "used_memory over empty | bytes per token | at the defaults' 8 M tokens |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    bad = False
    with RedisServer() as server:
        for name, (content, max_tokens) in SHAPES.items():
            r = asyncio.run(flood(server.url, content, max_tokens, bounds))
            per_token = r["used"] / max(r["queued"], 1)
            ceiling_mb = per_token * DEFAULT_BOUNDS.total_tokens / 2**20
            print(f"| {name} | {r['admitted']:,} | {r['refused']:,} | {r['queued']:,} | "
                  f"{r['models']} | {r['keys']:,} | {r['used'] / 2**20:.1f} MiB | "
                  f"{per_token:.0f} | {ceiling_mb:,.0f} MiB |")  # fmt: skip
            cost = len(content.encode()) // 4 + 8 + max_tokens
            # The bounds held: never more than max_models models, nor the total past one
            # request (an empty total admits one larger than the bound).
            bad |= r["models"] > args.max_models or r["queued"] > args.total_tokens + cost
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
