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
the grace period) is generated again from its prompt. Its final result is written once;
but if it streamed, its result stream may already hold chunks of the first attempt, which
the second attempt's chunks (numbered from 0 again) follow: the ``done`` text is the
authoritative answer (resuming partial generations is a later issue).

If the engine process dies, the worker exits at once without requeueing: the heartbeat is
deleted and other workers claim the pending entries with their delivery count raised, so
a request that crashes engines ends in the dead-letter stream after ``max_deliveries``.

With ``host_processes`` = n > 1 this process (host 0) starts the engine process with a
pair of pipes per host, then n - 1 more host processes (``host_main``), each a Worker of
its own (consumer ``<name>.<k>``, its own heartbeat, intake, aggregator and reclaim) with an
equal share of the engine's capacity, attached to the same engine. They start pulling
together, once all are set up (host 0 waits for each, then lets them go). A stop reaches them
all (host 0 forwards SIGTERM); host 0 stops the engine after they have left. Any of the
processes dying ends them all, like an engine crash (the engine sees that host's pipe
close): their entries are reclaimed by the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gpu_engine.outputs import EngineCapacity as Capacity
from producer.connection import connect
from producer.keys import Keys
from workers.admission import Admission
from workers.aggregator import Aggregator
from workers.engine_process import EngineProcess, HostChannel, Output
from workers.errors import ConfigError, WorkerError
from workers.intake import Intake, being_cancelled
from workers.lanes import Entry, Lanes
from workers.metrics import Metrics
from workers.prompts import PromptBuilder
from workers.reclaim import ClaimedEntry, Reclaimer
from workers.results import ResultWriter
from workers.settings import LOG_FORMAT, WorkerSettings

log = logging.getLogger(__name__)

CANCEL_BLOCK_MS = 500
HOST_START_TIMEOUT_S = 300.0
HOST_EXIT_MARGIN_S = 15.0  # past the grace period, before host 0 kills a host that hangs
GC_YOUNG_THRESHOLD = 20_000  # allocations between young collections (Python's default: 700)
TASK_EXIT_TIMEOUT_S = 5.0


class Worker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        host: HostChannel | None = None,
        started: Any = None,
        go: Any = None,
    ) -> None:
        """``host``: this process is host number ``host.host`` of a worker whose host 0
        started the engine process (see ``host_main``); it sets the event ``started`` once
        set up, and starts pulling when host 0 sets ``go`` (all hosts are set up)."""
        self.settings = settings
        self._host = host
        self._started_flag = started
        self._go = go
        self._hosts: list[Any] = []  # host 0: the other host processes
        self._hosts_started: list[Any] = []  # host 0: their ``started`` events
        self.name = settings.name
        self.model = settings.model_name
        self.keys = Keys(settings.prefix)
        self.metrics = Metrics(self.name, self.model)
        self.ready = asyncio.Event()  # set once the engine runs and intake has started
        self._stop = asyncio.Event()
        self._closing = False  # side loops (heartbeat, cancels) end at their next turn
        self._fatal: str | None = None
        self.started_s = time.time()
        self.intake: Intake | None = None
        self.engine: EngineProcess | None = None
        self.aggregator: Aggregator | None = None

    def stop(self) -> None:
        """Begin a graceful shutdown (idempotent; safe from a signal handler)."""
        self._stop.set()

    async def run(self, *, install_signals: bool = True) -> int:
        """Serve until stopped; returns the process exit code (0 = clean drain)."""
        s = self.settings
        if not Path(s.model_path).is_dir():
            raise ConfigError(f"model directory not found: {s.model_path!r}")
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop)
        redis = connect(s.redis_url, health_check_interval=30)
        engine: EngineProcess | None = None
        tasks: list[asyncio.Task[Any]] = []
        gc_thresholds: tuple[int, ...] | None = None  # the process's, restored at exit
        try:
            lanes = Lanes(redis, self.keys, self.model, self.name, aging_s=s.aging_s)
            await lanes.ensure_groups()
            tokenizer = await loop.run_in_executor(None, _load_tokenizer, s.model_path)
            prompts = PromptBuilder(tokenizer)
            writer = ResultWriter(redis, self.keys, self.model, self.name)
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
                self._go = mp.get_context("spawn").Event()
                self._hosts, self._hosts_started = _start_hosts(s, engine.host_channels(), self._go)
                engine.close_host_channels()
            admission = Admission(
                engine.capacity,
                max_num_seqs=s.max_num_seqs,
                inflight_factor=s.max_inflight_factor,
                headroom_tokens=s.admission_headroom_tokens,
                share=1.0 / s.host_processes,
            )
            aggregator = Aggregator(writer, admission, engine, self.metrics, self.name)
            self.aggregator = aggregator
            intake = Intake(
                redis,
                self.keys,
                self.model,
                lanes,
                admission,
                aggregator,
                writer,
                engine,
                prompts,
                self.metrics,
                aging_s=s.aging_s,
                read_block_ms=s.read_block_ms,
            )
            self.intake = intake
            reclaimer = Reclaimer(redis, self.keys, self.name, max_deliveries=s.max_deliveries)
            if s.metrics_port:
                self.metrics.serve(s.metrics_port)

            # All hosts start pulling together (a full queue is not pulled by a few hosts,
            # each with its share of the engine, while the others load), each heartbeat
            # only from then on, beating without pause.
            if self._hosts:
                await self._hosts_set_up()
            elif self._host is not None:
                await self._await_go()
            beat = self._beat_info(engine, admission)
            await reclaimer.register(beat())
            own = await reclaimer.claim_own(self.model)
            if own:
                log.info("%s: taking back %d entries pending on this name", self.name, len(own))
                await intake.process([_entry_from_claim(c, lanes) for c in own])
            tasks = [
                asyncio.create_task(intake.run(), name="intake"),
                asyncio.create_task(aggregator.run(), name="aggregator"),
                asyncio.create_task(self._cancels(redis, aggregator, intake), name="cancel"),
                asyncio.create_task(self._heartbeat(reclaimer, intake, beat), name="heartbeat"),
            ]
            # Startup left ~200k objects (transformers, the tokenizer) that every full
            # collection would scan again; the hot path only needs its own ones scanned.
            gc.freeze()
            # A round of a few hundred requests allocates tens of thousands of short-lived
            # containers, nearly all freed by refcount when the round ends; at the default
            # 700, young collections kept scanning (and promoting) the live ones of the
            # round: ~5% of the host's CPU per request on the queue bench.
            gc_thresholds = gc.get_threshold()
            gc.set_threshold(GC_YOUNG_THRESHOLD, *gc_thresholds[1:])
            self.ready.set()
            log.info("worker %s serving %s (engine pid %s)", self.name, self.model, engine.pid)
            await self._until_stopped(tasks)
            self._signal_hosts()
            if self._fatal is not None:
                log.error("%s: %s", self.name, self._fatal)
                return 1
            await self._drain(intake, admission, aggregator, writer, lanes, tasks)
            return 0
        finally:
            if gc_thresholds is not None:
                gc.set_threshold(*gc_thresholds)
            if self.aggregator is not None:
                self.aggregator.stop()
            await self._end_tasks(tasks)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(redis.delete(self.keys.heartbeat(self.name)), 5.0)
            await self._join_hosts()
            if engine is not None:
                await engine.stop()
            log.info("%s: stopped", self.name)
            if self.intake is not None:
                self.intake.close()
            await redis.aclose()
            if install_signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)

    # --- lifecycle ---

    def _signal_hosts(self) -> None:
        """Host 0: pass the stop on to the other host processes (they drain on their own)."""
        for proc in self._hosts:
            if proc.is_alive():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)

    async def _await_go(self) -> None:
        """Host k > 0: say this host is set up, then wait for host 0's go (or a stop: the
        engine gone, a signal)."""
        self._started_flag.set()
        while not self._go.is_set() and not self._stop.is_set():
            await asyncio.sleep(0.01)

    async def _hosts_set_up(self) -> None:
        """Host 0: wait until every other host process is set up, then let all of them go
        (one that exits first is an error: the worker does not start)."""
        deadline = time.monotonic() + HOST_START_TIMEOUT_S
        while not all(flag.is_set() for flag in self._hosts_started):
            for proc in self._hosts:
                if not proc.is_alive():
                    raise WorkerError(f"host process {proc.name} exited ({proc.exitcode}) "
                                      "while starting; see its log above")  # fmt: skip
            if time.monotonic() > deadline:
                raise WorkerError(f"host processes not set up after {HOST_START_TIMEOUT_S} s")
            if self._stop.is_set():
                return
            await asyncio.sleep(0.01)
        self._go.set()

    async def _join_hosts(self) -> None:
        """Host 0: wait for the other hosts to leave (the engine stops only after them)."""
        if not self._hosts:
            return
        self._signal_hosts()
        timeout_s = self.settings.grace_period_s + HOST_EXIT_MARGIN_S

        def join() -> None:
            deadline = time.monotonic() + timeout_s
            for proc in self._hosts:
                proc.join(max(0.0, deadline - time.monotonic()))

        await asyncio.get_running_loop().run_in_executor(None, join)
        for proc in self._hosts:
            if proc.is_alive():
                log.error("%s: host process %s did not stop; killing it", self.name, proc.pid)
                proc.kill()
                proc.join(2)
            elif proc.exitcode:
                log.warning("%s: host process %s exited with %s", self.name, proc.pid,
                            proc.exitcode)  # fmt: skip

    def _on_outputs(self, outputs: list[Output], capacity: Capacity) -> None:
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

    async def _drain(
        self,
        intake: Intake,
        admission: Admission,
        aggregator: Aggregator,
        writer: ResultWriter,
        lanes: Lanes,
        tasks: list[asyncio.Task[Any]],
    ) -> None:
        s = self.settings
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
            assert self.engine is not None
            self.engine.abort([r.request_id for r in left])
            entries: list[Entry] = []
            for r in left:
                entries.extend([r.entry, *r.duplicates])
            self.metrics.requeued += await lanes.requeue(entries)
        await writer.flush()
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
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_s": round(self.started_s, 3),
                "state": "draining" if self._stop.is_set() else "serving",
                "inflight": len(admission.admitted),
                "committed_tokens": admission.committed_tokens,
                "free_kv_tokens": c.free_kv_tokens,
                "total_kv_tokens": c.total_kv_tokens,
                "running_seqs": c.running_seqs,
                "waiting_seqs": c.waiting_seqs,
                **self.metrics.snapshot(),
            }

        return info

    async def _heartbeat(
        self, reclaimer: Any, intake: Intake, info: Callable[[], dict[str, Any]]
    ) -> None:
        """Beat every interval (also while draining); claim dead workers' entries while serving."""
        interval_s = self.settings.heartbeat_interval_s
        while not self._closing:
            started = time.monotonic()
            try:
                await reclaimer.beat(info())
                if not intake.stopping.is_set():
                    claimed = await reclaimer.reclaim(self.model)
                    if claimed:
                        entries = [_entry_from_claim(c, intake.lanes) for c in claimed]
                        self.metrics.claimed += len(entries)
                        log.info("%s: claimed %d entries of dead workers", self.name, len(entries))
                        await intake.process(entries)
            except (RedisConnectionError, RedisTimeoutError) as err:
                if being_cancelled():
                    raise asyncio.CancelledError from err
                log.warning("%s: heartbeat/reclaim failed (%s); retrying", self.name, err)
            await asyncio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def _cancels(self, redis: Redis, aggregator: Aggregator, intake: Intake) -> None:
        """Cancels of running requests: abort in the engine. Queued ones are skipped at intake."""
        last_id: Any = None
        while not self._closing:
            try:
                if last_id is None:  # only cancels from now on matter
                    last = await redis.xrevrange(self.keys.cancel, count=1)
                    last_id = last[0][0] if last else "0-0"
                res: Any = await redis.xread(
                    {self.keys.cancel: last_id}, count=512, block=CANCEL_BLOCK_MS
                )
            except (RedisConnectionError, RedisTimeoutError) as err:
                if being_cancelled():
                    raise asyncio.CancelledError from err
                log.warning("%s: cancel stream read failed (%s); retrying", self.name, err)
                await asyncio.sleep(0.5)
                continue
            any_hit = False
            for _, entries in res or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    rid = fields.get(b"id") or fields.get(b"request_id")
                    if rid is None:
                        continue
                    rid_s = rid.decode() if isinstance(rid, bytes) else str(rid)
                    intake.note_cancel(rid_s)
                    any_hit |= aggregator.cancel(rid_s)
            if any_hit:
                await aggregator.writer.flush()


def _start_hosts(
    settings: WorkerSettings, channels: list[HostChannel], go: Any
) -> tuple[list[Any], list[Any]]:
    """Hosts 1..n-1 of this worker, as spawned processes running ``host_main``, and the
    events they set once set up; they start pulling on ``go``."""
    ctx = mp.get_context("spawn")
    procs: list[Any] = []
    started: list[Any] = []
    for ch in channels:
        host = settings.with_(
            name=f"{settings.name}.{ch.host}",
            served_model_name=settings.model_name,
            metrics_port=None,
        )
        flag = ctx.Event()
        proc = ctx.Process(
            target=host_main,
            args=(host, ch, flag, go, logging.getLogger().getEffectiveLevel()),
            name=f"chatq-host-{ch.host}",
            daemon=True,
        )
        proc.start()
        procs.append(proc)
        started.append(flag)
    return procs, started


def host_main(
    settings: WorkerSettings, channel: HostChannel, started: Any, go: Any, log_level: int
) -> None:
    """Entry point of host process ``channel.host`` (spawn context)."""
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    sys.exit(asyncio.run(Worker(settings, host=channel, started=started, go=go).run()))


def _load_tokenizer(model_path: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"cannot load a tokenizer from {model_path!r}: {err}") from err


def _entry_from_claim(claim: ClaimedEntry, lanes: Lanes) -> Entry:
    return Entry(
        claim.stream,
        claim.entry_id,
        dict(claim.fields),
        lanes.priority_of.get(claim.stream, claim.priority),
        delivery_count=claim.delivery_count,
    )
