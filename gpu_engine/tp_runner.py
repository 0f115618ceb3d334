"""Tensor parallelism over N devices of one host: the engine's process is rank 0, ranks
1..N-1 are processes it spawns.

Rank 0 runs everything the single-device engine runs (scheduler, block manager, sampler);
each step, right after building the step's inputs, it broadcasts them
(``gpu_engine.step_channel``) and all ranks run the same forward pass on their shard of the
model and KV cache (``num_kv_heads / N`` heads each), meeting in the row-parallel all-reduces
and the logits gather; only rank 0 samples. Workers loop on ``StepChannel.recv`` until rank 0
sends EXIT (``LLMEngine.close``, the engine's garbage collection, or interpreter exit).

``make_model_runner`` is the engine's entry: the plain ``ModelRunner`` for one device (no
process group, nothing here runs), a ``TPModelRunner`` with its workers otherwise.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import multiprocessing
import os
import sys
import threading
import time
import weakref
from typing import Any

import torch

from gpu_engine.config import ConfigError, EngineConfig
from gpu_engine.errors import EngineError
from gpu_engine.loader import load_hf_config, resolve_model_dir
from gpu_engine.model_runner import ModelRunner, StepInputs
from gpu_engine.models import LlamaArchConfig
from gpu_engine.scheduler import ScheduledBatch
from gpu_engine.step_channel import StepChannel
from gpu_engine.tp_group import (
    TPGroup,
    building,
    connect_store,
    create_store,
    destroy_group,
    init_group,
    set_multicast_off_env,
)
from gpu_engine.tp_shards import local_arch

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 30.0  # a worker finishing its step and tearing down its group
_PARENT_POLL_S = 1.0


class TPModelRunner(ModelRunner):
    """One rank's model runner: the single-device runner built for its shard, plus the step
    channel. Rank 0 broadcasts in ``prepare``; the other ranks run ``serve``."""

    def __init__(self, config: EngineConfig, group: TPGroup) -> None:
        self.tp = group
        with building(group):
            super().__init__(config)
        self.channel = StepChannel(group, self.device)
        self._closed = False
        self._sent_step = False
        # Rank 0 only (set by ``launch``): stops the workers once; their process ids.
        self.finalizer: weakref.finalize[Any, Any] | None = None
        self.worker_pids: list[int] = []

    def prepare(self, batch: ScheduledBatch) -> StepInputs:
        if self._closed:
            raise EngineError("the engine is closed")
        inputs = super().prepare(batch)
        self.channel.send(inputs)
        self._sent_step = True
        return inputs

    def _graph_decode_hidden(self, batch: ScheduledBatch) -> torch.Tensor | None:
        # The staged decode path replays graphs straight from host lists, skipping prepare(),
        # which is where a step reaches the other ranks. TP decode steps take the StepInputs
        # path instead; it still replays the captured graphs (``_run_decode``).
        return None

    def forward_logits(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int]]:
        self._sent_step = False
        out = super().forward_logits(batch)
        if not self._sent_step:  # the other ranks would wait in this step's collectives
            raise EngineError(
                "a forward path of ModelRunner.forward_logits skipped prepare(): its inputs "
                "never reached the other tensor-parallel ranks (override it in TPModelRunner)"
            )
        return out

    @torch.inference_mode()
    def serve(self) -> None:
        """Ranks 1..N-1: run rank 0's steps until it says exit."""
        while (inputs := self.channel.recv()) is not None:
            hidden = self._execute(inputs)
            self.model.compute_logits(hidden[inputs.sample_rows])  # joins the logits gather
            if self.device.type == "cuda":
                # Rank 0 syncs on its sampled tokens; this rank never samples. Finishing the
                # step here keeps the next step's staging from racing this one's copies.
                torch.cuda.current_stream(self.device).synchronize()

    def release_graphs(self) -> None:
        """Drop captured CUDA graphs: NCCL's communicator teardown waits for every graph that
        captured one of its collectives to be destroyed."""
        self.graphs = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


class WorkerPool:
    """Ranks 1..N-1 as spawned processes (torch.multiprocessing, spawn context)."""

    def __init__(self, config: EngineConfig, devices: list[torch.device], port: int) -> None:
        ctx = torch.multiprocessing.get_context("spawn")
        fields = dataclasses.asdict(config)
        threads = torch.get_num_threads()
        self.procs = []
        for rank in range(1, len(devices)):
            worker_fields = {**fields, "device": str(devices[rank])}
            proc = ctx.Process(
                target=worker_main,
                args=(worker_fields, rank, len(devices), port, os.getpid(), threads),
                name=f"chatq-tp-rank{rank}",
                daemon=True,  # multiprocessing's own exit hook terminates them as a last resort
            )
            _start_even_if_daemonic(proc)
            self.procs.append(proc)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.pid is not None]

    def close(self, timeout_s: float = JOIN_TIMEOUT_S) -> None:
        """Wait for the workers to exit; terminate, then kill, the ones that do not."""
        deadline = time.monotonic() + timeout_s
        for proc in self.procs:
            proc.join(max(0.0, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                log.warning("tensor-parallel worker %s did not exit; terminating", proc.name)
                proc.terminate()
                proc.join(5.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
            if proc.exitcode not in (0, None):
                log.warning("tensor-parallel worker %s exited with %s", proc.name, proc.exitcode)


def _start_even_if_daemonic(proc: Any) -> None:
    """Start ``proc`` also from a daemonic process (the worker host runs its engine in one):
    multiprocessing refuses children there only because a daemon's children are orphaned
    when it is terminated; ours watch their parent and exit with it (``_exit_with_parent``)."""
    config = multiprocessing.current_process()._config  # type: ignore[attr-defined]
    daemonic = config.get("daemon", False)
    config["daemon"] = False
    try:
        proc.start()
    finally:
        config["daemon"] = daemonic


def rank_devices(config: EngineConfig) -> list[torch.device]:
    """Device of each rank: ``cuda:(k + r)`` for an engine on ``cuda:k``, else CPU for all."""
    size = config.tensor_parallel_size
    if config.device == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        kind = torch.device(config.device).type
    if kind != "cuda":
        return [torch.device(kind)] * size
    requested = torch.device(config.device) if config.device != "auto" else torch.device("cuda")
    base = requested.index if requested.index is not None else torch.cuda.current_device()
    if base + size > torch.cuda.device_count():
        raise ConfigError(
            f"tensor_parallel_size={size} from cuda:{base} needs {base + size} CUDA devices, "
            f"found {torch.cuda.device_count()}"
        )
    return [torch.device("cuda", base + r) for r in range(size)]


def _shutdown(
    runner_ref: weakref.ref[TPModelRunner], channel: StepChannel, pool: WorkerPool
) -> None:
    """Tell the workers to exit, tear the groups down, reap the workers (idempotent via
    ``weakref.finalize``: runs once, from ``close``, garbage collection or interpreter exit)."""
    try:
        channel.send_exit()
    except Exception as err:  # a worker already gone: reaping below still runs
        log.warning("could not send exit to tensor-parallel workers: %s", err)
    runner = runner_ref()
    if runner is not None:
        runner._closed = True
        runner.release_graphs()
    destroy_group()
    pool.close()


def launch(config: EngineConfig) -> TPModelRunner:
    """Rank 0: check the model splits, spawn ranks 1..N-1, join the group, build rank 0's
    runner. Everything started is stopped again if any of it fails."""
    model_dir = resolve_model_dir(config.model)  # a GGUF converts once, here, not per rank
    local_arch(LlamaArchConfig.from_hf(load_hf_config(model_dir)), config.tensor_parallel_size)
    devices = rank_devices(config)
    config = dataclasses.replace(config, model=str(model_dir), device=str(devices[0]))
    if devices[0].type == "cuda":
        set_multicast_off_env()  # before spawning: the workers inherit the environment
    store = create_store(config.tensor_parallel_size)
    pool = WorkerPool(config, devices, store.port)
    try:
        group = init_group(0, config.tensor_parallel_size, store, devices[0])
        runner = TPModelRunner(config, group)
    except BaseException:
        destroy_group()
        pool.close(timeout_s=0.0)
        raise
    runner.finalizer = weakref.finalize(
        runner, _shutdown, weakref.ref(runner), runner.channel, pool
    )
    runner.worker_pids = pool.pids
    log.info("tensor parallel over %s (worker pids %s)", [str(d) for d in devices], pool.pids)
    return runner


def make_model_runner(config: EngineConfig) -> ModelRunner:
    if config.tensor_parallel_size == 1:
        return ModelRunner(config)
    return launch(config)


def close_model_runner(runner: ModelRunner) -> None:
    """Stop a tensor-parallel runner's workers (no-op for a single-device runner)."""
    finalizer = getattr(runner, "finalizer", None)
    if finalizer is not None:
        finalizer()


# -- ranks 1..N-1 ------------------------------------------------------------------------
def _exit_with_parent(parent_pid: int) -> None:
    """Exit when the engine's process is gone (a SIGKILLed engine never sends EXIT)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch, name="chatq-tp-parent-watch", daemon=True).start()


def worker_main(
    fields: dict[str, Any], rank: int, size: int, port: int, parent_pid: int, threads: int
) -> None:
    """Entry point of rank ``rank`` (a spawned process)."""
    logging.basicConfig(level=logging.WARNING, format=f"[tp rank {rank}] %(message)s")
    _exit_with_parent(parent_pid)
    torch.set_num_threads(threads)
    config = EngineConfig(**fields)
    device = torch.device(config.device)
    if device.type == "cuda":
        set_multicast_off_env()
    group = init_group(rank, size, connect_store(port), device)
    runner: TPModelRunner | None = None
    try:
        runner = TPModelRunner(config, group)
        runner.serve()
    except Exception:
        log.exception("tensor-parallel worker failed")
        sys.exit(1)
    finally:
        if runner is not None:
            runner.release_graphs()
        destroy_group()
