"""``chatq``: run a worker, enqueue chats, show the queue's status, or run the demo.

    chatq worker --model PATH --redis URL [--name N] [--served-model-name NAME] [--device cpu]
    chatq enqueue --model NAME [--redis URL] "Where is my order?" ["another chat" ...]
    chatq enqueue --model NAME --file chats.jsonl
    chatq status [--redis URL] [--watch 1]
    chatq demo [--requests N] [--redis URL]

Every option also reads ``CHATQ_<OPTION>`` from the environment (``CHATQ_REDIS_URL``...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from gpu_engine.errors import EngineError
from producer.errors import ChatqError
from producer.settings import DEFAULT_REDIS_URL
from workers.errors import WorkerError
from workers.settings import LOG_FORMAT, WorkerSettings, add_worker_arguments


def _redis_default() -> str:
    return os.environ.get("CHATQ_REDIS_URL", DEFAULT_REDIS_URL)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatq", description=__doc__.split("\n")[0])
    parser.add_argument("--log-level", default=os.environ.get("CHATQ_LOG_LEVEL", "INFO"))
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve one model from Redis on one device")
    add_worker_arguments(worker)

    enq = sub.add_parser("enqueue", help="queue chats and print their results")
    enq.add_argument("chats", nargs="*", help="user messages, one chat each")
    enq.add_argument("--file", type=Path, help="JSONL: {messages: [...]} or {prompt: ...} a line")
    enq.add_argument("--redis", default=_redis_default())
    enq.add_argument("--prefix", default=os.environ.get("CHATQ_PREFIX", "chatq"))
    enq.add_argument("--model", required=True, help="served model name")
    enq.add_argument("--system", help="system prompt for chats given as arguments")
    enq.add_argument("--max-tokens", type=int, default=128)
    enq.add_argument("--temperature", type=float, default=0.7)
    enq.add_argument("--top-p", type=float, default=1.0)
    enq.add_argument("--seed", type=int)
    enq.add_argument("--stop", action="append", default=[])
    enq.add_argument("--priority", choices=("high", "normal", "low"), default="normal")
    enq.add_argument("--deadline-s", type=float)
    enq.add_argument("--stream", action="store_true", help="print text as it is generated")
    enq.add_argument("--timeout-s", type=float, default=300.0)
    enq.add_argument("--no-wait", action="store_true", help="print request ids and exit")
    enq.add_argument("--json", action="store_true", help="one JSON object per result")

    st = sub.add_parser("status", help="per model: queued, pending, backlog, dead, workers")
    st.add_argument("--redis", default=_redis_default())
    st.add_argument("--prefix", default=os.environ.get("CHATQ_PREFIX", "chatq"))
    st.add_argument("--watch", type=float, help="refresh every N seconds")
    st.add_argument("--json", action="store_true")

    demo = sub.add_parser("demo", help="private Redis + SmolLM2-135M worker + a burst of chats")
    demo.add_argument("--requests", type=int, default=24)
    demo.add_argument("--redis", help="use this Redis instead of starting a private one")
    demo.add_argument("--max-tokens", type=int, default=48)
    demo.add_argument("--model", help="HF model dir (default: SmolLM2-135M-Instruct from GGUF)")
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--show", type=int, default=3, help="answers to print")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format=LOG_FORMAT,
    )
    try:
        if args.command == "worker":
            return _worker(args)
        if args.command == "enqueue":
            return asyncio.run(_enqueue(args))
        if args.command == "status":
            return asyncio.run(_status(args))
        if args.command == "demo":
            from workers.demo import run_demo

            return asyncio.run(run_demo(args))
    except (ChatqError, WorkerError, EngineError) as err:
        print(f"chatq {args.command}: {err}", file=sys.stderr)
        return 2
    except RedisError as err:
        print(f"chatq {args.command}: Redis: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _worker(args: argparse.Namespace) -> int:
    from workers.worker import Worker

    settings = WorkerSettings.from_args(args)
    if args.gpus is not None:
        from workers.gpus import run_per_gpu

        return run_per_gpu(settings, args.gpus)
    if not settings.model_path:
        raise WorkerError("--model PATH (or CHATQ_MODEL_PATH) is required")
    return asyncio.run(Worker(settings).run())


def _chats(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Chats as submit() keyword dicts, from arguments and/or the JSONL file."""
    base: dict[str, Any] = {
        "model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature,
        "top_p": args.top_p, "seed": args.seed, "stop": tuple(args.stop),
        "priority": args.priority, "deadline_s": args.deadline_s, "stream": args.stream,
    }  # fmt: skip
    chats: list[dict[str, Any]] = []
    for text in args.chats:
        messages = [{"role": "system", "content": args.system}] if args.system else []
        chats.append({**base, "messages": [*messages, {"role": "user", "content": text}]})
    if args.file is not None:
        for n, line in enumerate(args.file.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise WorkerError(f"{args.file}:{n}: not JSON ({err})") from err
            if not isinstance(obj, dict):
                raise WorkerError(f"{args.file}:{n}: expected an object")
            if "prompt" in obj:
                obj["messages"] = [{"role": "user", "content": str(obj.pop("prompt"))}]
            chats.append({**base, **obj})
    if not chats:
        raise WorkerError("nothing to enqueue: give chats as arguments or --file")
    return chats


async def _enqueue(args: argparse.Namespace) -> int:
    from producer.client import ChatClient
    from producer.errors import RequestFailed

    chats = _chats(args)
    failures = 0
    async with ChatClient(args.redis, prefix=args.prefix) as client:
        ids = [await client.submit(**chat) for chat in chats]
        if args.no_wait:
            for rid in ids:
                print(rid)
            return 0
        for rid, chat in zip(ids, chats, strict=True):
            try:
                if chat.get("stream") and not args.json:
                    async for delta in client.stream(rid, timeout_s=args.timeout_s):
                        print(delta, end="", flush=True)
                    print()
                    continue
                res = await client.result(rid, timeout_s=args.timeout_s)
            except RequestFailed as err:
                failures += 1
                if args.json:
                    print(json.dumps({"id": rid, "error": err.code, "message": err.message}))
                else:
                    print(f"[{rid}] error {err.code}: {err.message}", file=sys.stderr)
                continue
            if args.json:
                print(json.dumps({
                    "id": rid, "text": res.text, "finish_reason": res.finish_reason,
                    "prompt_tokens": res.usage.prompt_tokens,
                    "completion_tokens": res.usage.completion_tokens, "worker": res.worker,
                    "queued_ms": res.queued_ms, "first_token_ms": res.first_token_ms,
                    "total_ms": res.total_ms,
                }))  # fmt: skip
            else:
                print(res.text)
    return 1 if failures else 0


async def _status(args: argparse.Namespace) -> int:
    from redis.asyncio import Redis

    from producer.keys import Keys
    from workers.status import render_text, status_report

    redis = Redis.from_url(args.redis)
    try:
        while True:
            report = await status_report(redis, Keys(args.prefix))
            if args.json:
                print(json.dumps([_model_json(m) for m in report]))
            elif args.watch and sys.stdout.isatty():
                from rich.console import Console

                from workers.status import render_rich

                console = Console()
                console.clear()
                console.print(render_rich(report))
            else:
                print(render_text(report))
            if not args.watch:
                return 0
            await asyncio.sleep(args.watch)
    finally:
        await redis.aclose()


def _model_json(m: Any) -> dict[str, Any]:
    return {
        "model": m.model, "queued": m.queued_requests, "pending": m.pending,
        "lanes": {lane.priority: {"queued": lane.queued, "pending": lane.pending}
                  for lane in m.lanes},
        "backlog_tokens": m.backlog_tokens, "drain_rate_tps": m.drain_rate_tps,
        "dead_letters": m.dead_letters, "workers": [w.name for w in m.workers],
    }  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
