"""ENQUEUE's Redis CPU per request, and how much of it is reading the envelope.

ENQUEUE computes each request's backlog cost from its envelope (``cmsgpack.unpack`` inside
the script), so no producer computes it. This measures, on a private Redis, the Redis main
thread's CPU time per request (``INFO cpu``, so a busy machine preempting Redis does not
count) of ENQUEUE calls of 1 and of 100 requests, for chats of three sizes, next to
``cmsgpack.unpack`` of the same envelopes alone (a script that only unpacks them, less one
that only touches them): the part the cost computation adds.

    .venv/bin/python bench/enqueue_cost.py            # a table
    .venv/bin/python bench/enqueue_cost.py --smoke    # tiny counts (CI)
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SIZES = {"chat (~60 chars)": 60, "4 KB prompt": 4_000, "64 KB prompt": 64_000}
WORDS = [
    "order",
    "refund",
    "parcel",
    "delivery",
    "invoice",
    "address",
    "return",
    "courier",
    "week",
    "late",
    "box",
]
UNPACK_ALL = "for i = 1, #ARGV do cmsgpack.unpack(ARGV[i]) end return #ARGV"
TOUCH_ALL = "local n = 0 for i = 1, #ARGV do n = n + #ARGV[i] end return n"


def _text(i: int, chars: int) -> str:
    """``chars`` characters of words that differ from request to request throughout (Lua
    interns strings by a sampled hash: contents alike but for a few characters collide)."""
    rng = random.Random(i)
    words = [rng.choice(WORDS) for _ in range(chars // 5 + 1)]
    return " ".join(words)[:chars]


def _envelopes(n: int, chars: int) -> list[tuple[object, bytes]]:
    from producer.contract.codec import encode_envelope, make_envelope

    out = []
    for i in range(n):
        messages = [
            {"role": "system", "content": "You are a helpful assistant for an online shop."},
            {"role": "user", "content": f"Order #{10_000 + i}: " + _text(i, chars)},
        ]
        env = make_envelope(messages, model="bench", max_tokens=1)
        out.append((env, encode_envelope(env)))
    return out


def _cpu_us(redis: object) -> float:
    """The Redis main thread's CPU time so far, in µs."""
    cpu = redis.info("cpu")  # type: ignore[attr-defined]
    return float(cpu["used_cpu_user_main_thread"] + cpu["used_cpu_sys_main_thread"]) * 1e6


def measure(url: str, requests: int, repeats: int) -> list[tuple[str, int, float, float]]:
    """Per (size, requests per call): best-of-``repeats`` ENQUEUE and unpack CPU µs/request."""
    import redis as redis_py

    from producer.contract.enqueue import enqueue_call
    from producer.contract.keys import Keys
    from producer.contract.scripts import ENQUEUE

    r = redis_py.Redis.from_url(url)
    enqueue, unpack = r.register_script(ENQUEUE), r.register_script(UNPACK_ALL)
    touch = r.register_script(TOUCH_ALL)
    keys = Keys("bench")
    rows = []
    for label, chars in SIZES.items():
        for batch in (1, 100):
            best_enqueue = best_unpack = float("inf")
            for _ in range(repeats):
                encoded = _envelopes(max(requests, batch), chars)
                calls = [encoded[i : i + batch] for i in range(0, len(encoded), batch)]
                r.flushall()
                laid_out = [
                    enqueue_call(keys, 10**15, part, each=batch == 1, allow_unserved=True)
                    for part in calls
                ]
                # loaded before the clock (a call of no requests)
                empty = [0, 0, 1, "each", "bench", "{q0}", 0, 1]
                enqueue(keys=[keys.models(), keys.totals()], args=empty)
                start = _cpu_us(r)
                for call in laid_out:
                    enqueue(keys=call.keys, args=call.args)
                best_enqueue = min(best_enqueue, (_cpu_us(r) - start) / len(encoded))
                payloads = [[payload for _, payload in part] for part in calls]
                unpack(keys=[], args=[b"\x90"])
                touch(keys=[], args=[b"\x90"])
                start = _cpu_us(r)
                for args in payloads:
                    unpack(keys=[], args=args)
                middle = _cpu_us(r)
                for args in payloads:
                    touch(keys=[], args=args)
                unpack_us = (2 * middle - start - _cpu_us(r)) / len(encoded)
                best_unpack = min(best_unpack, unpack_us)
            rows.append((label, batch, best_enqueue, best_unpack))
    r.close()
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis", help="Redis URL (default: a private server)")
    p.add_argument("--requests", type=int, default=2000, help="requests per measurement")
    p.add_argument("--repeats", type=int, default=3, help="keep the best of N")
    p.add_argument("--smoke", action="store_true", help="tiny counts, seconds (CI)")
    args = p.parse_args()
    requests, repeats = (100, 1) if args.smoke else (args.requests, args.repeats)
    if args.redis:
        rows = measure(args.redis, requests, repeats)
    else:
        from workers.redis_server import RedisServer

        with RedisServer() as server:
            rows = measure(server.url, requests, repeats)
    print("| envelope | requests per call | ENQUEUE Redis CPU µs/request | of which unpack µs |")
    print("|---|---|---|---|")
    for label, batch, enqueue_us, unpack_us in rows:
        print(f"| {label} | {batch} | {enqueue_us:.2f} | {unpack_us:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
