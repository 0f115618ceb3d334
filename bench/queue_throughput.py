"""The queue layer alone: chatq (producer → Redis → worker → result) next to arq.

chatq's worker runs unchanged (``chatq worker`` subprocess: intake, engine process and IPC,
aggregator, FINALIZE) except that its engine is ``testkit.zero_cost_engine.ZeroCostEngine``, a
benchmark tool that answers every request at once, so what is measured is the queue path.
arq runs a no-op job on the same Redis (its own worker subprocess, msgpack serializer hooks,
no pickle).

Every request is a shared system prompt plus a user turn of its own (``messages(i)``), the
same chats for both systems. Measurements:

- end to end: ``--requests`` chats submitted while the worker runs, clock from the first
  submit to the last completion (detected the same way for every row: a pipelined EXISTS
  on the result keys every 2 ms). chatq twice: ``ChatClient.submit`` with
  ``--concurrency`` calls in flight, and ``ChatClient.submit_many`` with ``--batch``
  requests per call and ``--batches-in-flight`` calls at once. arq: ``enqueue_job`` with
  ``--concurrency`` calls in flight (arq has no bulk enqueue);
- drain a full queue: the queue is filled first with no worker running (chatq:
  ``submit_many``; arq: ``enqueue_job``), then the worker starts; first → last result;
- added latency: ``--latency-requests`` chats one at a time, submit → result received, on an
  idle worker (the engine costs nothing, so all of it is queue).

- ``--host-processes 1,2`` runs the chatq rows once per count of worker host processes
  (``chatq worker --host-processes K``: K host processes sharing the one engine process);
  ``--arq-workers 1,2`` runs the arq rows once per count of arq worker processes on the
  same queue (so a chatq worker using K host cores can also be read against arq with K
  worker processes); ``--producers P`` submits the end-to-end rows from P producer
  processes (both systems), so that one producer process is not what is measured.

- ``--masters 1,3``: the chatq rows again on a local Redis Cluster of each count of masters
  (``testkit.cluster``; arq has no cluster support), the queue split into ``--partitions``
  partitions in every run (same keys, same work; only where the slots live differs), side
  by side with the ratio of each row. ``--cluster-only`` skips the single-Redis rows.

- ``--baseline-repo DIR`` (older code, e.g. ``git archive <commit> | tar -x -C DIR``): the
  chatq rows run a second time with that checkout's worker (same producer, same Redis),
  labelled ``chatq@baseline``, before the current code's rows in each repeat.

    .venv/bin/python bench/queue_throughput.py                       # private Redis
    .venv/bin/python bench/queue_throughput.py --redis redis://...   # an existing one
    .venv/bin/python bench/queue_throughput.py --smoke     # every row on 100 requests
    .venv/bin/python bench/queue_throughput.py --cluster-only --masters 1,3  # 1 vs 3 masters
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procs import spawn, stop  # noqa: E402

MODEL = "zero"
SMOKE: dict[str, Any] = dict(
    requests=100, latency_requests=10, concurrency=16, batch=20, batches_in_flight=2,
    max_num_seqs=64, arq_max_jobs=64, masters=[1, 3],
)  # fmt: skip
SYSTEM = "You are a helpful assistant for an online shop."


def messages(i: int) -> list[dict[str, str]]:
    """Request ``i``'s chat: a shared system prompt and a user turn of its own (both systems
    get the same ones)."""
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"Where is my order #{10_000 + i}? It has not arrived yet."},
    ]


ARQ_QUEUE = "bench:arq"
PRODUCER_SETTLE_S = 3.0  # producer processes import, connect and warm up before the clock


# --- arq side ---------------------------------------------------------------------------------


async def noop(ctx: dict[str, Any], messages: Any) -> str:
    return "ok"


def _arq_settings(url: str) -> Any:
    from arq.connections import RedisSettings

    return RedisSettings.from_dsn(url)


def _packb(obj: Any) -> bytes:
    import msgpack

    packed: bytes = msgpack.packb(obj, use_bin_type=True, datetime=True)
    return packed


def _unpackb(data: bytes) -> Any:
    import msgpack

    return msgpack.unpackb(data, raw=False, timestamp=3)


def run_arq_worker(url: str, max_jobs: int, poll_delay_s: float) -> None:
    from arq.worker import Worker, func

    worker = Worker(
        functions=[func(noop, name="noop")], redis_settings=_arq_settings(url),
        queue_name=ARQ_QUEUE, job_serializer=_packb, job_deserializer=_unpackb,
        max_jobs=max_jobs, poll_delay=poll_delay_s, keep_result=3600, log_results=False,
        handle_signals=True,
    )  # fmt: skip
    worker.run()


# --- measuring --------------------------------------------------------------------------------


@dataclass
class Row:
    system: str
    mode: str
    requests: int
    seconds: float
    latencies_ms: list[float]
    procs: int = 1  # chatq: worker host processes; arq: worker processes

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))] if xs else float("nan")


T = TypeVar("T")


async def _bounded(n: int, concurrency: int, one: Callable[[int], Awaitable[T]]) -> list[T]:
    sem = asyncio.Semaphore(concurrency)
    out: list[Any] = [None] * n

    async def run(i: int) -> None:
        async with sem:
            out[i] = await one(i)

    await asyncio.gather(*(run(i) for i in range(n)))
    return out


async def _all_exist(redis: Any, keys: list[str], poll_s: float = 0.002) -> float:
    """Wait until every key exists; returns when the first one appeared (perf_counter).

    Both systems serve roughly in order, so poll the first and the last key (one EXISTS per
    poll, cheap for the machine under test), then sweep the rest."""
    while not await redis.exists(keys[0]):
        await asyncio.sleep(poll_s)
    first_s = time.perf_counter()
    while not await redis.exists(keys[-1]):
        await asyncio.sleep(poll_s)
    left = list(keys)
    while left:
        pipe = redis.pipeline(transaction=False)
        for k in left:
            pipe.exists(k)
        flags = await pipe.execute()
        left = [k for k, f in zip(left, flags, strict=True) if not f]
        if left:
            await asyncio.sleep(poll_s)
    return first_s


def _produce(url: str, system: str, mode: str, first: int, n: int, args: Any, go: Any,
             out: Any) -> None:  # fmt: skip
    """One producer process: connect and warm up, wait for ``go``, submit chats
    ``first .. first + n - 1``; put their ids (chatq) or result keys (arq) on ``out``."""
    out.put(asyncio.run(_produce_async(url, system, mode, first, n, args, go)))


async def _produce_async(url: str, system: str, mode: str, first: int, n: int, args: Any,
                         go: Any) -> list[str]:  # fmt: skip
    loop = asyncio.get_running_loop()
    if system == "arq":
        return await arq_enqueue(url, first, n, args.concurrency, go)
    from producer.client import ChatClient

    async with ChatClient(url, allow_unserved=True, partitions=args.partitions) as client:
        await client.submit(messages(first - 1), model=MODEL, max_tokens=1)  # connections up
        await loop.run_in_executor(None, go.wait)
        if mode == "submit":
            return await _bounded(
                n,
                args.concurrency,
                lambda i: client.submit(messages(first + i), model=MODEL, max_tokens=1),
            )
        starts = list(range(0, n, args.batch))

        async def one(b: int) -> list[str]:
            chats = [messages(first + starts[b] + i)
                     for i in range(min(args.batch, n - starts[b]))]  # fmt: skip
            return await client.submit_many(chats, model=MODEL, max_tokens=1)

        parts = await _bounded(len(starts), args.batches_in_flight, one)
        return [rid for part in parts for rid in part]


async def end_to_end(url: str, system: str, mode: str, first: int, args: Any) -> Row:
    """``args.requests`` chats from ``args.producers`` producer processes (started, connected
    and warmed up before the clock starts) while the worker runs; the clock runs from the go
    signal to the last result. chatq: every 50th answer is checked (one token, ``length``)."""
    ctx = mp.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    n, p = args.requests, args.producers
    shares = [n // p + (k < n % p) for k in range(p)]
    firsts = [first + sum(shares[:k]) for k in range(p)]
    procs = [ctx.Process(target=_produce, args=(url, system, mode, f, c, args, go, out))
             for f, c in zip(firsts, shares, strict=True)]  # fmt: skip
    for proc in procs:
        proc.start()
    await asyncio.sleep(PRODUCER_SETTLE_S)  # imports, connections, warm-up
    t0 = time.perf_counter()
    go.set()
    loop = asyncio.get_running_loop()
    got: list[str] = []
    for _ in procs:
        got += await loop.run_in_executor(None, out.get)
    for proc in procs:
        proc.join()
    from producer.connection import connect
    from producer.contract.keys import Keys

    names = Keys(partitions=args.partitions)
    keys = got if system == "arq" else [names.final(rid) for rid in got]
    redis = connect(url)
    try:
        await _all_exist(redis, keys)
    finally:
        await redis.aclose()
    seconds = time.perf_counter() - t0
    if system == "chatq":
        from producer.client import ChatClient

        async with ChatClient(url, allow_unserved=True, partitions=args.partitions) as client:
            results = await client.results_many(got[:: max(1, n // 50)], timeout_s=10)
        assert all(r.usage.completion_tokens == 1 and r.finish_reason == "length" for r in results)
    label = f"chatq ({mode})" if system == "chatq" else "arq (no-op job)"
    return Row(label, "end to end", n, seconds, [])


async def chatq_latency(url: str, n_lat: int, first: int, partitions: int = 1) -> list[float]:
    """``n_lat`` chats one at a time (``ChatClient.chat``) on an idle worker: submit → result."""
    from producer.client import ChatClient

    latencies = []
    async with ChatClient(url, allow_unserved=True, partitions=partitions) as client:
        await client.chat(messages(first - 1), model=MODEL, max_tokens=1, timeout_s=60)
        for i in range(n_lat):
            t = time.perf_counter()
            res = await client.chat(messages(first + i), model=MODEL, max_tokens=1, timeout_s=10)
            latencies.append((time.perf_counter() - t) * 1000)
            assert res.usage.completion_tokens == 1
    return latencies


async def chatq_fill(url: str, n: int, partitions: int = 1) -> list[str]:
    """Queue ``n`` requests (``submit_many``, 500 a call, no worker running); their final
    keys."""
    from producer.client import ChatClient

    async with ChatClient(url, allow_unserved=True, partitions=partitions) as client:
        ids: list[str] = []
        for start in range(0, n, 500):
            chats = [messages(3 * n + i) for i in range(start, min(n, start + 500))]
            ids += await client.submit_many(chats, model=MODEL, max_tokens=1)
        return [client.keys.final(rid) for rid in ids]


async def _arq_result(job: Any, poll_delay_s: float) -> Any:
    """Poll like ``Job.result(poll_delay=...)``; arq 0.25's own ``result()`` raises
    ResultNotFound when it looks while the job is running (neither queued nor finished)."""
    while True:
        info = await job.result_info()
        if info is not None:
            return info
        await asyncio.sleep(poll_delay_s)


async def _arq_pool(url: str) -> Any:
    from arq.connections import create_pool

    return await create_pool(
        _arq_settings(url),
        job_serializer=_packb,
        job_deserializer=_unpackb,
        default_queue_name=ARQ_QUEUE,
    )


async def arq_latency(url: str, n_lat: int, first: int, poll_delay_s: float) -> list[float]:
    """``n_lat`` no-op jobs one at a time: enqueue → result."""
    pool = await _arq_pool(url)
    latencies = []
    try:
        warm = await pool.enqueue_job("noop", messages(first - 1))
        assert warm is not None
        await _arq_result(warm, poll_delay_s)
        for i in range(n_lat):
            t = time.perf_counter()
            job = await pool.enqueue_job("noop", messages(first + i))
            assert job is not None
            assert (await _arq_result(job, poll_delay_s)).result == "ok"
            latencies.append((time.perf_counter() - t) * 1000)
    finally:
        await pool.aclose()
    return latencies


async def arq_enqueue(url: str, first: int, n: int, concurrency: int, go: Any = None) -> list[str]:
    """No-op jobs for chats ``first .. first + n - 1`` (``concurrency`` calls in flight,
    after ``go`` when given); their result keys."""
    from arq.constants import result_key_prefix

    pool = await _arq_pool(url)
    try:

        async def submit(i: int) -> str:
            job = await pool.enqueue_job("noop", messages(first + i))
            assert job is not None
            return result_key_prefix + str(job.job_id)

        if go is not None:
            await asyncio.get_running_loop().run_in_executor(None, go.wait)
        return await _bounded(n, concurrency, submit)
    finally:
        await pool.aclose()


async def drain_rate(url: str, system: str, result_keys: list[str]) -> Row:
    """Worker alone on a full queue: first result → last result."""
    from producer.connection import connect

    redis = connect(url)
    try:
        first_s = await _all_exist(redis, result_keys)
        seconds = time.perf_counter() - first_s
    finally:
        await redis.aclose()
    return Row(system, "drain a full queue", len(result_keys) - 1, seconds, [])


async def _wait_heartbeat(url: str, names: str | list[str], proc: subprocess.Popen[bytes]) -> None:
    """Until every named worker (host process) beats."""
    from producer.connection import connect
    from producer.contract.keys import Keys

    wanted = [Keys().heartbeat(n) for n in ([names] if isinstance(names, str) else names)]
    redis = connect(url)
    try:
        while sum([await redis.exists(name) for name in wanted]) < len(wanted):
            if proc.poll() is not None:
                raise RuntimeError("chatq worker exited; see its log")
            await asyncio.sleep(0.1)
    finally:
        await redis.aclose()


def _label(system: str, procs: int, unit: str) -> str:
    """``chatq`` / ``arq`` with the process count when it is more than one."""
    return system if procs == 1 else f"{system} ×{procs} {unit}"


def tokenizer_dir(workdir: Path) -> Path:
    from testkit.checkpoints import build_tokenizer

    tok_dir = workdir / "tokenizer"
    if not tok_dir.exists():
        build_tokenizer(tok_dir)  # the worker applies a real chat template and tokenizes
    return tok_dir


def chatq_rows(
    args: argparse.Namespace, url: str, workdir: Path, tok_dir: Path, repo: Path, hosts: int
) -> list[Row]:
    """chatq's rows (end to end with submit and submit_many, latency, drain) with one worker
    of ``hosts`` host processes from ``repo``, on ``url`` split into ``args.partitions``."""
    n, n_lat = args.requests, args.latency_requests
    chatq_cmd = [
        sys.executable, "-m", "workers.cli", "--log-level", "WARNING", "worker",
        "--model", str(tok_dir), "--served-model-name", MODEL, "--redis", url,
        "--name", "bench-worker", "--max-num-seqs", str(args.max_num_seqs),
        "--engine-factory", "testkit.zero_cost_engine:ZeroCostEngine.from_options",
    ]  # fmt: skip
    if hosts > 1:  # an older checkout may not know the option
        chatq_cmd += ["--host-processes", str(hosts)]
    if args.partitions > 1:
        chatq_cmd += ["--partitions", str(args.partitions)]
    names = ["bench-worker"] + [f"bench-worker.{k}" for k in range(1, hosts)]
    side: list[Row] = []
    worker = spawn(chatq_cmd, workdir / "chatq-worker.log", repo)
    try:
        asyncio.run(_wait_heartbeat(url, names, worker))
        row = asyncio.run(end_to_end(url, "chatq", "submit", 0, args))
        row.latencies_ms = asyncio.run(chatq_latency(url, n_lat, 2 * n, args.partitions))
        side.append(row)
        side.append(asyncio.run(end_to_end(url, "chatq", "submit_many", n, args)))
    finally:
        stop(worker)
    finals = asyncio.run(chatq_fill(url, n, args.partitions))
    worker = spawn(chatq_cmd, workdir / "chatq-worker.log", repo)
    try:
        side.append(asyncio.run(drain_rate(url, "chatq", finals)))
    finally:
        stop(worker)
    for r in side:
        r.procs = hosts
    return side


def cluster_rows(args: argparse.Namespace, workdir: Path) -> list[Row]:
    """chatq's rows on a local Redis Cluster of each count in ``args.masters``, the queue
    split into ``args.partitions`` partitions every time."""
    from testkit.cluster import LocalCluster

    rows: list[Row] = []
    tok_dir = tokenizer_dir(workdir)
    for masters in args.masters:
        with LocalCluster(masters) as cluster:
            side = chatq_rows(args, cluster.url, workdir, tok_dir, REPO, 1)
        for r in side:
            r.system = r.system.replace("chatq", f"chatq, {_masters(masters)}", 1)
        rows += side
        _progress(side)
    return rows


def _masters(count: int) -> str:
    return f"{count} master" + ("s" if count > 1 else "")


def run(args: argparse.Namespace, url: str, workdir: Path) -> list[Row]:
    args = argparse.Namespace(**{**vars(args), "partitions": 1})  # one Redis, one partition
    tok_dir = tokenizer_dir(workdir)
    n, n_lat = args.requests, args.latency_requests
    rows: list[Row] = []
    sides = [("", REPO)]
    if args.baseline_repo is not None:
        sides.insert(0, ("@baseline", args.baseline_repo.resolve()))
    for label, repo in sides:
        for hosts in args.host_processes:
            side = chatq_rows(args, url, workdir, tok_dir, repo, hosts)
            for r in side:
                r.system = r.system.replace(
                    "chatq", _label("chatq" + label, hosts, "host procs"), 1
                )
            rows += side
            _progress(side)

    for workers in args.arq_workers:
        arq_cmd = [
            sys.executable, str(Path(__file__).resolve()), "--arq-worker", "--redis", url,
            "--arq-max-jobs", str(args.arq_max_jobs),
            "--arq-poll-delay-s", str(args.arq_poll_delay_s),
        ]  # fmt: skip
        side = []
        procs = [spawn(arq_cmd, workdir / "arq-worker.log") for _ in range(workers)]
        try:
            time.sleep(1.0 + 0.2 * workers)
            row = asyncio.run(end_to_end(url, "arq", "enqueue_job", 0, args))
            row.latencies_ms = asyncio.run(arq_latency(url, n_lat, 2 * n, args.arq_poll_delay_s))
            side.append(row)
        finally:
            for proc in procs:
                stop(proc)
        results = asyncio.run(arq_enqueue(url, 3 * n, n, args.concurrency))
        procs = [spawn(arq_cmd, workdir / "arq-worker.log") for _ in range(workers)]
        try:
            side.append(asyncio.run(drain_rate(url, "arq (no-op job)", results)))
        finally:
            for proc in procs:
                stop(proc)
        for r in side:
            r.procs = workers
            r.system = r.system.replace("arq", _label("arq", workers, "workers"), 1)
        rows += side
        _progress(side)
    return rows


def _progress(rows: list[Row]) -> None:
    """Each system's rows as soon as they are measured (stderr), so that a run cut short
    still leaves its figures in the log."""
    for r in rows:
        print(f"[row] {r.system} | {r.mode} | {r.requests} | {r.seconds:.2f} s | {r.rps:,.0f} "
              f"req/s", file=sys.stderr, flush=True)  # fmt: skip


def best(runs: list[list[Row]]) -> list[Row]:
    """Per row, the repeat with the most requests/s (the machine is shared: less noise)."""
    return [max(group, key=lambda r: r.rps) for group in zip(*runs, strict=True)]


def table(rows: list[Row]) -> str:
    lines = [
        "| system | mode | requests | seconds | requests/s | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lat = f"{r.pct(0.5):.2f} | {r.pct(0.99):.2f}" if r.latencies_ms else "- | -"
        lines.append(
            f"| {r.system} | {r.mode} | {r.requests} | {r.seconds:.2f} | {r.rps:,.0f} | {lat} |"
        )
    arq = {(r.mode, r.procs): r for r in rows if r.system.startswith("arq")}
    lines.append("")
    lines += _masters_ratios(rows)
    for r in rows:
        if not r.system.startswith("chatq"):
            continue
        for procs in sorted({1, r.procs}):
            base = arq.get((r.mode, procs))
            if base is not None:
                lines.append(
                    f"- {r.system} / {base.system.split(' (')[0]} requests/s, {r.mode}: "
                    f"{r.rps / base.rps:.1f}x"
                )
    for e2e in (r for r in rows if r.latencies_ms):
        lines.append(
            f"- {e2e.system.split(' (')[0]} latency added by the queue, one request at a time: "
            f"p50 {e2e.pct(0.5):.2f} ms, p99 {e2e.pct(0.99):.2f} ms "
            f"(mean {statistics.fmean(e2e.latencies_ms):.2f} ms)"
        )
    return "\n".join(lines)


def _masters_ratios(rows: list[Row]) -> list[str]:
    """Per mode, each cluster row's requests/s against the one of the fewest masters."""
    out: list[str] = []
    cluster = [r for r in rows if " master" in r.system]

    def kind(r: Row) -> tuple[str, str]:  # the row but for its count of masters
        return r.mode, re.sub(r"\d+ masters?", "", r.system)

    for k in dict.fromkeys(kind(r) for r in cluster):
        same = [r for r in cluster if kind(r) == k]
        for r in same[1:]:
            out.append(f"- {r.system} / {same[0].system}, {r.mode}: {r.rps / same[0].rps:.2f}x")
    return out


def _counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected counts like 1,2: {text!r}") from err
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"expected positive counts: {text!r}")
    return counts


def main() -> int:
    from bench import smoke

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis", help="Redis URL (default: a private server)")
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--concurrency", type=int, default=64, help="producer calls in flight")
    p.add_argument("--latency-requests", type=int, default=300)
    p.add_argument("--batch", type=int, default=100, help="requests per submit_many call")
    p.add_argument("--batches-in-flight", type=int, default=4, help="submit_many calls at once")
    p.add_argument("--repeats", type=int, default=1, help="keep the best of N runs per row")
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--arq-max-jobs", type=int, default=512)
    p.add_argument("--arq-poll-delay-s", type=float, default=0.005)
    p.add_argument("--baseline-repo", type=Path, help="older checkout: its chatq rows too")
    p.add_argument("--host-processes", type=_counts, default=[1],
                   help="chatq rows per count of worker host processes, e.g. 1,2")  # fmt: skip
    p.add_argument("--arq-workers", type=_counts, default=[1],
                   help="arq rows per count of arq worker processes, e.g. 1,2")  # fmt: skip
    p.add_argument("--producers", type=int, default=1, help="producer processes (both systems)")
    p.add_argument("--masters", type=_counts, default=[],
                   help="chatq rows on a local Redis Cluster of each count of masters, e.g. "
                   "1,3")  # fmt: skip
    p.add_argument("--partitions", type=int, default=3, help="the cluster rows' partitions")
    p.add_argument("--cluster-only", action="store_true", help="only the --masters rows")
    p.add_argument("--arq-worker", action="store_true", help=argparse.SUPPRESS)
    smoke.add_smoke_flag(p, f"every row on few requests, {SMOKE}")
    args = smoke.parse_args(p, SMOKE, None)
    if args.arq_worker:
        run_arq_worker(args.redis, args.arq_max_jobs, args.arq_poll_delay_s)
        return 0
    from workers.redis_server import RedisServer

    runs: list[list[Row]] = []
    with tempfile.TemporaryDirectory(prefix="chatq-bench-") as tmp:
        for _ in range(args.repeats):
            rows: list[Row] = []
            if args.cluster_only:
                pass
            elif args.redis:
                rows += run(args, args.redis, Path(tmp))
            else:
                with RedisServer() as server:
                    rows += run(args, server.url, Path(tmp))
            runs.append(rows + cluster_rows(args, Path(tmp)))
    print(table(best(runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
