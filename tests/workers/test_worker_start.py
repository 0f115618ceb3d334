"""A worker checks its name before loading anything: a duplicate ``--name`` fails at once
(after one heartbeat TTL, in case the holder is a crashed predecessor), with no engine
process started."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from producer.contract.keys import HEARTBEAT_INTERVAL_S, Keys
from tests.workers.conftest import tiny_settings
from workers.errors import WorkerError
from workers.reclaim import Reclaimer
from workers.worker import Worker


@contextlib.asynccontextmanager
async def live(redis_client: Any, name: str) -> AsyncIterator[None]:
    """A live worker's heartbeat under ``name`` (beating as a running worker does)."""
    holder = Reclaimer(redis_client, Keys(), name)
    await holder.register({"model": "tiny"})

    async def beat() -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_INTERVAL_S)
            await holder.beat({"model": "tiny"})

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await holder.retire()


async def test_a_name_held_by_a_live_worker_fails_before_loading(
    redis_url: str, redis_client: Any, tiny_checkpoint: Callable[..., Path]
) -> None:
    ckpt = tiny_checkpoint("llama")
    async with live(redis_client, "dup"):
        worker = Worker(tiny_settings(redis_url, ckpt, name="dup"))
        with pytest.raises(WorkerError, match="'dup' is in use by a live worker"):
            await worker.run(install_signals=False)
    assert worker.engine is None and worker.intake is None  # nothing was started
    # The names of the other host processes count too.
    async with live(redis_client, "two.1"):
        settings = tiny_settings(redis_url, ckpt, name="two", host_processes=2)
        with pytest.raises(WorkerError, match=r"'two\.1' is in use"):
            await Worker(settings).run(install_signals=False)
