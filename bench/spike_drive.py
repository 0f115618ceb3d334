"""The spike's async side: paced producers, a fan-in result collector, a 1 s sampler.

Thousands of requests are outstanding during the burst, so results are not awaited one
connection per request: a collector sweeps the outstanding result streams with multi-key
non-blocking XREADs (oldest first), the way a high fan-out consumer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from bench.workload import ChatRequest
from producer.client import ChatClient
from producer.contract.bounds import QueueBounds, write_bounds
from producer.contract.envelope import now_unix_ms
from producer.contract.keys import Keys
from producer.contract.results import Done, Error, decode_result
from producer.errors import QueueFull
from producer.settings import ClientSettings

SWEEP_KEYS = 500
PRODUCERS = 32
SWEEP_INTERVAL_S = 0.005


class GpuSampler:
    def __init__(self) -> None:
        self.handle: Any = None
        self.last_sample_us = 0
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVIDIA driver (CPU smoke run): GPU columns stay empty
            self.handle = None

    def read(self) -> dict[str, float]:
        """One reading: ``gpu_util`` is NVML's current utilisation (the share of its latest
        sample period, well under a second, with a kernel running); ``gpu_util_avg`` the mean
        of all the utilisation samples NVML took since the previous reading (absent when the
        driver keeps none)."""
        if self.handle is None:
            return {}
        n = self.nvml
        mem = n.nvmlDeviceGetMemoryInfo(self.handle)
        out = dict(
            gpu_util=float(n.nvmlDeviceGetUtilizationRates(self.handle).gpu),
            gpu_mem_gib=mem.used / 2**30,
            gpu_temp_c=float(n.nvmlDeviceGetTemperature(self.handle, 0)),
        )
        avg = self._util_since_last()
        if avg is not None:
            out["gpu_util_avg"] = avg
        return out

    def _util_since_last(self) -> float | None:
        n = self.nvml
        try:
            _, samples = n.nvmlDeviceGetSamples(
                self.handle, n.NVML_GPU_UTILIZATION_SAMPLES, self.last_sample_us
            )
        except Exception:  # not supported, or no sample since the last reading
            return None
        fresh = [s for s in samples if s.timeStamp > self.last_sample_us]
        if not fresh:
            return None
        first = self.last_sample_us == 0
        self.last_sample_us = max(s.timeStamp for s in fresh)
        if first:  # the driver's whole buffer, from before this run: only sets the mark
            return None
        return sum(float(s.sampleValue.uiVal) for s in fresh) / len(fresh)


async def wait_ready(redis: Any, keys: Keys, worker: Any, timeout_s: float = 600.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode}; see worker.log")
        if await redis.keys(keys.heartbeat_pattern()):
            return
        await asyncio.sleep(0.2)
    raise RuntimeError("worker did not become ready")


async def drive(
    url: str, model: str, reqs: list[ChatRequest], schedule: list[float], args: Any, worker: Any
) -> dict[str, Any]:
    settings = ClientSettings(redis_url=url, allow_unserved=True)
    keys = Keys(settings.prefix)
    client = ChatClient(settings=settings)
    redis = client.redis
    # The spike is meant to queue without bound: the operator's bounds, set in Redis.
    await write_bounds(redis, keys, QueueBounds(10**12, 10**12, 256))
    await wait_ready(redis, keys, worker)
    gpu = GpuSampler()
    outstanding: dict[str, dict[str, Any]] = {}
    records: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    counts = {"queue_full": 0, "errors": 0, "duplicates": 0, "submitted": 0}
    finals_seen: set[str] = set()
    t0 = time.monotonic()
    t0_ms = now_unix_ms()
    producing = True

    async def produce_share(share: int) -> None:
        for req, at in list(zip(reqs, schedule, strict=True))[share::PRODUCERS]:
            delay = t0 + at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            while True:
                try:
                    rid = await client.submit(
                        req.messages,
                        model=model,
                        max_tokens=req.max_tokens,
                        temperature=0.0,
                        ignore_eos=True,
                    )
                    break
                except QueueFull as full:  # not lost: the producer backs off and retries
                    counts["queue_full"] += 1
                    await asyncio.sleep(full.retry_after_s)
            counts["submitted"] += 1
            outstanding[rid] = {
                "index": req.index,
                "phase": "calm" if at < args.calm_s else "burst",
                "sent_s": time.monotonic() - t0,
                "cursor": "0",
            }

    async def produce() -> None:
        # Several paced producers, so a burst of thousands of submits a second is not
        # limited by one coroutine's round trips (each keeps to its share of the schedule).
        nonlocal producing
        await asyncio.gather(*(produce_share(i) for i in range(PRODUCERS)))
        producing = False

    async def collect() -> None:
        while producing or outstanding:
            ids = list(outstanding)[: SWEEP_KEYS * 4]
            for start in range(0, len(ids), SWEEP_KEYS):
                chunk = ids[start : start + SWEEP_KEYS]
                streams = {keys.result(i): outstanding[i]["cursor"] for i in chunk}
                reply = await redis.xread(streams)
                for stream, entries in reply or []:
                    rid = (stream.decode() if isinstance(stream, bytes) else stream).rsplit(":", 1)[
                        1
                    ]
                    for entry_id, fields in entries:
                        entry = decode_result(fields)
                        if isinstance(entry, Done | Error):
                            if rid in finals_seen:
                                counts["duplicates"] += 1
                                continue
                            finals_seen.add(rid)
                            meta = outstanding.pop(rid, None)
                            if meta is None:
                                continue
                            rec = {
                                **{k: v for k, v in meta.items() if k != "cursor"},
                                "recv_s": time.monotonic() - t0,
                            }
                            if isinstance(entry, Error):
                                counts["errors"] += 1
                                rec["error"] = entry.code
                            else:
                                t = entry.timings
                                rec.update(
                                    ttft_ms=t.first_token_ms,
                                    e2e_ms=t.total_ms,
                                    queued_ms=t.queued_ms,
                                    engine_ms=t.engine_ms,
                                    tokens=entry.usage.completion_tokens,
                                    prompt_tokens=entry.usage.prompt_tokens,
                                    cached_tokens=entry.usage.cached_tokens,
                                    done_s=rec["recv_s"],
                                )
                            records.append(rec)
                        elif rid in outstanding:
                            outstanding[rid]["cursor"] = entry_id
            await asyncio.sleep(SWEEP_INTERVAL_S)

    async def sample() -> None:
        last_tokens = 0
        while producing or outstanding:
            await asyncio.sleep(1.0)
            lanes = keys.request_lanes(model)
            pipe = redis.pipeline(transaction=False)
            for lane in lanes:
                pipe.xlen(lane)
            pipe.hget(keys.backlog(model), "tokens")
            *lens, backlog_tokens = await pipe.execute()
            pending = 0
            for lane in lanes:
                with contextlib.suppress(Exception):
                    pending += int((await redis.xpending(lane, "workers"))["pending"])
            tokens = sum(r.get("tokens", 0) for r in records)
            samples.append(
                {
                    "t_s": time.monotonic() - t0,
                    "queued": sum(lens) - pending,
                    "pending": pending,
                    "backlog_tokens": int(backlog_tokens or 0),
                    "tok_s": tokens - last_tokens,
                    "done": len(records),
                    "submitted": counts["submitted"],
                    **gpu.read(),
                }
            )
            last_tokens = tokens
            if time.monotonic() - t0 > args.calm_s + args.burst_s + args.drain_timeout_s:
                raise TimeoutError("backlog not drained within --drain-timeout-s")

    try:
        await asyncio.gather(produce(), collect(), sample())
    finally:
        await client.aclose()
    return {
        "t0_unix_ms": t0_ms,
        "records": records,
        "samples": samples,
        "counts": counts,
        "calm_s": args.calm_s,
        "burst_s": args.burst_s,
    }
