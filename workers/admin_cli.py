"""The job commands of ``chatq``: fetch or cancel a result, purge a queue, manage dead letters.

chatq result ID [--stream] [--timeout-s 300] [--json]
chatq cancel ID --token TOKEN   (exit 0 cancelled, 1 already finished, 3 no such request)
chatq purge MODEL [--lane high|normal|low] [--yes]
chatq dead list [--count 20] | show ID | requeue ID | drop ID
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from producer.calls import ChatResult
from producer.contract.keys import PRIORITIES, Keys

# `chatq cancel`'s exit status for a request that had finished, and for an unknown id
# (1 and 2 are taken: "did not happen" and errors, as elsewhere in chatq).
EXIT_FINISHED, EXIT_UNKNOWN = 1, 3


def add_commands(sub: Any, add_redis_arguments: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``result``, ``cancel``, ``purge`` and ``dead`` on the ``chatq`` subparsers."""
    res = sub.add_parser("result", help="print a request's result (by the id enqueue printed)")
    res.add_argument("request_id", help="request id (chatq enqueue --no-wait prints them)")
    add_redis_arguments(res)
    res.add_argument("--stream", action="store_true", help="print text as it arrives")
    res.add_argument("--timeout-s", type=float, default=300.0, help="wait this long for "
                     "the result (default 300; 0: only if it is there now)")  # fmt: skip
    res.add_argument("--json", action="store_true", help="the result as one JSON object")

    can = sub.add_parser("cancel", help="cancel a queued or running request (exit 0 "
                         "cancelled, 1 already finished, 3 no such request)")  # fmt: skip
    can.add_argument("request_id", help="request id")
    can.add_argument("--token", required=True, help="the request's cancel token "
                     "(chatq enqueue --no-wait --json prints it)")  # fmt: skip
    add_redis_arguments(can)

    pur = sub.add_parser("purge", help="drop a model's queued requests (asks first)")
    pur.add_argument("model", help="served model name")
    add_redis_arguments(pur)
    pur.add_argument("--lane", choices=PRIORITIES, help="only this priority lane (default all)")
    pur.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    dead = sub.add_parser("dead", help="dead-lettered requests: list, show, requeue, drop")
    add_redis_arguments(dead)
    ops = dead.add_subparsers(dest="dead_command", required=True)
    lst = ops.add_parser("list", help="the newest dead letters")
    lst.add_argument("--count", type=int, default=20, help="how many (default 20)")
    lst.add_argument("--json", action="store_true", help="one JSON object a line")
    for name, what in (
        ("show", "one dead letter with its messages"),
        ("requeue", "queue it again (same request id; its error result is removed)"),
        ("drop", "delete it"),
    ):
        op = ops.add_parser(name, help=what)
        op.add_argument("id", help="dead-letter entry id or request id (chatq dead list)")


async def run(args: argparse.Namespace) -> int:
    from producer.connection import connect

    if args.command == "result":
        return await _result(args)
    if args.command == "cancel":
        return await _cancel(args)
    redis = connect(args.redis)
    try:
        if args.command == "purge":
            return await _purge(redis, Keys(args.prefix, args.partitions), args)
        return await _dead(redis, Keys(args.prefix, args.partitions), args)
    finally:
        await redis.aclose()


async def _result(args: argparse.Namespace) -> int:
    from producer.client import ChatClient
    from producer.errors import RequestFailed

    # A zero timeout still reads what is there (one non-blocking look).
    timeout_s = max(args.timeout_s, 0.001)
    async with ChatClient(args.redis, prefix=args.prefix, partitions=args.partitions) as client:
        try:
            if args.stream and not args.json:
                async for delta in client.stream(args.request_id, timeout_s=timeout_s):
                    print(delta, end="", flush=True)
                print()
                return 0
            res = await client.result(args.request_id, timeout_s=timeout_s)
        except RequestFailed as err:
            if args.json:
                print(json.dumps({"id": args.request_id, "error": err.code,
                                  "message": err.message}))  # fmt: skip
            else:
                print(f"[{args.request_id}] error {err.code}: {err.message}", file=sys.stderr)
            return 1
    if args.json:
        print(result_json(res))
    else:
        print(res.text)
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    from producer.client import ChatClient
    from producer.contract.cancel import CancelOutcome

    async with ChatClient(args.redis, prefix=args.prefix) as client:
        outcome = await client.cancel(args.request_id, args.token)
    if outcome is CancelOutcome.CANCELLED:
        print(f"cancelled {args.request_id}")
        return 0
    if outcome is CancelOutcome.FINISHED:
        print(f"{args.request_id} already has its final result: nothing to cancel",
              file=sys.stderr)  # fmt: skip
        return EXIT_FINISHED
    print(f"no request {args.request_id!r} (never queued, or its result has expired)",
          file=sys.stderr)  # fmt: skip
    return EXIT_UNKNOWN


async def _purge(redis: Any, keys: Keys, args: argparse.Namespace) -> int:
    from workers.purge import lane_counts, parse_lanes, purge

    lanes = parse_lanes(args.lane)
    counts = await lane_counts(redis, keys, args.model, lanes)
    queued = sum(c.queued for c in counts)
    pending = sum(c.pending for c in counts)
    if queued == 0:
        print(f"nothing queued for {args.model!r} ({pending} held by workers)")
        return 0
    where = ", ".join(f"{c.priority} {c.queued}" for c in counts if c.queued)
    if not args.yes:
        if not sys.stdin.isatty():
            print("chatq purge: not a terminal; pass --yes to purge", file=sys.stderr)
            return 2
        answer = input(f"drop {queued} queued requests of {args.model!r} ({where})? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing purged")
            return 1
    dropped = await purge(redis, keys, args.model, lanes)
    print(f"purged {dropped.requests} queued requests of {args.model!r}; their requesters "
          f"get a cancelled error ({pending} held by workers are left to them)")  # fmt: skip
    if dropped.strays:
        print(f"dropped {dropped.strays} entries added without ENQUEUE (not the entry their "
              "request id was reserved for): nobody was told")  # fmt: skip
    return 0


async def _dead(redis: Any, keys: Keys, args: argparse.Namespace) -> int:
    from workers.dead_letters import DeadLetters

    dead = DeadLetters(redis, keys)
    if args.dead_command == "list":
        if args.count <= 0:
            raise _error("--count must be positive")
        letters = await dead.newest(args.count)
        for d in letters:
            if args.json:
                print(json.dumps({k: v for k, v in d.describe().items()
                                  if k not in ("messages", "params")}))  # fmt: skip
            else:
                print(f"{d.entry_id}  {d.request_id or '-'}  {d.model}  {d.reason}  "
                      f"deliveries {d.deliveries}  worker {d.worker}")  # fmt: skip
        if not letters and not args.json:
            print("no dead letters")
        return 0
    if args.dead_command == "show":
        print(json.dumps((await dead.get(args.id)).describe(), indent=2, ensure_ascii=False))
        return 0
    if args.dead_command == "requeue":
        letter, entry = await dead.requeue(args.id)
        print(f"requeued {letter.request_id} on {letter.lane} (entry {entry})")
        return 0
    letter = await dead.drop(args.id)
    print(f"dropped dead letter {letter.entry_id} ({letter.request_id or 'unreadable'})")
    return 0


def _error(message: str) -> Exception:
    from workers.errors import WorkerError

    return WorkerError(message)


def result_json(res: ChatResult) -> str:
    """One finished chat as the JSON line `chatq result --json` and `chatq enqueue --json`
    print."""
    return json.dumps({
        "id": res.id, "text": res.text, "finish_reason": res.finish_reason,
        "prompt_tokens": res.usage.prompt_tokens,
        "completion_tokens": res.usage.completion_tokens, "worker": res.worker,
        "queued_ms": res.queued_ms, "first_token_ms": res.first_token_ms,
        "total_ms": res.total_ms,
    })  # fmt: skip
