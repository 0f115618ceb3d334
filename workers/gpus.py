"""``chatq worker --gpus``: one worker process per GPU (or per tensor-parallel group).

Each child is an ordinary ``chatq worker`` that sees only its own GPUs
(``CUDA_VISIBLE_DEVICES``), has its own consumer name (``<name>-gpu<ids>``) and metrics port
(``--metrics-port`` + index), and joins the same consumer group: the queue spreads the work,
and a child that dies is reclaimed like any worker and restarted here. Settings reach the
children as ``CHATQ_<FIELD>`` variables, which ``WorkerSettings.from_env`` reads back.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from workers.errors import ConfigError
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_DELAY_S = 1.0


def visible_gpu_count() -> int:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount())
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML: ask torch (slower import, same answer)
        import torch

        return int(torch.cuda.device_count())


def gpu_groups(
    spec: str, tensor_parallel_size: int = 1, available: int | None = None
) -> list[list[int]]:
    """``"all"`` or ``"0,1,..."`` → consecutive groups of ``tensor_parallel_size`` GPU ids."""
    if spec.strip() == "all":
        count = visible_gpu_count() if available is None else available
        ids = list(range(count))
    else:
        try:
            ids = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError as err:
            raise ConfigError(f"--gpus must be 'all' or comma-separated ids, got {spec!r}") from err
    if not ids:
        raise ConfigError("--gpus selects no GPU (none visible?)")
    if len(set(ids)) != len(ids) or min(ids) < 0:
        raise ConfigError(f"--gpus ids must be distinct and non-negative: {spec!r}")
    if len(ids) % tensor_parallel_size:
        raise ConfigError(
            f"{len(ids)} GPUs do not split into groups of --tensor-parallel-size "
            f"{tensor_parallel_size}"
        )
    return [ids[i : i + tensor_parallel_size] for i in range(0, len(ids), tensor_parallel_size)]


def child_env(settings: WorkerSettings, group: list[int], index: int) -> dict[str, str]:
    """The environment of the worker for ``group``: its settings as CHATQ_* variables."""
    child = settings.with_(
        device="cuda:0",
        name=f"{settings.name}-gpu{'_'.join(map(str, group))}",
        served_model_name=settings.model_name,
        metrics_port=None if settings.metrics_port is None else settings.metrics_port + index,
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHATQ_")}
    for f in dataclasses.fields(child):
        value = getattr(child, f.name)
        if value is not None:
            env[f"CHATQ_{f.name.upper()}"] = str(value)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, group))
    # NVLink multicast stays off in every process that may use NCCL (tensor parallel).
    env.update(NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1", NVSHMEM_DISABLE_NVLS="1")
    return env


def run_per_gpu(settings: WorkerSettings, spec: str, command: list[str] | None = None) -> int:
    """Start and supervise one worker per GPU group; SIGTERM/SIGINT drain them all.
    ``command``: what each child runs (default ``python -m workers.cli worker``; the tests
    run a small program there, since a CPU machine cannot start a worker on ``cuda:0``)."""
    groups = gpu_groups(spec, settings.tensor_parallel_size)
    cmd = command or [sys.executable, "-m", "workers.cli", "worker"]
    envs = [child_env(settings, g, i) for i, g in enumerate(groups)]
    procs = [subprocess.Popen(cmd, env=env) for env in envs]
    restarts = [0] * len(procs)
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    log.info("started %d workers on GPU groups %s", len(procs), groups)
    while True:
        codes = [p.poll() for p in procs]
        # Restarts first: children that all crashed at once are restarted too, not the end.
        for i, code in enumerate(codes):
            if code not in (None, 0) and not stopping and restarts[i] < MAX_RESTARTS:
                restarts[i] += 1
                log.warning(
                    "worker on GPUs %s exited with %s; restart %d/%d",
                    groups[i],
                    code,
                    restarts[i],
                    MAX_RESTARTS,
                )
                time.sleep(RESTART_DELAY_S)
                procs[i] = subprocess.Popen(cmd, env=envs[i])
                codes[i] = None
        if all(c is not None for c in codes):
            return max(abs(c) for c in codes if c is not None)
        time.sleep(0.2)
