"""The latency the queue adds at calm while the worker's aggregator is busy (issue 6, locally).

The spike's calm phase on the GPU: ~48 requests/s arrive, each a ~1,000-token shared system
prompt plus a user turn of 20-200 tokens, answers of 50-400 tokens, so ~130 sequences run
and the same worker host process aggregates ~10k output tokens/s. This reproduces that
shape on the CPU with ``chatq worker`` and ``testkit.zero_cost_engine`` paced to
``--step-ms`` per step (one token per running sequence a step, like a decode step), and
reports ``Timings.queued_ms`` (created → handed to the engine) of every request after
``--warmup-s``.

``--baseline-repo DIR`` (a checkout of older code, e.g. ``git archive <commit> | tar -x -C
DIR``) runs the same load against that code's worker too, so the two distributions come
from one run on the same machine: one side after the other, ``--rounds`` times, the order
flipped every round (``--together``: both at once, each with its own Redis). The current
``testkit/`` (the zero-cost engine) is copied into DIR first (the benchmark tool must be the
same on both sides).

    .venv/bin/python bench/queue_busy_latency.py --baseline-repo /tmp/chatq-base
    .venv/bin/python bench/queue_busy_latency.py --smoke    # 2 s of arrivals, one round
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "zero"
SMOKE: dict[str, Any] = dict(rate=20.0, seconds=2.0, warmup_s=0.5, system_tokens=100, rounds=1)
_POLICY = (
    "orders ship within two business days refunds go back to the original payment method "
    "customers may change the delivery address until the parcel leaves our warehouse "
    "passwords are reset from the login page never ask for a card number in chat "
)
WORDS = tuple(_POLICY.split())


def system_prompt(tokenizer: Any, tokens: int) -> str:
    """Policy-like text of about ``tokens`` tokens with the worker's tokenizer."""
    rng = random.Random(7)
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words), add_special_tokens=False)) < tokens:
        words += rng.choices(WORDS, k=50)
    return "You are the shop's assistant. " + " ".join(words)


async def load(url: str, system: str, args: argparse.Namespace) -> list[tuple[float, float]]:
    """Poisson arrivals at ``--rate`` for ``--seconds``; (arrival offset s, queued_ms) each."""
    from producer.client import ChatClient

    rng = random.Random(11)
    out: list[tuple[float, float]] = []
    async with ChatClient(url, allow_unserved=True) as client:

        async def one(i: int, offset_s: float) -> None:
            user = " ".join(rng.choices(WORDS, k=rng.randint(10, 100)))
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"Order #{i}: {user}?"},
            ]
            rid = await client.submit(
                messages, model=MODEL, max_tokens=rng.randint(50, 400), ignore_eos=True
            )
            res = await client.result(rid, timeout_s=120)
            out.append((offset_s, res.queued_ms))

        t0 = time.monotonic()
        tasks = []
        next_s = 0.0
        i = 0
        while next_s < args.seconds:
            await asyncio.sleep(max(0.0, t0 + next_s - time.monotonic()))
            tasks.append(asyncio.create_task(one(i, next_s)))
            i += 1
            next_s += rng.expovariate(args.rate)
        await asyncio.gather(*tasks)
    return out


def _spawn_worker(repo: Path, url: str, tok_dir: Path, step_s: float, log: Path) -> Any:
    cmd = [
        sys.executable, "-m", "workers.cli", "--log-level", "WARNING", "worker",
        "--model", str(tok_dir), "--served-model-name", MODEL, "--redis", url,
        "--name", "busy-worker", "--max-num-seqs", "256",
        "--engine-factory", "testkit.zero_cost_engine:ZeroCostEngine.from_options",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CHATQ_ZERO_COST_STEP_S": str(step_s)}
    return subprocess.Popen(cmd, cwd=repo, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


async def _sides_at_once(urls: list[str], system: str, args: argparse.Namespace) -> list[Any]:
    return list(await asyncio.gather(*(load(url, system, args) for url in urls)))


def one_round(
    repos: list[Path], tok_dir: Path, system: str, args: argparse.Namespace
) -> list[list[float]]:
    """Every side at once (own Redis, own worker, same load): the machine's slow and fast
    moments hit both sides alike."""
    from bench.procs import stop
    from bench.queue_throughput import _wait_heartbeat
    from workers.redis_server import RedisServer

    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(RedisServer()).url for _ in repos]
        workers = []
        for i, (repo, url) in enumerate(zip(repos, urls, strict=True)):
            log = tok_dir.parent / f"worker-{i}.log"
            workers.append(_spawn_worker(repo, url, tok_dir, args.step_ms / 1000, log))
            stack.callback(stop, workers[-1])
        for url, w in zip(urls, workers, strict=True):
            asyncio.run(_wait_heartbeat(url, "busy-worker", w))
        per_side = asyncio.run(_sides_at_once(urls, system, args))
    return [[q for offset_s, q in samples if offset_s >= args.warmup_s] for samples in per_side]


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def main() -> int:
    from bench import smoke

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--baseline-repo", type=Path, help="older checkout to compare against")
    p.add_argument("--rate", type=float, default=48.0, help="arrivals per second")
    p.add_argument("--seconds", type=float, default=20.0, help="arrivals per side and round")
    p.add_argument("--warmup-s", type=float, default=6.0, help="arrivals before this not counted")
    p.add_argument("--step-ms", type=float, default=13.0, help="zero-cost engine step time")
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument(
        "--together",
        action="store_true",
        help="run the sides at the same time (same noise; on 2 cores it overloads the machine)",
    )
    smoke.add_smoke_flag(p, f"a short load, {SMOKE}")
    args = smoke.parse_args(p, SMOKE, None)
    from testkit.checkpoints import build_tokenizer

    sides: list[tuple[str, Path]] = [("current", REPO)]
    if args.baseline_repo is not None:
        base = args.baseline_repo.resolve()
        shutil.copytree(REPO / "testkit", base / "testkit", dirs_exist_ok=True)
        sides.insert(0, ("baseline", base))
    got: dict[str, list[float]] = {name: [] for name, _ in sides}
    with tempfile.TemporaryDirectory(prefix="chatq-busy-") as tmp:
        tok_dir = Path(tmp) / "tokenizer"
        system = system_prompt(build_tokenizer(tok_dir), args.system_tokens)
        print(f"system prompt: {len(system)} characters", file=sys.stderr)
        for r in range(args.rounds):
            repos = [repo for _, repo in sides]
            if args.together:
                per_side = one_round(repos, tok_dir, system, args)
            else:  # one after the other, the order flipped every round
                order = repos if r % 2 == 0 else repos[::-1]
                got_now = {repo: one_round([repo], tok_dir, system, args)[0] for repo in order}
                per_side = [got_now[repo] for repo in repos]
            for (name, _), xs in zip(sides, per_side, strict=True):
                got[name] += xs
            print(f"round {r + 1}: {[len(x) for x in got.values()]} samples", file=sys.stderr)
    print("| worker code | requests | queued_ms p50 | p90 | p99 | mean |")
    print("|---|---|---|---|---|---|")
    for name, xs in got.items():
        print(
            f"| {name} | {len(xs)} | {pct(xs, 0.5):.2f} | {pct(xs, 0.9):.2f} | "
            f"{pct(xs, 0.99):.2f} | {statistics.fmean(xs):.2f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
