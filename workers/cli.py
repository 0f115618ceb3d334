"""``chatq``: run a worker, enqueue chats, show the queue's status, or run the demo.

    chatq worker --model PATH --redis URL [--name N] [--served-model-name NAME] [--device cpu]
    chatq enqueue --model NAME [--redis URL] "Where is my order?" ["another chat" ...]
    chatq enqueue --model NAME --file chats.jsonl
    chatq status [--redis URL] [--watch 1]
    chatq top [--redis URL] [--interval-s 1] [--once]
    chatq exporter [--redis URL] [--port 9400]
    chatq demo [--requests N] [--redis URL]
    chatq result ID [--stream]                         (a result by request id)
    chatq cancel ID --token TOKEN                      (cancel a queued or running request)
    chatq purge MODEL [--lane LANE]                    (drop a model's queued requests)
    chatq dead list | show ID | requeue ID | drop ID   (dead-lettered requests)
    chatq gateway [--workers N] [--allow-anonymous]    (the HTTP gateway; see gateway.cli)
    chatq keys create --tenant NAME [--rpm N] [--tpm N] [--max-concurrent N] | list | revoke ID
    chatq webhooks                                     (delivers callbacks)

Every option also reads ``CHATQ_<OPTION>`` from the environment (``CHATQ_REDIS_URL``...).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from gpu_engine.errors import EngineError
from producer.contract.keys import PRIORITIES
from producer.errors import ChatqError
from producer.settings import DEFAULT_REDIS_URL
from workers import admin_cli
from workers.errors import WorkerError
from workers.settings import LOG_FORMAT, WorkerSettings, add_worker_arguments


def _redis_default() -> str:
    return os.environ.get("CHATQ_REDIS_URL", DEFAULT_REDIS_URL)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


DEMO_MAX_TOKENS = 96


def add_redis_arguments(parser: argparse.ArgumentParser) -> None:
    """``--redis``, ``--prefix`` and ``--partitions``, from ``CHATQ_REDIS_URL`` /
    ``CHATQ_PREFIX`` / ``CHATQ_PARTITIONS`` by default."""
    parser.add_argument("--redis", default=_redis_default(), help="Redis URL (default "
                        f"$CHATQ_REDIS_URL or {DEFAULT_REDIS_URL})")  # fmt: skip
    parser.add_argument("--prefix", default=os.environ.get("CHATQ_PREFIX", "chatq"),
                        help="Redis key prefix (default chatq)")  # fmt: skip
    parser.add_argument("--partitions", type=int,
                        default=int(os.environ.get("CHATQ_PARTITIONS", "1")),
                        help="the queue's partitions (default $CHATQ_PARTITIONS or 1)")  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chatq", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--log-level",
        dest="root_log_level",  # `chatq gateway --log-level` is uvicorn's own (log_level)
        type=str.upper,
        choices=LOG_LEVELS,
        default=os.environ.get("CHATQ_LOG_LEVEL", "INFO").upper(),
        help="log level of every chatq process (default INFO; env CHATQ_LOG_LEVEL)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve one model from Redis on one device")
    add_worker_arguments(worker)

    _add_enqueue_command(sub)

    st = sub.add_parser("status", help="per model: queued, pending, backlog, dead, workers")
    add_redis_arguments(st)
    st.add_argument("--watch", type=float, help="refresh every N seconds")
    st.add_argument("--json", action="store_true", help="the models as a JSON list")

    top = sub.add_parser("top", help="live view per model and worker, from Redis alone")
    add_redis_arguments(top)
    top.add_argument("--interval-s", type=float, default=1.0, help="refresh period")
    top.add_argument("--once", action="store_true", help="print one frame (rates over one "
                     "interval) and exit")  # fmt: skip

    exp = sub.add_parser("exporter", help="serve the queue's Prometheus metrics from Redis")
    add_redis_arguments(exp)
    exp.add_argument("--port", type=int, default=int(os.environ.get("CHATQ_EXPORTER_PORT", 9400)),
                     help="HTTP port of /metrics (default 9400)")  # fmt: skip
    exp.add_argument("--interval-s", type=float, default=2.0, help="Redis poll period")

    demo = sub.add_parser("demo", help="private Redis + SmolLM2-135M worker + a burst of chats")
    demo.add_argument("--requests", type=int, default=16, help="chats in the burst (default 16)")
    demo.add_argument("--redis", help="use this Redis instead of starting a private one")
    demo.add_argument("--max-tokens", type=int, default=DEMO_MAX_TOKENS,
                      help=f"most tokens per answer (default {DEMO_MAX_TOKENS})")  # fmt: skip
    demo.add_argument("--model", default="smollm2", help="checkpoint directory or built-in "
                      "name (default smollm2: SmolLM2-135M-Instruct)")  # fmt: skip
    demo.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    demo.add_argument("--show", type=int, default=3, help="answers to print")
    admin_cli.add_commands(sub, add_redis_arguments)
    _add_gateway_commands(sub)
    return parser


def _add_enqueue_command(sub: Any) -> None:
    enq = sub.add_parser("enqueue", help="queue chats and print their results")
    enq.add_argument("chats", nargs="*", help="user messages, one chat each")
    enq.add_argument("--file", type=Path, help="JSONL: {messages: [...]} or {prompt: ...} a line")
    add_redis_arguments(enq)
    enq.add_argument("--model", required=True, help="served model name (e.g. smollm2)")
    enq.add_argument("--system", help="system prompt for chats given as arguments")
    enq.add_argument("--max-tokens", type=int, default=128, help="most tokens per answer "
                     "(default 128)")  # fmt: skip
    enq.add_argument(
        "--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)"
    )
    enq.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default 1.0)")
    enq.add_argument("--seed", type=int, help="sampling seed (default: random)")
    enq.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    enq.add_argument("--priority", choices=PRIORITIES, default="normal", help="lane "
                     "(default normal)")  # fmt: skip
    enq.add_argument("--deadline-s", type=float, help="drop the request if still queued after "
                     "this many seconds")  # fmt: skip
    enq.add_argument("--stream", action="store_true", help="print text as it is generated")
    enq.add_argument("--timeout-s", type=float, default=300.0, help="wait this long for each "
                     "result (default 300)")  # fmt: skip
    enq.add_argument("--allow-unserved", action="store_true", help="queue even if no live "
                     "worker serves the model (one may start later)")  # fmt: skip
    enq.add_argument("--no-wait", action="store_true", help="print request ids and exit "
                     "(with --json: each id and its cancel token)")  # fmt: skip
    enq.add_argument("--json", action="store_true", help="one JSON object per result")


def _add_gateway_commands(sub: Any) -> None:
    try:
        from gateway.cli import add_commands
    except ImportError:  # the gateway extra is not installed
        return
    add_commands(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.root_log_level not in LOG_LEVELS:  # from CHATQ_LOG_LEVEL: argparse checks options
        parser.error(f"CHATQ_LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    logging.basicConfig(
        level=getattr(logging, args.root_log_level),
        format=LOG_FORMAT,
    )
    try:
        if args.command in COMMAND_MODULES:
            _require_worker_extra(COMMAND_MODULES[args.command])
        if args.command == "worker":
            return _worker(args)
        if args.command == "enqueue":
            return asyncio.run(_enqueue(args))
        if args.command == "status":
            return asyncio.run(_status(args))
        if args.command == "top":
            return asyncio.run(_top(args))
        if args.command == "exporter":
            return asyncio.run(_exporter(args))
        if args.command in ("result", "cancel", "purge", "dead"):
            return asyncio.run(admin_cli.run(args))
        if args.command == "demo":
            from workers.demo import run_demo

            return asyncio.run(run_demo(args))
        from gateway.cli import run
        from gateway.errors import GatewayError

        try:
            code = run(args)
        except GatewayError as err:
            print(f"chatq {args.command}: {err}", file=sys.stderr)
            return 2
        return 2 if code is None else code
    except (ChatqError, WorkerError, EngineError) as err:
        print(f"chatq {args.command}: {err}", file=sys.stderr)
        return 2
    except RedisError as err:
        print(f"chatq {args.command}: Redis: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


# What `chatq worker` / `chatq demo` import beyond the producer: `pip install chatq` alone
# installs the producer, `enqueue` and `status`.
WORKER_EXTRA_MODULES = ("torch", "transformers", "safetensors", "numpy")
# Commands that need part of the worker extra: what each imports.
COMMAND_MODULES = {
    "worker": WORKER_EXTRA_MODULES,
    "demo": WORKER_EXTRA_MODULES,
    "top": ("rich",),
    "exporter": ("prometheus_client",),
}


def _require_worker_extra(modules: Sequence[str] = WORKER_EXTRA_MODULES) -> None:
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise WorkerError(
            f"needs the worker extra (missing: {', '.join(missing)}): pip install 'chatq[worker]'"
        )


def _worker(args: argparse.Namespace) -> int:
    from workers.model_source import check_model_dir, with_model_dir
    from workers.worker import Worker

    settings = with_model_dir(WorkerSettings.from_args(args))
    check_model_dir(settings)
    if args.gpus is not None:
        from workers.gpus import run_per_gpu

        return run_per_gpu(settings, args.gpus)
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
    allow = True if args.allow_unserved else None  # else the client's default (refuse)
    async with ChatClient(
        args.redis, prefix=args.prefix, allow_unserved=allow, partitions=args.partitions
    ) as client:
        ids = [await client.submit(**chat) for chat in chats]
        if args.no_wait:
            for rid in ids:
                print(json.dumps({"id": rid, "cancel_token": rid.cancel_token}) if args.json
                      else rid)  # fmt: skip
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
                print(admin_cli.result_json(res))
            else:
                print(res.text)
    return 1 if failures else 0


async def _status(args: argparse.Namespace) -> int:
    from producer.connection import connect
    from producer.contract.keys import Keys
    from workers.status import (
        live_workers,
        render_text,
        render_webhooks,
        status_report,
        webhook_status,
    )

    redis = connect(args.redis)
    try:
        while True:
            report = await status_report(redis, Keys(args.prefix, args.partitions))
            if args.json:
                print(json.dumps([_model_json(m) for m in report]))
            elif args.watch and sys.stdout.isatty():
                from rich.console import Console

                from workers.status import render_rich

                console = Console()
                console.clear()
                console.print(render_rich(report))
            else:
                print(
                    render_text(
                        report, await live_workers(redis, Keys(args.prefix, args.partitions))
                    )
                )
                hooks = render_webhooks(
                    await webhook_status(redis, Keys(args.prefix, args.partitions))
                )
                if hooks:
                    print(hooks)
            if not args.watch:
                return 0
            await asyncio.sleep(args.watch)
    finally:
        await redis.aclose()


async def _top(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from producer.connection import connect
    from producer.contract.keys import Keys
    from workers.top import Top, render

    if args.interval_s <= 0:
        raise WorkerError("--interval-s must be > 0")
    redis = connect(args.redis)
    top = Top(redis, Keys(args.prefix, args.partitions))
    try:
        if args.once:  # two reads, so the rates cover one interval
            await top.frame()
            await asyncio.sleep(args.interval_s)
            Console().print(render(await top.frame()))
            return 0
        with Live(render(await top.frame()), auto_refresh=False, screen=False) as live:
            while True:
                await asyncio.sleep(args.interval_s)
                live.update(render(await top.frame()), refresh=True)
    finally:
        await redis.aclose()


async def _exporter(args: argparse.Namespace) -> int:
    import signal

    from workers.exporter import QueueExporter

    if args.interval_s <= 0:
        raise WorkerError("--interval-s must be > 0")
    exporter = QueueExporter(args.redis, args.prefix, args.interval_s, args.partitions)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, exporter.stop)
    return await exporter.run(args.port)


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
