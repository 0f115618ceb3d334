"""What the HTTP gateway adds: latency over the direct ``ChatClient``, and requests/s.

One run, side by side on the same Redis and the same worker (an unchanged ``chatq worker``
whose engine is ``testkit.zero_cost_engine.ZeroCostEngine``, so what is measured is the queue
and the gateway, none of it inference):

- added latency, one request at a time, direct and gateway requests alternating:
  non-streaming (send → whole answer) and streaming (send → first text delta; for the
  gateway the first ``chat.completion.chunk`` carrying content, not the role chunk it sends
  at once). p50 / p99 of each, and gateway minus direct;
- requests/s through ``chatq gateway --workers N`` for each N of ``--gateway-processes``:
  ``--load-processes`` processes keep ``--connections`` keep-alive connections each busy
  with non-streaming completions for ``--seconds``.

The HTTP client is a minimal keep-alive HTTP/1.1 client on raw asyncio streams, so its own
cost stays small next to the gateway's (a full client library would be measured too).

    .venv/bin/python bench/gateway.py            # private Redis, full run
    .venv/bin/python bench/gateway.py --smoke    # seconds, for CI
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.procs import spawn, stop  # noqa: E402

MODEL = "zero"
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant for an online shop."},
    {"role": "user", "content": "Where is my order #12345?"},
]


class HttpConnection:
    """One keep-alive HTTP/1.1 connection: POST JSON, read the answer (content-length or
    a streamed body)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int) -> HttpConnection:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer)

    @staticmethod
    def request(body: dict[str, Any]) -> bytes:
        data = json.dumps(body).encode()
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\n"
            f"content-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        )
        return head.encode() + data

    async def _head(self) -> dict[str, str]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode().split("\r\n")
        if " 200 " not in lines[0] + " ":
            raise RuntimeError(f"gateway answered {lines[0]}")
        return {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}

    async def post(self, payload: bytes) -> bytes:
        self.writer.write(payload)
        head = await self._head()
        return await self.reader.readexactly(int(head["content-length"]))

    async def post_stream_first_text(self, payload: bytes) -> float:
        """Send a streaming request; perf_counter time of the first content delta; reads
        the stream to its end (chunked transfer) so the connection can be reused."""
        self.writer.write(payload)
        await self._head()
        first: float | None = None
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            data = await self.reader.readexactly(size + 2)
            if size == 0:
                break
            if first is None and b'"content":"' in data and b'"content":""' not in data:
                first = time.perf_counter()
        assert first is not None
        return first

    def close(self) -> None:
        self.writer.close()


def _ms(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return statistics.median(samples), q[98]


async def latency(url: str, port: int, n: int) -> dict[str, list[float]]:
    """Alternating direct / gateway requests, one at a time: four lists of ms."""
    from producer import ChatClient

    out: dict[str, list[float]] = {k: [] for k in ("direct", "gateway", "direct_s", "gateway_s")}
    plain = HttpConnection.request({"model": MODEL, "messages": MESSAGES, "max_tokens": 1})
    streamed = HttpConnection.request(
        {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    )
    conn = await HttpConnection.open(port)
    async with ChatClient(url, allow_unserved=True) as client:
        for i in range(n + 10):  # the first 10 warm both paths up
            t0 = time.perf_counter()
            await client.chat(MESSAGES, model=MODEL, max_tokens=1)
            t1 = time.perf_counter()
            await conn.post(plain)
            t2 = time.perf_counter()
            rid = await client.submit(MESSAGES, model=MODEL, max_tokens=4, stream=True)
            async for _ in client.stream(rid):
                t3 = time.perf_counter()
                break
            t4 = time.perf_counter()
            first = await conn.post_stream_first_text(streamed)
            if i >= 10:
                out["direct"].append((t1 - t0) * 1000)
                out["gateway"].append((t2 - t1) * 1000)
                out["direct_s"].append((t3 - t2) * 1000)
                out["gateway_s"].append((first - t4) * 1000)
    conn.close()
    return out


def _load_main(target: int | str, connections: int, seconds: float, go: Any, result: Any) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    result.put(asyncio.run(_load(target, connections, seconds, go)))


async def _load(target: int | str, connections: int, seconds: float, go: Any) -> int:
    """``connections`` request loops against a gateway port, or (a Redis URL) against the
    queue directly with one ChatClient."""
    from producer import ChatClient

    payload = HttpConnection.request({"model": MODEL, "messages": MESSAGES, "max_tokens": 1})
    direct = ChatClient(target, allow_unserved=True) if isinstance(target, str) else None
    conns = [] if direct else [await HttpConnection.open(int(target)) for _ in range(connections)]
    while not go.is_set():
        await asyncio.sleep(0.001)
    end = time.perf_counter() + seconds

    async def one(i: int) -> int:
        done = 0
        while time.perf_counter() < end:
            if direct is not None:
                await direct.chat(MESSAGES, model=MODEL, max_tokens=1)
            else:
                await conns[i].post(payload)
            done += 1
        return done

    counts = await asyncio.gather(*(one(i) for i in range(connections)))
    for c in conns:
        c.close()
    if direct is not None:
        await direct.aclose()
    return sum(counts)


def throughput(target: int | str, procs: int, connections: int, seconds: float) -> float:
    """Requests/s over ``seconds`` from ``procs`` load processes (a gateway port, or a
    Redis URL for the direct ChatClient)."""
    ctx = mp.get_context("spawn")
    go, result = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_load_main, args=(target, connections, seconds, go, result))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    time.sleep(1.0)  # connections open
    go.set()
    total = sum(result.get(timeout=seconds + 60) for _ in workers)
    for w in workers:
        w.join()
    return total / seconds


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process and all its descendants (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue
    return total


def _wait(check: Any, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start; see its log")
        time.sleep(0.1)


def _ready(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def start_gateway(url: str, processes: int, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    from workers.redis_server import free_port

    port = free_port()
    proc = spawn([sys.executable, "-m", "workers.cli", "gateway", "--redis", url,
                   "--port", str(port), "--workers", str(processes), "--allow-anonymous",
                   "--log-level", "warning"], log)  # fmt: skip
    _wait(lambda: _ready(port), proc, "gateway")
    # /ready answers once one process is up; the others may still be importing (CPU that
    # is not the requests'): wait until every process has served a request.
    pids: set[str] = set()
    deadline = time.monotonic() + 60
    while len(pids) < processes and time.monotonic() < deadline:
        pids.add(_health_pid(port))
    time.sleep(0.5)
    return proc, port


def _health_pid(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
        return str(json.loads(r.read())["pid"])


@dataclass
class Report:
    lat: dict[str, list[float]]
    rates: dict[int, float]
    cpu_us: dict[int, float]  # gateway processes' CPU per request, by process count

    def table(self) -> str:
        rows = ["| path | p50 ms | p99 ms |", "|---|---|---|"]
        for label, key in (("direct ChatClient, whole answer", "direct"),
                           ("gateway, whole answer", "gateway"),
                           ("direct ChatClient, first delta", "direct_s"),
                           ("gateway, first content chunk", "gateway_s")):  # fmt: skip
            p50, p99 = _ms(self.lat[key])
            rows.append(f"| {label} | {p50:.3f} | {p99:.3f} |")
        for kind, a, b in (("non-streaming", "gateway", "direct"),
                           ("first streamed text", "gateway_s", "direct_s")):  # fmt: skip
            g50, g99 = _ms(self.lat[a])
            d50, d99 = _ms(self.lat[b])
            rows.append(f"| **added by the gateway, {kind}** | {g50 - d50:.3f} | {g99 - d99:.3f} |")
        rows += ["", "| producer | requests/s | gateway CPU µs/request |", "|---|---|---|"]
        for n, rate in self.rates.items():
            label = f"gateway ×{n}" if n else "direct ChatClient (same load processes)"
            cpu = f"{self.cpu_us[n]:.0f}" if n in self.cpu_us else "-"
            rows.append(f"| {label} | {rate:,.0f} | {cpu} |")
        return "\n".join(rows)


def run(args: argparse.Namespace, url: str, workdir: Path) -> Report:
    from redis import Redis

    from producer.contract.keys import Keys
    from testkit.checkpoints import build_tokenizer

    tok_dir = workdir / "tokenizer"
    build_tokenizer(tok_dir)
    worker = spawn([sys.executable, "-m", "workers.cli", "--log-level", "WARNING", "worker",
                     "--model", str(tok_dir), "--served-model-name", MODEL, "--redis", url,
                     "--name", "bench-worker", "--max-num-seqs", "1024",
                     "--host-processes", str(args.worker_host_processes),
                     "--engine-factory", "testkit.zero_cost_engine:ZeroCostEngine.from_options"],
                    workdir / "worker.log")  # fmt: skip
    redis = Redis.from_url(url)
    try:
        _wait(lambda: redis.exists(Keys().heartbeat("bench-worker")), worker, "worker")
        gateway, port = start_gateway(url, 1, workdir / "gateway.log")
        try:
            lat = asyncio.run(latency(url, port, args.latency_requests))
        finally:
            stop(gateway)
        rates: dict[int, float] = {
            0: throughput(url, args.load_processes, args.connections, args.seconds)
        }
        cpu_us: dict[int, float] = {}
        print(f"direct ChatClient: {rates[0]:,.0f} requests/s", flush=True)
        for n in args.gateway_processes:
            gateway, port = start_gateway(url, n, workdir / "gateway.log")
            try:
                cpu0 = tree_cpu_s(gateway.pid)
                rates[n] = throughput(port, args.load_processes, args.connections, args.seconds)
                requests = rates[n] * args.seconds
                cpu_us[n] = (tree_cpu_s(gateway.pid) - cpu0) / max(requests, 1) * 1e6
                print(f"{n} gateway processes: {rates[n]:,.0f} requests/s, "
                      f"{cpu_us[n]:.0f} gateway CPU µs/request", flush=True)  # fmt: skip
            finally:
                stop(gateway)
        return Report(lat, rates, cpu_us)
    finally:
        stop(worker)
        redis.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--redis", help="Redis URL (default: a private server)")
    p.add_argument("--latency-requests", type=int, default=500)
    p.add_argument("--gateway-processes", default="1,4", help="comma-separated counts")
    p.add_argument("--load-processes", type=int, default=4, help="HTTP load processes")
    p.add_argument("--connections", type=int, default=64, help="per load process")
    p.add_argument("--seconds", type=float, default=10.0, help="per requests/s row")
    p.add_argument("--worker-host-processes", type=int, default=2)
    p.add_argument("--smoke", action="store_true", help="a few seconds: does it all run")
    args = p.parse_args()
    args.gateway_processes = [int(x) for x in str(args.gateway_processes).split(",")]
    if args.smoke:
        args.latency_requests, args.seconds, args.connections = 30, 1.0, 8
        args.load_processes, args.worker_host_processes = 1, 1
        args.gateway_processes = [1, 2]
    from workers.redis_server import RedisServer

    with tempfile.TemporaryDirectory(prefix="chatq-bench-gw-") as tmp:
        if args.redis:
            report = run(args, args.redis, Path(tmp))
        else:
            with RedisServer() as server:
                report = run(args, server.url, Path(tmp))
    print(report.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
