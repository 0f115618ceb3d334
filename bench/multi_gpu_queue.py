"""Throughput through the queue on 1 GPU vs N GPUs of one host, same requests, same run.

Starts a private Redis, then for each GPU set (``--gpu-sets 0 0,1``) one
``chatq worker --gpus SET`` (one engine process per GPU, all in one consumer group), submits
the same seeded customer-service requests at once, and measures output tokens/s from the
first submit to the last final result. Prints one table; writes multi_gpu_queue.json.

    python bench/multi_gpu_queue.py --out out/mgq --tokenizer .cache/tok-smollm2
    python bench/multi_gpu_queue.py --smoke     # one CPU worker, tiny model, 16 requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import smoke
from bench.spike import PRESETS, add_engine_variant_arguments, build_model, start_worker
from bench.spike_drive import drive
from bench.workload import make_requests


def run_set(url: str, model_dir: Path, gpus: str, reqs: list[Any], args: Any) -> dict[str, Any]:
    tag = gpus.replace(",", "_")
    # --device cpu (--smoke): one CPU worker stands in for the GPU set.
    placement = ["--gpus", gpus] if args.device != "cpu" else ["--device", "cpu"]
    worker = start_worker(
        url, model_dir, args, args.out / f"worker-{tag}.log",
        name=f"mg-{tag}", served_name="mg", placement=placement,
    )  # fmt: skip
    try:
        opts = SimpleNamespace(calm_s=1e9, burst_s=0.0, drain_timeout_s=args.timeout_s)
        n_gpus = len(gpus.split(",")) if args.device != "cpu" else 1
        # Wait until every GPU's engine has its heartbeat before the clock starts.
        asyncio.run(_wait_workers(url, n_gpus, worker, f"mg-{tag}"))
        start = time.monotonic()
        run = asyncio.run(drive(url, "mg", reqs, [0.0] * len(reqs), opts, worker))
        wall = time.monotonic() - start
    finally:
        worker.terminate()
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            worker.kill()
    recs = [r for r in run["records"] if "error" not in r]
    first = min(r["sent_s"] for r in recs)
    last = max(r["done_s"] for r in recs)
    tokens = sum(r["tokens"] for r in recs)
    return dict(
        gpus=gpus,
        requests=len(recs),
        errors=run["counts"]["errors"],
        duplicates=run["counts"]["duplicates"],
        tokens=tokens,
        seconds=last - first,
        tok_s=tokens / (last - first),
        wall_s=wall,
    )


async def _wait_workers(url: str, n: int, worker: Any, name: str, timeout_s: float = 600) -> None:
    import redis.asyncio as aioredis

    from producer.contract.keys import Keys

    r = aioredis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}")
            if len(await r.keys(Keys().heartbeat(name) + "*")) >= n:
                return
            await asyncio.sleep(0.2)
        raise RuntimeError("workers did not become ready")
    finally:
        await r.aclose()


SMOKE: dict[str, Any] = dict(
    preset="tiny", device="cpu", gpu_sets=["0"], requests=16, max_num_seqs=4,
    max_num_batched_tokens=512, max_model_len=512, system_tokens=50, answer_tokens=(4, 12),
    timeout_s=120.0,
)  # fmt: skip


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", type=Path, help="results directory (required unless --smoke)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="qwen2.5-1.5b")
    p.add_argument("--tokenizer", type=Path, help="required unless --smoke (the test one)")
    p.add_argument("--gpu-sets", nargs="+", default=["0", "0,1"])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--system-tokens", type=int, default=1000)
    p.add_argument("--answer-tokens", type=int, nargs=2, default=(50, 400))
    p.add_argument("--timeout-s", type=float, default=400.0)
    p.add_argument("--device", default="cuda")
    add_engine_variant_arguments(p)
    smoke.add_smoke_flag(p, f"one CPU worker, {SMOKE}")
    args = smoke.parse_args(p, SMOKE, None)
    if not args.smoke and (args.out is None or args.tokenizer is None):
        p.error("--out and --tokenizer are required (or --smoke)")
    return args


def main() -> int:
    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="chatq-mgq-") as tmp:
        if args.out is None:
            args.out = Path(tmp)
        if args.tokenizer is None:
            from testkit.checkpoints import build_tokenizer

            args.tokenizer = args.out / "tokenizer"
            build_tokenizer(args.tokenizer)
        return run(args)


def run(args: argparse.Namespace) -> int:
    args.out.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer

    from workers.redis_server import RedisServer

    model_dir = build_model(args.out, args.preset, args.tokenizer, args.device)
    tok = AutoTokenizer.from_pretrained(model_dir)
    reqs = make_requests(
        tok, args.requests, seed=3, system_tokens=args.system_tokens,
        answer_tokens=tuple(args.answer_tokens),
    )  # fmt: skip
    rows = []
    with RedisServer() as server:
        for gpus in args.gpu_sets:
            rows.append(run_set(server.url, model_dir, gpus, reqs, args))
            print(rows[-1], flush=True)
    base = rows[0]["tok_s"]
    (args.out / "multi_gpu_queue.json").write_text(json.dumps(rows, indent=1))
    print("| GPUs | requests | output tokens | seconds | tok/s | vs first | errors | dup |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['gpus']} | {r['requests']} | {r['tokens']:,} | {r['seconds']:.1f} | "
            f"{r['tok_s']:,.0f} | {r['tok_s'] / base:.2f}x | {r['errors']} | {r['duplicates']} |"
        )
    if any(r["errors"] or r["duplicates"] or r["requests"] != len(reqs) for r in rows):
        print("requests were lost, duplicated or errored", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
