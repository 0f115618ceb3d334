"""One worker: the host process's single asyncio loop, wired to its engine process.

Startup, in order: connect to Redis and create the consumer groups; load the tokenizer;
start the engine process and wait for it; take back this consumer name's own pending
entries; then run intake, the aggregator, the cancel listener and the heartbeat/reclaim
loop side by side until asked to stop.

Shutdown (SIGTERM / SIGINT / ``stop()``): stop pulling; keep heartbeating so nobody claims
what is still running; let running requests finish for up to ``grace_period_s``; then abort
what is left in the engine and hand those entries back to the end of their lanes with
REQUEUE (ack + re-add in one Lua call, only while the entry is still pending on this
consumer and has no final result). Nothing is lost (an entry is either answered,
requeued, or still pending where the reclaimers see it once the heartbeat is gone) and
nothing is answered twice (finals are write-if-absent; requeued requests get no partial
answer). Last, delete the heartbeat, so any entry that is still pending on this consumer
is claimed at once.

A request that starts over on another worker (claimed after a crash, or handed back past
the grace period) is generated again from its prompt; if it streamed, the new worker
continues from the tokens in its chunks instead (:mod:`workers.resume`), so its chunks
join to its final text. Its final result is written once. Redis outages of any length are
waited out (writes queued, :mod:`workers.results`), and what Redis says this worker holds
is reconciled with what it holds (``Intake.reconcile``).

If the engine process dies, the worker exits at once without requeueing: the heartbeat is
deleted and other workers claim the pending entries with their delivery count raised, so
a request that crashes engines ends in the dead-letter stream after ``max_deliveries``.

With ``host_processes`` = n > 1 this process (host 0) starts the engine process with a
pair of pipes per host, then n - 1 more host processes (``host_main``), each a Worker of
its own (consumer ``<name>.<k>``, its own heartbeat, intake, aggregator and reclaim) with an
equal share of the engine's capacity, attached to the same engine
(:mod:`workers.host_processes`). Any of the processes dying ends them all, like an engine
crash (the engine sees that host's pipe close): their entries are reclaimed by the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpu_engine.outputs import EngineCapacity
from producer.connection import connect
from producer.contract.keys import Keys
from workers.admission import Admission
from workers.aggregator import Aggregator
from workers.engine_process import EngineProcess, HostChannel
from workers.engine_wire import Output
from workers.errors import ConfigError
from workers.host_processes import HostProcesses, await_go
from workers.intake import Intake
from workers.lanes import Entry, Lanes
from workers.logprobs import TokenTexts
from workers.metrics import Metrics
from workers.model_source import check_model_dir, with_model_dir
from workers.prompts import PromptBuilder
from workers.reclaim import Reclaimer, name_free
from workers.results import ResultWriter
from workers.settings import LOG_FORMAT, WorkerSettings
from workers.side_loops import CANCEL_BLOCK_MS, cancel_loop, entry_from_claim, heartbeat_loop
from workers.telemetry import WorkerTelemetry

log = logging.getLogger(__name__)
T = TypeVar("T")

STARTUP_RETRY_S = (0.2, 5.0)
SOCKET_TIMEOUT_S = 10.0  # first and longest wait between startup calls Redis missed
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (Python's default: 700)
TASK_EXIT_TIMEOUT_S = 5.0
HEARTBEAT_DELETE_TIMEOUT_S = 5.0


@dataclass
class Parts:
    """A running worker's components, wired together by :meth:`Worker.run`."""

    redis: Redis
    lanes: Lanes
    writer: ResultWriter
    engine: EngineProcess
    admission: Admission
    aggregator: Aggregator
    intake: Intake
    reclaimer: Reclaimer


class Worker:
    """One worker host process: intake, aggregator, cancels and heartbeat on one loop, fed
    by its engine process (see the module docstring)."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        host: HostChannel | None = None,
        started: Any = None,
        go: Any = None,
        shared_metrics: Any = None,
    ) -> None:
        """``host``: this process is host number ``host.host`` of a worker whose host 0
        started the engine process (see ``host_main``); it sets the event ``started`` once
        set up, starts pulling when host 0 sets ``go`` (all hosts are set up), and publishes
        its metrics into ``shared_metrics`` for host 0's ``/metrics``."""
        if host is None:  # host 0 resolves --model; the other hosts get its directory
            settings = with_model_dir(settings)
        self.settings = settings
        self._host = host
        self._started_flag = started
        self._go = go
        self._hosts = HostProcesses(settings)  # host 0: the other host processes
        self.name = settings.name
        self.model = settings.model_name
        self.keys = Keys(settings.prefix, settings.partitions)
        self.metrics = Metrics(self.name, self.model)
        self.telemetry = WorkerTelemetry(settings, self.metrics, shared=shared_metrics)
        self.ready = asyncio.Event()  # set once the engine runs and intake has started
        self._stop = asyncio.Event()
        self._closing = False  # side loops (heartbeat, cancels) end at their next turn
        self._fatal: str | None = None
        self.started_s = time.time()
        self.intake: Intake | None = None
        self.engine: EngineProcess | None = None
        self.aggregator: Aggregator | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._gc_thresholds: tuple[int, ...] | None = None  # the process's, restored at exit
        self._device = _device_label(settings.device)  # shown by `chatq status`

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent; safe from a signal handler)."""
        self._stop.set()

    async def run(self, *, install_signals: bool = True) -> int:
        """Serve until stopped; returns the process exit code (0 = clean drain)."""
        check_model_dir(self.settings)
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        # A socket timeout (longer than any blocking read) turns a connection that went
        # silent (a partition, a Redis host gone) into an error the loops retry.
        redis = connect(
            self.settings.redis_url,
            health_check_interval=30,
            socket_timeout=max(SOCKET_TIMEOUT_S, self.settings.read_block_ms / 1000 + 5),
            socket_connect_timeout=SOCKET_TIMEOUT_S,
        )
        try:
            if self._host is None:  # host 0 checks every host's name before loading
                names = self._host_names()
                await self._until_reachable(
                    "name check", lambda: name_free(redis, self.keys, names)
                )
            parts = await self._start(redis)
            await self._serve(parts)
            self._hosts.signal_stop()
            if self._fatal is not None:
                log.error("%s: %s", self.name, self._fatal)
                return 1
            await self._drain(parts)
            return 0
        finally:
            await self._shut_down(redis)
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    def _host_names(self) -> list[str]:
        """The consumer names this worker's host processes take (``<name>``, ``<name>.1``...)."""
        return [self.name, *(f"{self.name}.{k}" for k in range(1, self.settings.host_processes))]

    # --- lifecycle ---

    async def _start(self, redis: Redis) -> Parts:
        """Groups, tokenizer, engine (and the other hosts), then the parts that use them."""
        s = self.settings
        lanes = Lanes(redis, self.keys, self.model, self.name, aging_s=s.aging_s)
        await self._until_reachable("creating the consumer groups", lanes.ensure_groups)
        loop = asyncio.get_running_loop()
        prompts = PromptBuilder(await loop.run_in_executor(None, _load_tokenizer, s.model_path))
        writer = ResultWriter(redis, self.keys, self.model, self.name)
        engine = await self._start_engine()
        admission = Admission(
            engine.capacity,
            max_num_seqs=s.max_num_seqs,
            inflight_factor=s.max_inflight_factor,
            headroom_tokens=s.admission_headroom_tokens,
            share=1.0 / s.host_processes,
        )
        self.aggregator = Aggregator(
            writer, admission, engine, self.metrics, self.name, TokenTexts(prompts.tokenizer)
        )
        self.intake = Intake(
            redis, self.keys, self.model, lanes, admission, self.aggregator, writer, engine,
            prompts, self.metrics, aging_s=s.aging_s, read_block_ms=s.read_block_ms,
            reconcile_interval_s=s.reconcile_interval_s,
        )  # fmt: skip
        reclaimer = Reclaimer(redis, self.keys, self.name, max_deliveries=s.max_deliveries)
        if s.metrics_port and self._host is None:
            self.telemetry.serve(s.metrics_port, lambda: engine.capacity)
        return Parts(
            redis, lanes, writer, engine, admission, self.aggregator, self.intake, reclaimer
        )

    async def _start_engine(self) -> EngineProcess:
        """Start the engine process (host 0, and the other hosts then), or attach to it."""
        s = self.settings
        if self._host is None:
            engine = EngineProcess(
                s.engine_factory,
                s.model_path,
                s.engine_options(),
                torch_threads=s.torch_threads,
                on_outputs=self._on_outputs,
                on_fatal=self._on_fatal,
                host_processes=s.host_processes,
            )
        else:
            engine = EngineProcess.attach(
                self._host, on_outputs=self._on_outputs, on_fatal=self._on_fatal
            )
        self.engine = engine
        await engine.start()
        if self._host is None and s.host_processes > 1:
            self._hosts.start(engine.host_channels(), host_main, self.telemetry)
            engine.close_host_channels()
        return engine

    async def _serve(self, parts: Parts) -> None:
        """Start pulling (with the other hosts), take back this name's own pending entries,
        run the side loops, and wait until stopped."""
        # All hosts start pulling together (a full queue is not pulled by a few hosts, each
        # with its share of the engine, while the others load), each heartbeat only from
        # then on, beating without pause.
        if self._hosts.procs:
            await self._hosts.all_set_up(self._stop)
        elif self._host is not None:
            await await_go(self._started_flag, self._go, self._stop)
        beat = self._beat_info(parts.engine, parts.admission)
        await self._until_reachable("registering", lambda: parts.reclaimer.register(beat()))
        self.telemetry.beat_ok()
        own = await self._until_reachable(
            "taking back own entries", lambda: parts.reclaimer.claim_own(self.model)
        )
        if own:
            log.info("%s: taking back %d entries pending on this name", self.name, len(own))
            await parts.intake.process([entry_from_claim(c, parts.lanes) for c in own])
        self._tasks = [
            asyncio.create_task(parts.intake.run(), name="intake"),
            asyncio.create_task(parts.aggregator.run(), name="aggregator"),
            *(
                asyncio.create_task(
                    cancel_loop(
                        parts.redis,
                        self.keys.cancel(p),
                        parts.aggregator,
                        parts.intake,
                        self._is_closing,
                    ),
                    name="cancel" if self.keys.partitions == 1 else f"cancel-{p}",
                )
                for p in self.keys.all_partitions()  # one cancel stream per partition
            ),
            asyncio.create_task(
                heartbeat_loop(
                    parts.reclaimer,
                    parts.intake,
                    self.metrics,
                    beat,
                    self.settings.heartbeat_interval_s,
                    self._is_closing,
                    self.telemetry.beat_ok,
                ),
                name="heartbeat",
            ),
        ]
        self._tune_gc()
        self.ready.set()
        self.telemetry.serving()
        log.info("worker %s serving %s (engine pid %s)", self.name, self.model, parts.engine.pid)
        await self._until_stopped(self._tasks)

    async def _until_reachable(self, what: str, call: Callable[[], Awaitable[T]]) -> T:
        """``call()``, again with backoff while Redis cannot be reached: a worker started
        during an outage waits it out instead of exiting."""
        delay_s = STARTUP_RETRY_S[0]
        for attempt in itertools.count(1):
            try:
                return await call()
            except (RedisConnectionError, RedisTimeoutError) as err:
                log.warning("%s: %s: Redis unreachable (%s); retry %d in %.1f s",
                            self.name, what, err, attempt, delay_s)  # fmt: skip
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, STARTUP_RETRY_S[1])
        raise AssertionError("unreachable")

    def _tune_gc(self) -> None:
        # Startup left ~200k objects (transformers, the tokenizer) that every full
        # collection would scan again; the hot path only needs its own ones scanned.
        gc.freeze()
        # A round of a few hundred requests allocates tens of thousands of short-lived
        # containers, nearly all freed by refcount when the round ends; at the default
        # 700, young collections kept scanning (and promoting) the live ones of the
        # round, a visible share of the host's CPU per request (docs/benchmarks.md).
        self._gc_thresholds = gc.get_threshold()
        gc.set_threshold(GC_YOUNG_THRESHOLD, *self._gc_thresholds[1:])

    async def _shut_down(self, redis: Redis) -> None:
        """Stop the side loops, drop the heartbeat, let the other hosts leave, stop the
        engine, close Redis."""
        if self._gc_thresholds is not None:
            gc.set_threshold(*self._gc_thresholds)
        self.telemetry.draining()
        if self.aggregator is not None:
            self.aggregator.stop()
        await self._end_tasks(self._tasks)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(
                    *(redis.delete(self.keys.heartbeat(self.name, p))
                      for p in self.keys.all_partitions())
                ),
                HEARTBEAT_DELETE_TIMEOUT_S,
            )  # fmt: skip
        await self._hosts.join(self.name)
        if self.engine is not None:
            await self.engine.stop()
        self.telemetry.publish()
        self.telemetry.stop()
        log.info("%s: stopped", self.name)
        if self.intake is not None:
            self.intake.close()
        await redis.aclose()

    def _on_outputs(self, outputs: list[Output], capacity: EngineCapacity) -> None:
        if self.aggregator is not None:  # engine outputs only follow requests it was sent
            self.aggregator.on_outputs(outputs, capacity)

    async def _end_tasks(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Let the side loops leave on their own (their blocking reads are short), then
        cancel what is left. Not cancel-first: a cancel landing inside a redis-py call can be
        swallowed, and then a loop that retries would never end."""
        self._closing = True
        if not tasks:
            return
        _, left = await asyncio.wait(tasks, timeout=CANCEL_BLOCK_MS / 1000 + 1.0)
        for t in left:
            t.cancel()
        if left:
            _, stuck = await asyncio.wait(left, timeout=TASK_EXIT_TIMEOUT_S)
            for t in stuck:
                log.error("%s: task %s did not stop", self.name, t.get_name())

    def _is_closing(self) -> bool:
        return self._closing

    def _on_fatal(self, message: str) -> None:
        self._fatal = message
        self._stop.set()

    async def _until_stopped(self, tasks: list[asyncio.Task[Any]]) -> None:
        stop_wait = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stop_wait, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stop_wait.cancel()
        for t in done:
            if t is not stop_wait and not t.cancelled() and t.exception() is not None:
                exc = t.exception()
                self._fatal = f"task {t.get_name()} failed: {exc!r}"
                log.error("%s", self._fatal, exc_info=exc)

    async def _drain(self, parts: Parts) -> None:
        """Stop pulling; let running requests finish for up to the grace period; hand the
        rest back to their lanes."""
        intake, admission, tasks = parts.intake, parts.admission, self._tasks
        s = self.settings
        self.telemetry.draining()
        log.info("%s: draining (%d requests held)", self.name, len(admission.admitted))
        intake.stopping.set()
        await asyncio.wait([tasks[0]], timeout=s.read_block_ms / 1000 + 5)  # last pull lands
        deadline = time.monotonic() + s.grace_period_s
        while admission.admitted and time.monotonic() < deadline:
            admission.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(admission.changed.wait(), 0.1)
        left = [r for r in admission.admitted.values() if not r.finished]
        if left:
            log.info("%s: grace period over; handing %d requests back", self.name, len(left))
            for req in left:
                req.finished = True
                admission.release(req)
            parts.engine.abort([rid for r in left for rid in r.engine_ids])
            # Their chunks first, so the worker that takes them resumes from all of them.
            await parts.writer.flush()
            entries: list[Entry] = []
            for r in left:
                entries.extend([r.entry, *r.duplicates])
            self.metrics.requeued += await parts.lanes.requeue(entries)
        await parts.writer.flush()
        log.info("%s: drained", self.name)

    # --- side loops ---

    def _beat_info(
        self, engine: EngineProcess, admission: Admission
    ) -> Callable[[], dict[str, Any]]:
        def info() -> dict[str, Any]:
            c = engine.capacity
            return {
                "worker": self.name,
                "model": self.model,
                "device": self._device,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_s": round(self.started_s, 3),
                "state": "draining" if self._stop.is_set() else "serving",
                "inflight": len(admission.admitted),
                "committed_tokens": admission.committed_tokens,
                "max_model_len": engine.max_model_len,
                "free_kv_tokens": c.free_kv_tokens,
                "total_kv_tokens": c.total_kv_tokens,
                "running_seqs": c.running_seqs,
                "waiting_seqs": c.waiting_seqs,
                "preemptions": c.num_preemptions,
                "gpus": self.telemetry.gpu_beat(),
                **self.metrics.snapshot(),
            }

        return info


def host_main(
    settings: WorkerSettings,
    channel: HostChannel,
    started: Any,
    go: Any,
    shared_metrics: Any,
    log_level: int,
) -> None:
    """Entry point of host process ``channel.host`` (spawn context)."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    worker = Worker(settings, host=channel, started=started, go=go, shared_metrics=shared_metrics)
    sys.exit(asyncio.run(worker.run()))


def _device_label(device: str) -> str:
    """``device`` as the engine resolves it: "auto" is cuda when torch sees a GPU."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "auto"
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {model_path!r}: {err}") from err
