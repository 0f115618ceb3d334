"""``python -m examples.support_bot``: the support bot in one command.

Without ``--gateway`` it starts what it needs on this machine: a private Redis, a worker on
the embedded SmolLM2-135M-Instruct (converted once from its GGUF), and a chatq gateway;
then it serves the chat page at ``http://HOST:PORT/``. With ``--gateway URL`` it only serves
the page, against that gateway (the compose service does this).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import uvicorn
from openai import AsyncOpenAI

from examples.support_bot.app import make_app
from examples.support_bot.bot import SupportBot
from examples.support_bot.shop import Shop
from workers.redis_server import RedisServer, free_port
from workers.settings import WorkerSettings
from workers.worker import Worker


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m examples.support_bot", description=__doc__)
    p.add_argument(
        "--gateway",
        default=os.environ.get("SUPPORT_BOT_GATEWAY"),
        help="a running chatq gateway (default: start one, with Redis and a worker)",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("SUPPORT_BOT_API_KEY", ""),
        help="the gateway's API key (with --gateway)",
    )
    p.add_argument("--model", default=os.environ.get("SUPPORT_BOT_MODEL", "smollm2"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--db", default=":memory:", help="SQLite file of the orders")
    p.add_argument("--device", default="cpu", help="the private worker's device")
    return p.parse_args(argv)  # fmt: skip


@contextlib.contextmanager
def gateway_process(redis_url: str) -> Iterator[tuple[str, str]]:
    """An API key for the bot (``chatq keys create``) and ``chatq gateway`` on a free port;
    (its URL, the key)."""
    chatq = [sys.executable, "-m", "workers.cli"]
    key = subprocess.run(
        [*chatq, "keys", "--redis", redis_url, "create", "--tenant", "support-bot"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [*chatq, "gateway", "--redis", redis_url, "--port", str(port)], start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the gateway exited ({proc.returncode})")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the gateway did not become ready")
            time.sleep(0.2)
        yield url, key
    finally:
        proc.terminate()
        proc.wait(15)


async def serve(args: argparse.Namespace, gateway_url: str, api_key: str) -> None:
    client = AsyncOpenAI(base_url=gateway_url + "/v1", api_key=api_key)
    shop = Shop(args.db)
    app = make_app(SupportBot(client, args.model, shop))
    server = uvicorn.Server(
        uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    )
    print(f"support bot: http://{args.host}:{args.port}/  (gateway {gateway_url})", flush=True)
    try:
        await server.serve()
    finally:
        shop.close()
        await client.close()


async def standalone(args: argparse.Namespace) -> None:
    """Redis, a worker on the embedded model and a gateway, then the bot."""
    from gpu_engine.gguf import default_model_path

    with RedisServer() as redis:
        print("preparing SmolLM2-135M-Instruct (converted once, then cached)...", flush=True)
        model_path = await asyncio.to_thread(default_model_path)
        worker = Worker(
            WorkerSettings(
                model_path=str(model_path), redis_url=redis.url, served_model_name=args.model,
                device=args.device, max_num_seqs=8, kv_cache_tokens=16384,
                name="support-bot-worker",
            )
        )  # fmt: skip
        task = asyncio.create_task(worker.run(install_signals=False))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            raise SystemExit(f"the worker failed: {task.exception()!r}")
        try:
            with gateway_process(redis.url) as (url, key):
                await serve(args, url, key)
        finally:
            worker.stop()
            await task


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        if args.gateway:
            asyncio.run(serve(args, args.gateway, args.api_key))
        else:
            asyncio.run(standalone(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
