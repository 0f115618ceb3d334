"""The tensor-parallel group of one engine: ranks 0..N-1, one device each, on one host.

Two torch.distributed groups over the same ranks:

- the device group (the default group; NCCL on CUDA, gloo on CPU) carries the model's
  all-reduces, the logits gather and each step's payload tensors;
- the control group (always gloo, CPU tensors) carries each step's small fixed-size header.
  Workers wait on it between steps for as long as the engine idles, so its timeout is
  effectively unbounded; a gloo receive fails as soon as the peer's connection closes, so a
  dead engine is still noticed, and no NCCL kernel spins on an idle GPU.

Model layers take the group that is current while they are built (``building``); with no
group (``tensor_parallel_size=1``) ``current()`` is the single-rank ``SINGLE`` and every
tensor-parallel layer is its plain torch counterpart.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed import TCPStore  # type: ignore[attr-defined]

from gpu_engine.errors import EngineError

log = logging.getLogger(__name__)

# NVLink multicast (NVLS) stays off in every rank: set before spawning and before
# init_process_group, since NCCL and symmetric memory read them at communicator creation.
MULTICAST_OFF_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
MASTER_ADDR = "127.0.0.1"
# A collective inside a step waits at most this long for the other ranks (NCCL's default).
DEVICE_TIMEOUT = timedelta(minutes=10)
# Workers block on the control group while the engine idles: hours or days are normal.
CONTROL_TIMEOUT = timedelta(days=365)
STORE_TIMEOUT = timedelta(minutes=5)  # rendezvous: every rank must have started by then


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int
    device_group: Any = None  # dist.ProcessGroup; None for a single rank
    control_group: Any = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over the ranks in place; returns ``x``."""
        if self.size > 1:
            dist.all_reduce(x, group=self.device_group)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] per rank -> [..., size * n] (rank order) on rank 0; other ranks get ``x``
        back (only rank 0 samples)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0, group=self.device_group)
        return torch.cat(parts, dim=-1) if parts is not None else x

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest ``value`` over the ranks (every rank gets it)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.device_group)
        return int(t.item())


SINGLE = TPGroup(rank=0, size=1)
_current = SINGLE


def current() -> TPGroup:
    """The group of the model being built (``SINGLE`` outside ``building``)."""
    return _current


@contextmanager
def building(group: TPGroup) -> Iterator[TPGroup]:
    """Make ``group`` current while one rank's model runner is constructed."""
    global _current
    previous, _current = _current, group
    try:
        yield group
    finally:
        _current = previous


def set_multicast_off_env() -> None:
    os.environ.update(MULTICAST_OFF_ENV)


def create_store(world_size: int) -> Any:
    """Rank 0's rendezvous store on a free port chosen by the OS (``store.port``)."""
    return TCPStore(
        MASTER_ADDR,
        0,
        world_size=world_size,
        is_master=True,
        timeout=STORE_TIMEOUT,
        wait_for_workers=False,
    )


def connect_store(port: int) -> Any:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = MASTER_ADDR, str(port)
    return TCPStore(MASTER_ADDR, port, is_master=False, timeout=STORE_TIMEOUT)


def init_group(rank: int, size: int, store: Any, device: torch.device) -> TPGroup:
    """Join the engine's group as ``rank`` (every rank calls this with the same ``size``)."""
    if dist.is_initialized():
        raise EngineError(
            "this process already has a torch.distributed process group: one "
            "tensor-parallel engine per process"
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        set_multicast_off_env()
        torch.cuda.set_device(device)
    dist.init_process_group(
        backend,
        store=store,
        rank=rank,
        world_size=size,
        timeout=DEVICE_TIMEOUT,
        device_id=device if device.type == "cuda" else None,
    )
    control = dist.new_group(list(range(size)), timeout=CONTROL_TIMEOUT, backend="gloo")
    group = TPGroup(rank=rank, size=size, device_group=dist.group.WORLD, control_group=control)
    # One collective now, so NCCL's communicator exists before any CUDA-graph capture.
    group.min_int(0, device)
    return group


def destroy_group(timeout_s: float = 10.0) -> None:
    """Tear this process's groups down. Runs in a daemon thread with a time limit: NCCL's
    communicator teardown can wait on a peer that is already gone (or on a captured CUDA
    graph still alive), and shutdown must not hang on it."""
    if not dist.is_initialized():
        return

    def destroy() -> None:
        try:
            dist.destroy_process_group()
        except Exception as err:  # teardown: report, never raise
            log.warning("destroy_process_group failed: %s", err)

    thread = threading.Thread(target=destroy, name="chatq-tp-destroy", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("process group teardown still running after %.0f s; left behind", timeout_s)
